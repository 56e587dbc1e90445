"""Stage 3 of MMFT: class prototypes -> the `"mmft-classification"` pipeline. Imports nothing of training."""
