"""`bench.py suite --out DIR`: every benchmark in one prepared run, for a short GPU rental.

Runs inference (student and teacher; 640x480 and 1280x1024; batch 1 and 32), the metrics,
the patch pipeline, video fusion (640x480 and 1280x1024: decoded and fused, and encoded too)
and the training step (student and teacher; each precision mode; the student's also with the
teacher in the step), one after another in this process, and writes `DIR/bench.json` (every
result, with the device, the jax version and the date) and `DIR/bench.md` (one table). Each
result is also written as soon as it is measured, so an interrupted suite keeps what it
finished. `--reduced` runs the same items at tiny sizes (for a CPU, and for the tests);
`--only` picks items by name.

Where PyTorch is installed (the `bench` extra), the suite ends with the PyTorch baseline
(`torch_baseline`, items `torch-*`): the student's inference at both sizes, the teacher's at
640x480 and the student's train step (batch 25 of 128x128, teacher in the step), eager and
through `torch.compile`, each printed beside the JAX item that does the same work, with the
ratio of the times (`torch_baseline` in bench.json, a second table in bench.md). Without
PyTorch those items are skipped with one line.
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

from mmdrfuse_jax.benchmarks import (
  common,
  infer,
  metrics,
  pipeline,
  torch_baseline,
  train_step,
  video,
)
from mmdrfuse_jax.io import files
from mmdrfuse_jax.models import precision

SCHEMA_VERSION = 1
_BENCHMARKS = (infer, metrics, pipeline, train_step, video, torch_baseline)
TORCH_PREFIX = "torch-"  # The PyTorch baseline's items.


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
  for height, width in sizes:  # uint8 in, the min-max stretch to uint8 on the device
    chosen.append((f"infer-student-{width}x{height}-8bit-b1",
                   ["infer", "--model", "student", "--height", str(height), "--width", str(width),
                    "--levels", "8", "--repeats", repeats]))
  chosen.append(("metrics", ["metrics", *metric]))
  chosen.append(("pipeline", ["pipeline", *pipe]))
  for height, width in sizes:  # decoded, fused, encoded (libx264): frames per second
    chosen.append((f"video-{width}x{height}",
                   ["video", "--height", str(height), "--width", str(width), *clip]))
  for model in ("student", "teacher"):
    for mode in precision.MODES:
      chosen.append((f"train-step-{model}-{mode}",
                     ["train-step", "--model", model, "--precision", mode, *step]))
  # The work of the PyTorch baseline's step (the published code's: the teacher in every step).
  chosen.append(("train-step-student-teacher-in-step",
                 ["train-step", "--model", "student", "--precision", "exact", "--teacher_in_step",
                  *step]))
  # The PyTorch baseline last, each beside the JAX item above that does the same work.
  for workload in torch_baseline.workloads(reduced):
    chosen.append((TORCH_PREFIX + workload.name,
                   ["torch-baseline", "--only", workload.name, "--precision", "exact",
                    *(["--reduced"] if reduced else [])]))
  return chosen


def _torch_figure(result: dict, mode: str) -> str:
  """One PyTorch figure of a workload's result: the time, or why it is missing."""
  ms = torch_baseline.figure(result, mode)
  if ms is not None:
    return f"{ms:,.4g} ms"
  return str(result.get(mode, {}).get("skipped", "not measured"))


def _figure(result: dict) -> str:
  """The headline number of a benchmark's result."""
  if result.get("benchmark") == "torch-baseline":
    return "; ".join(
        f"{w['name']}: eager {_torch_figure(w, 'eager')}, compiled {_torch_figure(w, 'compiled')}"
        f" per {'image' if w['kind'] == 'infer' else 'step'}" for w in result["workloads"])
  if "fps_encode" in result:
    return (f"{result['fps_fuse']:,.4g} frames/s decoded and fused, "
            f"{result['fps_encode']:,.4g} also encoded")
  if "bound_ms_per_image" in result:  # Fusion beside its memory bound (infer.py).
    held = result.get("device_bytes_per_image")
    memory = "" if held is None else f", {held / 2**20:,.3g} MiB per image"
    host = result.get("float_then_host_quantize_ms_per_image")
    host = "" if host is None else f"; float path, then quantized on the host: {host:,.4g} ms"
    return (f"{result['ms_per_image']:,.4g} ms per image ({result['images_per_second']:,.4g} "
            f"images/s{memory}; memory bound {result['bound_ms_per_image']:,.3g} ms, "
            f"{result['times_the_bound']:.3g}x{host})")
  for key, unit in (("ms_per_image", "ms per image"), ("ms_per_step", "ms per step"),
                    ("patches_per_s", "patches/s")):
    if key in result:
      return f"{result[key]:,.4g} {unit}"
  return ""


def torch_comparisons(report: dict) -> list[dict]:
  """Each measured PyTorch workload beside the JAX item that does the same work.

  Returns:
    One dict per workload: `workload`, `unit` (ms per image or per step), `jax_item`, `jax`
    (None where that item was not run or failed), `torch_eager`, `torch_compiled` (None where
    skipped; `compiled_skipped` says why) and the ratios `eager_over_jax` and
    `compiled_over_jax` (PyTorch's time over JAX's: above 1, JAX is faster).
  """
  jax_results = {item["name"]: item["result"] for item in report["items"] if "result" in item}
  rows = []
  for item in report["items"]:
    result = item.get("result", {})
    if result.get("benchmark") != "torch-baseline":
      continue
    for workload in result["workloads"]:
      jax_result = jax_results.get(workload["jax_item"], {})
      unit = "ms per image" if workload["kind"] == "infer" else "ms per step"
      jax_ms = jax_result.get("ms_per_image" if workload["kind"] == "infer" else "ms_per_step")
      eager = torch_baseline.figure(workload, "eager")
      compiled = torch_baseline.figure(workload, "compiled")
      row = {"workload": workload["name"], "unit": unit, "jax_item": workload["jax_item"],
             "jax": jax_ms, "torch_eager": eager, "torch_compiled": compiled,
             "eager_over_jax": torch_baseline.ratio(eager, jax_ms),
             "compiled_over_jax": torch_baseline.ratio(compiled, jax_ms)}
      if compiled is None:
        row["compiled_skipped"] = _torch_figure(workload, "compiled")
      rows.append(row)
  return rows


def _comparison_text(row: dict) -> str:
  """One line: the JAX figure, then each PyTorch figure with its ratio."""
  def fig(value):
    return "not run" if value is None else f"{value:,.4g} {row['unit']}"

  def torch_fig(value, over, skipped=""):
    if value is None:
      return skipped or "not measured"
    return fig(value) + ("" if over is None else f" ({over:.3g}x JAX's time)")

  compiled = torch_fig(row["torch_compiled"], row["compiled_over_jax"],
                       row.get("compiled_skipped", ""))
  return (f"JAX {fig(row['jax'])} ({row['jax_item']}); PyTorch eager "
          f"{torch_fig(row['torch_eager'], row['eager_over_jax'])}, compiled {compiled}")


def _platform(device: str) -> str:
  """"cpu", "gpu" or "tpu" from a JAX or PyTorch device description ("cuda: ..." is a GPU)."""
  name = device.split()[0].rstrip(":")
  return "gpu" if name == "cuda" else name


def to_markdown(report: dict) -> str:
  """The suite's results as one markdown table, headed by the device; then the PyTorch
  baseline beside JAX (or the line that says why it was skipped)."""
  lines = [f"Device: {report['device']}; jax {report['jax']}; {report['date']}", "",
           "| item | result | seconds (incl. compilation) |", "|---|---|---|"]
  for item in report["items"]:
    result = _figure(item["result"]) if "result" in item else f"failed: {item['error']}"
    lines.append(f"| {item['name']} | {result} | {item['seconds']:.1f} |")
  baseline = report.get("torch_baseline")
  if baseline and "skipped" in baseline:
    lines += ["", f"PyTorch baseline skipped: {baseline['skipped']}."]
  elif baseline and baseline["comparisons"]:
    tf32 = "no TF32" if baseline["precision"] == "exact" else "PyTorch's default TF32 settings"
    lines += ["", f"PyTorch baseline ({baseline['device']}; torch {baseline['torch']}; "
              f"float32, {tf32}). Ratio: PyTorch's time over JAX's (above 1: JAX is faster).",
              *([f"Note: JAX ran on {report['device']}, PyTorch on {baseline['device']}: the "
                 "ratios compare different devices (a CPU-only torch beside a GPU jax?)."]
                if _platform(report["device"]) != _platform(baseline["device"]) else []),
              "", "| workload | JAX | PyTorch eager | eager / JAX | PyTorch compiled | "
              "compiled / JAX |", "|---|---|---|---|---|---|"]

    def cell(value, fmt="{:,.4g}"):
      return "" if value is None else fmt.format(value)

    for row in baseline["comparisons"]:
      compiled = cell(row["torch_compiled"]) or row.get("compiled_skipped", "").replace("|", "/")
      lines.append(f"| {row['workload']} ({row['unit']}) | {cell(row['jax']) or 'not run'} "
                   f"({row['jax_item']}) | {cell(row['torch_eager'])} | "
                   f"{cell(row['eager_over_jax'], '{:.3g}')} | {compiled} | "
                   f"{cell(row['compiled_over_jax'], '{:.3g}')} |")
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
  report: dict[str, Any] = {
      "schema": SCHEMA_VERSION, "benchmark": "suite", "reduced": args.reduced,
      "device": common.device_description(), "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "items": []}
  if any(name.startswith(TORCH_PREFIX) for name, _ in chosen):
    if torch_baseline.available():
      report["torch_baseline"] = {"comparisons": []}
    else:
      chosen = [(name, argv) for name, argv in chosen if not name.startswith(TORCH_PREFIX)]
      report["torch_baseline"] = {"skipped": torch_baseline.MISSING}
      print(f"PyTorch baseline skipped: {torch_baseline.MISSING}", flush=True)

  def write() -> None:
    with files.atomic_write(out / "bench.json", "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)
    with files.atomic_write(out / "bench.md", "w") as f:
      f.write(to_markdown(report))

  write()  # Whatever is measured, a report exists (if only the skip).
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
    if "result" in item and item["result"].get("benchmark") == "torch-baseline":
      baseline = report["torch_baseline"]
      baseline.update({key: item["result"][key] for key in ("torch", "device", "precision")},
                      comparisons=torch_comparisons(report))
      for row in baseline["comparisons"]:
        if row["workload"] in {w["name"] for w in item["result"]["workloads"]}:
          print(f"  {row['workload']}: {_comparison_text(row)}", flush=True)
    write()
  failed = [item["name"] for item in report["items"] if "error" in item]
  return {"benchmark": "suite", "out": str(out), "items": len(report["items"]),
          "failed": failed}
