"""`bench.py suite --out DIR`: every benchmark in one prepared run, for a short GPU rental.

Runs inference (student and teacher; 640x480 and 1280x1024; batch 1 and 32), the metrics,
the patch pipeline, video fusion (640x480 and 1280x1024: decoded and fused, and encoded too)
and the training step (student and teacher; each precision mode), one after another in this
process, and writes `DIR/bench.json` (every result, with the device, the jax version and the
date) and `DIR/bench.md` (one table). Each result is also written as soon as it is measured,
so an interrupted suite keeps what it finished. `--reduced` runs the same items at tiny sizes
(for a CPU, and for the tests); `--only` picks items by name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import time
from typing import Any

import jax

from mmdrfuse_jax.benchmarks import common, infer, metrics, pipeline, train_step, video
from mmdrfuse_jax.io import files
from mmdrfuse_jax.models import precision

SCHEMA_VERSION = 1
_BENCHMARKS = (infer, metrics, pipeline, train_step, video)


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("suite", help="every benchmark, written to DIR/bench.json")
  parser.add_argument("--out", required=True, help="folder for bench.json and bench.md")
  parser.add_argument("--reduced", action="store_true",
                      help="tiny sizes (a CPU run, or a check of the suite itself)")
  parser.add_argument("--only", default="",
                      help="comma-separated item names or prefixes (default: all items)")
  parser.set_defaults(run=run)


def items(reduced: bool) -> list[tuple[str, list[str]]]:
  """The suite: (item name, the `bench.py` arguments that measure it)."""
  if reduced:
    sizes, batches, repeats = [(48, 64), (96, 128)], [1, 4], "3"
    step = ["--batch", "2", "--size", "32", "--repeats", "2"]
    pipe = ["--num_pairs", "8", "--size", "256", "--batch", "4", "--min_batches", "20"]
    metric = ["--height", "48", "--width", "64", "--repeats", "3"]
    clip = ["--frames", "8", "--batch", "4", "--repeats", "2"]
  else:
    sizes, batches, repeats = [(480, 640), (1024, 1280)], [1, 32], "10"
    step = ["--repeats", "5"]
    pipe = []
    metric = ["--repeats", "20"]
    clip = []
  chosen = []
  for model in ("student", "teacher"):
    for height, width in sizes:
      for batch in batches:
        chosen.append((f"infer-{model}-{width}x{height}-b{batch}",
                       ["infer", "--model", model, "--height", str(height), "--width", str(width),
                        "--batch", str(batch), "--repeats", repeats]))
  chosen.append(("metrics", ["metrics", *metric]))
  chosen.append(("pipeline", ["pipeline", *pipe]))
  for height, width in sizes:  # decoded, fused, encoded (libx264): frames per second
    chosen.append((f"video-{width}x{height}",
                   ["video", "--height", str(height), "--width", str(width), *clip]))
  for model in ("student", "teacher"):
    for mode in precision.MODES:
      chosen.append((f"train-step-{model}-{mode}",
                     ["train-step", "--model", model, "--precision", mode, *step]))
  return chosen


def _figure(result: dict) -> str:
  """The headline number of a benchmark's result."""
  if "fps_encode" in result:
    return (f"{result['fps_fuse']:,.4g} frames/s decoded and fused, "
            f"{result['fps_encode']:,.4g} also encoded")
  for key, unit in (("ms_per_image", "ms per image"), ("ms_per_step", "ms per step"),
                    ("patches_per_s", "patches/s")):
    if key in result:
      return f"{result[key]:,.4g} {unit}"
  return ""


def to_markdown(report: dict) -> str:
  """The suite's results as one markdown table, headed by the device."""
  lines = [f"Device: {report['device']}; jax {report['jax']}; {report['date']}", "",
           "| item | result | seconds (incl. compilation) |", "|---|---|---|"]
  for item in report["items"]:
    result = _figure(item["result"]) if "result" in item else f"failed: {item['error']}"
    lines.append(f"| {item['name']} | {result} | {item['seconds']:.1f} |")
  return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
  parser = argparse.ArgumentParser(prog="bench.py")
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module in _BENCHMARKS:
    module.add_parser(subparsers)
  wanted = [w for w in args.only.split(",") if w]
  chosen = [(name, argv) for name, argv in items(args.reduced)
            if not wanted or any(name.startswith(w) for w in wanted)]
  if not chosen:
    raise SystemExit(f"error: --only {args.only!r} names no item of the suite")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = {"schema": SCHEMA_VERSION, "benchmark": "suite", "reduced": args.reduced,
            "device": common.device_description(), "jax": jax.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "items": []}
  for name, argv in chosen:
    start = time.perf_counter()
    item: dict[str, Any] = {"name": name, "argv": argv}  # a JSON record of the report
    try:
      sub = parser.parse_args(argv)
      item["result"] = sub.run(sub)
    # One failing item (out of memory, a benchmark's own error exit) must not lose the others.
    except (Exception, SystemExit) as e:
      item["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    item["seconds"] = time.perf_counter() - start
    report["items"].append(item)
    print(f"{name}: {_figure(item['result']) if 'result' in item else item['error']} "
          f"({item['seconds']:.0f} s)", flush=True)
    with files.atomic_write(out / "bench.json", "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    with files.atomic_write(out / "bench.md", "w") as f:
      f.write(to_markdown(report))
  failed = [item["name"] for item in report["items"] if "error" in item]
  return {"benchmark": "suite", "out": str(out), "items": len(report["items"]),
          "failed": failed}
