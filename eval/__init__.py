"""Measurement: validation loss, FID, GenEval, CLIP score. Reads checkpoints and sample files."""
