"""Writes one self-contained HTML page comparing fusion methods on the same image pairs.

  python bin/report.py --ir IR_DIR --vis VIS_DIR --fused student=OUT_A --fused average=OUT_B \\
      --out report.html [--metrics EN,SD,MI] [--max_images N] [--title TEXT]

The folders are paired by file stem and each method is scored as bin/evaluate.py scores it
(same code and conventions). The page holds the means (best of each column marked), sortable
per-image tables, per-metric distributions (matplotlib) and thumbnails with zoomed crops, all
embedded: the file can be mailed. Needs matplotlib: pip install -e '.[report]'.

A bad --fused (no '=', a name given twice, no such folder), a bad flag, or an --out that
cannot be written or would replace an input: one line, exit 2, before any work. Missing
partners, unreadable files and pairs of different sizes: one 'skipped:' line each, the rest
is compared (on the images every method has), exit 1. SIGINT/SIGTERM stop after the current
image with exit 130/143, and no report is written; the page is written under a temporary
name and renamed, so it is never half-written.
"""

import argparse
import sys
from typing import Sequence

from mmdrfuse_jax.evaluation import comparison, report, scoring
from mmdrfuse_jax.io import files
from mmdrfuse_jax.runtime import cli, interrupts


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="mmdrfuse-report", description=__doc__)
  parser.add_argument("--ir", required=True, help="infrared (or PET/SPECT/CT) folder")
  parser.add_argument("--vis", required=True, help="visible (or MRI) folder")
  parser.add_argument("--fused", action="append", required=True, metavar="NAME=FOLDER",
                      help="one method's fused images (repeatable)")
  parser.add_argument("--out", required=True, help="the HTML file to write")
  parser.add_argument("--metrics", help="comma-separated subset, e.g. EN,SD,MI (default: all "
                      "eleven and Floor, the share of collapsed pixels)")
  parser.add_argument("--max_images", type=_positive_int, metavar="N",
                      help="compare only the first N images (by name)")
  parser.add_argument("--title", default="Fusion comparison", help="the page's title")
  parser.add_argument("--ssim_data_range", type=float, default=2.0,
                      help="SSIM data range: 2 as in the published tables, 255 the textbook "
                      "value")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parsed = cli.parse_args(_parser(), argv)
  if isinstance(parsed, int):
    return parsed
  args, _ = parsed
  return cli.run_until_stopped(_run, args, at_once="no report written")


def _run(fv: argparse.Namespace, stop: interrupts.StopRequest) -> int:
  created = []
  try:
    methods = comparison.parse_methods(fv.fused)
    names = scoring.parse_metric_names(fv.metrics)
    if fv.metrics is None:  # The eleven, and whether dark regions collapsed.
      names = tuple(names) + ("Floor",)
    report.require_matplotlib()
    images, problems = comparison.pair_images(fv.ir, fv.vis, methods, fv.max_images)
    created = files.check_output_file(fv.out, comparison.input_paths(fv.ir, fv.vis, methods))
  except (ValueError, OSError) as e:  # options, folders, the output location
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    return _compare(fv, stop, methods, names, images, problems)
  finally:
    files.remove_created_folders(created)  # only where nothing was written


def _compare(fv, stop, methods, names, images, problems) -> int:
  for problem in problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if not images:
    print("error: no complete set of images to compare", file=sys.stderr)
    return 2
  compared = comparison.compare(images, methods, names=names, ssim_data_range=fv.ssim_data_range,
                              progress=not fv.no_progress, stop=stop, problems=problems)
  for problem in compared.problems[len(problems):]:
    print(f"skipped: {problem}", file=sys.stderr)
  if compared.stopped_by is not None:
    print(f"stopped by {interrupts.signal_name(compared.stopped_by)} while scoring: no report "
          "written", file=sys.stderr)
    return interrupts.exit_code(compared.stopped_by)
  if not compared.images:
    print("error: no image could be scored for every method; no report written",
          file=sys.stderr)
    return 2
  reported = len(compared.problems)
  try:
    page = report.build_html(compared, title=fv.title, sources=(fv.ir, fv.vis), stop=stop)
  except report.Stopped as e:
    print(f"{e} while making the page: no report written", file=sys.stderr)
    return interrupts.exit_code(e.signum)
  for problem in compared.problems[reported:]:
    print(f"skipped: {problem}", file=sys.stderr)
  try:
    report.write_atomic(fv.out, page)
  except OSError as e:
    # The scoring is done: print the means (a full disk loses the page, not the numbers).
    for method in methods:
      print(scoring.format_means(compared.results[method.name], label=method.name))
    print(f"error: cannot write {fv.out} ({files.os_error_cause(e)}); each method's means are "
          "printed above", file=sys.stderr)
    return 2
  print(f"wrote {fv.out}: {len(compared.images)} image(s), {len(methods)} method(s)")
  if compared.problems:
    print(f"{len(compared.problems)} file problem(s) reported; {len(compared.images)} "
          "image(s) compared", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
