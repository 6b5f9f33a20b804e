"""Plots the validation scores of training runs against their steps, as one SVG file.

  python bin/plot_validation.py --run lr1e-4=runs/student --run lr1e-3=runs/fast \\
      --metrics VIF,Qabf,SSIM --reference "published student=VIF:0.61,Qabf:0.43" \\
      --out curves.svg

Each --run is NAME=WORKDIR of a run trained with `config.validation` (its `metrics.jsonl`);
each --reference draws dashed levels, e.g. another model scored on the same pairs. Needs
matplotlib: pip install -e '.[report]'. A bad flag, a run folder without validation scores or
an --out that cannot be written: one line, exit 2; the file is written under a temporary
name and renamed.
"""

import argparse
import sys
from typing import Sequence

from mmdrfuse_jax.evaluation import curves, report, scoring
from mmdrfuse_jax.io import files


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--run", action="append", required=True, metavar="NAME=WORKDIR",
                      help="a training run's folder (repeat for several)")
  parser.add_argument("--out", required=True, help="the SVG file to write")
  parser.add_argument("--metrics", default=None,
                      help="panels, comma-separated (default: every metric the runs validated)")
  parser.add_argument("--reference", action="append", default=[],
                      metavar="NAME=METRIC:VALUE,...", help="dashed reference levels")
  parser.add_argument("--title", default="", help="the figure's title")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  created: list = []
  inputs: list = []
  try:
    runs = {}
    for spec in args.run:
      name, sep, folder = spec.partition("=")
      if not (name and sep and folder):
        raise curves.CurvesError(f"--run {spec!r}: expected NAME=WORKDIR")
      if name in runs:
        raise curves.CurvesError(f"--run {spec!r}: the name {name!r} is given twice")
      runs[name] = curves.read_validation(folder)
      inputs += curves.run_files(folder)
    references = dict(curves.parse_reference(spec) for spec in args.reference)
    names: Sequence[str]
    logged = list(dict.fromkeys(m for run in runs.values() for m in run))
    # Any score the runs logged: the metrics and the diagnostics (DeadUnits) alike.
    names = scoring.parse_metric_names(args.metrics, choices=logged) if args.metrics else logged
    report.require_matplotlib()
    created = files.check_output_file(args.out, inputs)
  except ValueError as e:  # CurvesError, ReportError, OutputError, unknown metric names
    print(f"error: {e}", file=sys.stderr)
    return 2
  svg = curves.plot(runs, names, references=references, title=args.title)
  try:
    curves.write(args.out, svg)
  except OSError as e:
    files.remove_created_folders(created)
    print(f"error: cannot write {args.out} ({files.os_error_cause(e)})", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {len(runs)} run(s), {', '.join(names)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
