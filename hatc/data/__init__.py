"""Parallel text: reading corpora, the joint subword model, binarized splits, token batches."""
