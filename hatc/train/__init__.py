"""Training the SuperTransformer (one sampled SubTransformer per update) and
fixed SubTransformers, resumable and distributed."""
