"""Reading and writing files safely: atomic writes, images, and PyTorch weight files."""
