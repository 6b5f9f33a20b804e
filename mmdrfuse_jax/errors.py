"""The base of every error this library raises on purpose.

Each error class keeps its own meaning (and its built-in base, `ValueError` for bad input,
`RuntimeError` for a failed run), and all of them also derive from `MMDRFuseError`, so a caller
can tell our refusals from our bugs in one `except` clause:

>>> from mmdrfuse_jax import MMDRFuseError
>>> from mmdrfuse_jax.io.imageio import ImageError
>>> issubclass(ImageError, MMDRFuseError) and issubclass(ImageError, ValueError)
True
"""

__all__ = ["MMDRFuseError"]


class MMDRFuseError(Exception):
  """An input, a file or a setting that the library refused, with a one-line reason."""
