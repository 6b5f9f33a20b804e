"""Fusing many image pairs from files: pairing, progress, per-file errors, atomic writes.

This is the library behind `bin/fuse.py`. A problem with one pair (unreadable file, sizes
that differ, a file with no partner, an output file that cannot be written) is reported
and the other pairs are still fused; the caller decides the exit code from the result.
Problems with the output folder as a whole are found before the first image
(`check_output`), and a stop request (SIGINT/SIGTERM, `interrupts.StopRequest`) is honoured
between pairs: the finished images stay, nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Optional, Sequence

import tqdm

from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.runtime import interrupts

Pairs = Sequence[tuple[str, tuple[pathlib.Path, ...]]]
ROLES = ("infrared", "visible")


@dataclasses.dataclass
class BatchResult:
  """What `fuse_pairs` did.

  Attributes:
    written: number of images written.
    problems: one-line messages of the pairs that were not fused or not written.
    not_started: pairs left untouched because a stop was requested.
  """

  written: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)
  not_started: int = 0


def output_path(out_dir: str | os.PathLike, stem: str) -> pathlib.Path:
  """Where the fused image of the pair `stem` goes: `out_dir/<stem>.png`."""
  return pathlib.Path(out_dir) / f"{stem}.png"


def input_paths(given: Sequence[str | os.PathLike], pairs: Pairs,
                options: Sequence[str] = ("--ir", "--vis")) -> list[tuple[str, pathlib.Path]]:
  """(description, path) of every input folder or file given and every paired file.

  For `files.refuse_overwrites`: an output may be none of them.
  """
  inputs = []
  for role, option, path in zip(ROLES, options, given):
    path = pathlib.Path(path)
    kind = "folder" if path.is_dir() else "file"
    inputs.append((f"{role} input {kind} ({option})", path))
  for _, paths in pairs:
    for role, option, path in zip(ROLES, options, paths):
      inputs.append((f"{role} input file ({option})", path))
  return inputs


def check_output(out_dir: str | os.PathLike, stems: Sequence[str],
                 inputs: Sequence[tuple[str, pathlib.Path]],
                 what: str = "--out") -> list[pathlib.Path]:
  """Checks, before any work, that images can be written to `out_dir/<stem>.png`.

  Refuses an output folder that is an input folder or whose outputs would replace an input
  file, then makes sure the folder exists and is writable (creating it if needed).

  Args:
    out_dir: the output folder.
    stems: the names of the images to write.
    inputs: from `input_paths`.
    what: the option that named the folder, for messages.

  Returns:
    The folders created (see `files.remove_created_folders`: remove them again when nothing
    was written).

  Raises:
    files.OutputError: with a one-line message naming the path and the problem.
  """
  return files.check_output_folder(out_dir, [output_path(out_dir, stem) for stem in stems],
                                   inputs, what)


def write_output(path: pathlib.Path, image) -> None:
  """`imageio.write_image_atomic`, any failure an ImageError naming the file."""
  try:
    imageio.write_image_atomic(path, image)
  except OSError as e:
    reason = "a folder of that name is in the way" if path.is_dir() else files.os_error_cause(e)
    raise imageio.ImageError(f"{path}: cannot write the fused image ({reason})") from None


def fuse_pairs(fuser: fusion.Fuser, pairs: Pairs, out_dir: str | os.PathLike, *,
               progress: bool = True, report: Callable[[str], None] = print,
               stop: Optional[interrupts.StopRequest] = None) -> BatchResult:
  """Fuses each (stem, (ir_path, vis_path)) pair into `out_dir/<stem>.png`.

  Args:
    fuser: the configured fusion.
    pairs: from `imageio.pair_inputs`.
    out_dir: created (with the first image) if missing; see `check_output` for the checks
      to run first.
    progress: show a progress bar (only for more than one pair).
    report: called with each problem's one-line message as it happens.
    stop: checked between pairs; once its `signum` is set, the remaining pairs are left.

  Returns:
    A BatchResult.
  """
  result = BatchResult()
  bar = tqdm.tqdm(pairs, unit="pair", disable=not progress or len(pairs) < 2, dynamic_ncols=True)
  try:
    for done, (stem, (ir_path, vis_path)) in enumerate(bar):
      if stop is not None and stop.signum is not None:
        result.not_started = len(pairs) - done
        break
      try:
        ir, vis = imageio.read_image(ir_path), imageio.read_image(vis_path)
        imageio.check_same_size((ir_path, vis_path), (ir, vis), ROLES)
        try:
          fused = fuser.fuse_images(ir, vis)
        except ValueError as e:
          raise imageio.ImageError(f"{ir_path}: {e}") from None
        write_output(output_path(out_dir, stem), fused)
        result.written += 1
      except imageio.ImageError as e:
        result.problems.append(str(e))
        with bar.external_write_mode():
          report(str(e))
  finally:
    bar.close()
  return result
