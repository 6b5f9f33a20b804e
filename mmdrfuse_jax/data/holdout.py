"""A validation split held out of the training pairs, chosen by a stable hash of each stem.

Choosing runs, steps and settings on a test set makes its figures no longer held out. The
honest alternative is a validation split of the training data: `config.data.holdout = 0.1`
keeps about a tenth of the training pairs out of training, and `config.validation.split =
"holdout"` validates on exactly those pairs.

Which pairs: those whose stem hashes (SHA-256 of a fixed salt and the stem) below the
fraction. The choice depends on the stem alone, not on the order of the files, the machine,
the Python version or the other stems: adding pairs to a folder never moves an existing pair
between the two sides, and every process of a run agrees.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

_SALT = b"mmdrfuse-jax holdout v1\0"


def hash_unit(stem: str) -> float:
  """The stem's place in [0, 1): the first 8 bytes of SHA-256(salt + stem), scaled."""
  digest = hashlib.sha256(_SALT + stem.encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(stem: str, fraction: float) -> bool:
  """Whether the pair `stem` belongs to the validation side at `fraction` (0: none)."""
  return hash_unit(stem) < fraction


def held_out(stems: Iterable[str], fraction: float) -> list[int]:
  """The indices of the held-out stems, in order."""
  check_fraction(fraction)
  return [i for i, stem in enumerate(stems) if is_held_out(stem, fraction)]


def check_fraction(fraction: float) -> None:
  """Raises ValueError unless 0 <= fraction < 1 (all pairs held out would train on none)."""
  if isinstance(fraction, bool) or not 0.0 <= float(fraction) < 1.0:
    raise ValueError(f"the holdout fraction must be in [0, 1), got {fraction!r}")
