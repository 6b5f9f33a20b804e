"""Fusing many image pairs from files: pairing, progress, per-file errors, atomic writes.

This is the library behind `bin/fuse.py`. A problem with one pair (unreadable file, sizes
that differ, a file with no partner) is reported and the other pairs are still fused; the
caller decides the exit code from the returned problems.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import tqdm

from mmdrfuse_jax import fusion, imageio


def fuse_pairs(fuser: fusion.Fuser,
               pairs: Sequence[tuple[str, tuple[pathlib.Path, ...]]],
               out_dir: str | os.PathLike,
               *,
               progress: bool = True,
               report: Callable[[str], None] = print) -> tuple[int, list[str]]:
  """Fuses each (stem, (ir_path, vis_path)) pair into `out_dir/<stem>.png`.

  Args:
    fuser: the configured fusion.
    pairs: from `imageio.pair_inputs`.
    out_dir: created if missing.
    progress: show a progress bar (only for more than one pair).
    report: called with each problem's one-line message as it happens.

  Returns:
    (number of images written, problems).
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  problems: list[str] = []
  written = 0
  bar = tqdm.tqdm(pairs, unit="pair", disable=not progress or len(pairs) < 2, dynamic_ncols=True)
  for stem, (ir_path, vis_path) in bar:
    try:
      ir, vis = imageio.read_image(ir_path), imageio.read_image(vis_path)
      imageio.check_same_size((ir_path, vis_path), (ir, vis))
      try:
        fused = fuser.fuse_images(ir, vis)
      except ValueError as e:
        raise imageio.ImageError(f"{ir_path}: {e}") from None
      imageio.write_image_atomic(out_dir / f"{stem}.png", fused)
      written += 1
    except imageio.ImageError as e:
      problems.append(str(e))
      message = str(e)
      if bar.disable:
        report(message)
      else:
        bar.write(message)
  return written, problems
