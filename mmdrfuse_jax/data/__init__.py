"""Training data: TFDS builders for the fusion datasets and the patch pipeline."""
