"""Several fusion methods scored on the same images: what the comparison report shows.

`parse_methods` reads `NAME=FOLDER` options; `pair_images` matches the source folders and
every method's folder of fused images by file stem; `compare` scores each method with
`scoring.evaluate` (the code and conventions of `bin/evaluate.py`) and keeps the images every
method could be scored on, so that all means are over the same images. `report.build_html`
turns the result into the page.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.evaluation import metrics, scoring
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.runtime import interrupts


class ReportError(MMDRFuseError, ValueError):
  """The command's options cannot be used; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A fusion method: its name on the page and its folder of fused images."""

  name: str
  folder: pathlib.Path


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """One compared image: its sources and one fused file per method (in method order)."""

  name: str
  ir: pathlib.Path
  vis: pathlib.Path
  fused: tuple[pathlib.Path, ...]


@dataclasses.dataclass
class Comparison:
  """The scores of every method on the same images.

  Attributes:
    names: the metrics, in column order.
    methods: the methods, in page order.
    images: the images scored for every method, by name.
    results: per method name, the `EvaluationResult` restricted to `images` (same order).
    problems: one-line messages for the files that could not be used.
    stopped_by: the signal that ended the scoring early, else None.
    ssim_data_range: SSIM's data range in the scores.
  """

  names: tuple[str, ...]
  methods: list[Method]
  images: list[ImageSet]
  results: dict[str, scoring.EvaluationResult]
  problems: list[str]
  stopped_by: Optional[int] = None
  ssim_data_range: float = 2.0


def parse_methods(specs: Optional[Sequence[str]]) -> list[Method]:
  """`NAME=FOLDER` specs to methods.

  Raises:
    ReportError: no spec, one without `=`, an empty name or folder, a name given twice, or a
      folder that does not exist.
  """
  if not specs:
    raise ReportError("--fused: give at least one NAME=FOLDER")
  methods: list[Method] = []
  for spec in specs:
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not name or not folder:
      raise ReportError(f"--fused {spec}: expected NAME=FOLDER (for example student=out/student)")
    if any(m.name == name for m in methods):
      raise ReportError(f"--fused {spec}: the name {name!r} is given twice; "
                        "each method needs its own name")
    path = pathlib.Path(folder)
    if not path.is_dir():
      what = "is a file, not a folder" if path.exists() else "no such folder"
      raise ReportError(f"--fused {spec}: {path}: {what}")
    methods.append(Method(name, path))
  return methods


def input_paths(ir_dir, vis_dir, methods: Sequence[Method]) -> list[tuple[str, pathlib.Path]]:
  """(description, path) of every input folder and every file in them (never overwritten)."""
  folders = [("infrared input folder (--ir)", pathlib.Path(ir_dir)),
             ("visible input folder (--vis)", pathlib.Path(vis_dir))]
  folders += [(f"fused input folder of {m.name} (--fused)", m.folder) for m in methods]
  inputs = list(folders)
  for label, folder in folders:
    if folder.is_dir():
      inputs += [(label.replace(" folder", ""), p) for p in sorted(folder.iterdir())
                 if p.is_file()]
  return inputs


def pair_images(ir_dir, vis_dir, methods: Sequence[Method],
                max_images: Optional[int] = None) -> tuple[list[ImageSet], list[str]]:
  """Pairs the sources and every method's fused images by stem (`imageio.pair_folders`).

  Args:
    max_images: keep only the first this many complete sets (by name).

  Returns:
    The complete sets sorted by name, and one-line messages for files without partners.

  Raises:
    imageio.ImageError: a folder is missing or holds no image.
  """
  pairing = imageio.pair_folders([ir_dir, vis_dir] + [m.folder for m in methods])
  images = [ImageSet(stem, paths[0], paths[1], tuple(paths[2:])) for stem, paths in pairing.pairs]
  if max_images is not None:
    images = images[:max_images]
  return images, list(pairing.problems)


def compare(images: Sequence[ImageSet], methods: Sequence[Method], *,
            names: Sequence[str] = metrics.METRIC_NAMES, ssim_data_range: float = 2.0,
            progress: bool = False, stop: Optional[interrupts.StopRequest] = None,
            problems: Sequence[str] = ()) -> Comparison:
  """Scores every method with `scoring.evaluate`, keeping the images all methods have.

  An image that cannot be scored for one method (unreadable, sizes differ, too small) is
  reported once and left out for every method, so that all means are over the same images.

  Args:
    images, methods: from `pair_images` and `parse_methods`.
    names, ssim_data_range: the metrics and SSIM's convention (see `scoring.evaluate`).
    progress: a progress bar per method.
    stop: checked before each image; once set, scoring ends (`Comparison.stopped_by`).
    problems: messages found before (by the pairing); the comparison's list starts with them.
  """
  names = tuple(names)
  results: dict[str, scoring.EvaluationResult] = {}
  problems = list(problems)
  stopped_by = None
  for k, method in enumerate(methods):
    triples = [scoring.Triple(im.name, im.ir, im.vis, im.fused[k]) for im in images]
    result = scoring.evaluate(triples, names=names, ssim_data_range=ssim_data_range,
                                 progress=progress, stop=stop)
    problems += [p for p in result.problems if p not in problems]  # source problems: once
    results[method.name] = result
    if result.stopped_by is not None:
      stopped_by = result.stopped_by
      break
  scored = set.intersection(*(set(n for n, _ in r.rows) for r in results.values()))
  kept = [im for im in images if im.name in scored]
  for name, result in results.items():
    rows = dict(result.rows)
    results[name] = scoring.EvaluationResult(
        names=names, rows=[(im.name, rows[im.name]) for im in kept], problems=result.problems,
        stopped_by=result.stopped_by)
  return Comparison(names=names, methods=list(methods), images=kept, results=results,
                    problems=problems, stopped_by=stopped_by,
                    ssim_data_range=float(ssim_data_range))
