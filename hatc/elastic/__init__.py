"""Weight-sharing (elastic) ops and the SuperTransformer."""
