"""Timing helpers shared by the benchmarks.

Every benchmark reports the median of repeated runs after compilation, with device work
finished (`jax.block_until_ready`), and names the device it ran on.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable

import jax


def device_description() -> str:
  """A human-readable name of the default device (with the CPU core count on CPU)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    import os

    return f"cpu ({os.cpu_count()} cores, {len(jax.devices())} jax device(s))"
  return f"{dev.platform}: {dev.device_kind} x{len(jax.devices())}"


def time_call(fn: Callable[[], Any], *, repeats: int = 10, warmup: int = 2,
              min_seconds: float = 0.0) -> dict:
  """Times `fn()` (which returns JAX arrays) after `warmup` calls that absorb compilation.

  Args:
    fn: a zero-argument callable whose result is blocked on.
    repeats: at least this many timed runs.
    warmup: untimed runs first (the first one compiles).
    min_seconds: keep running past `repeats` until this much time has been measured.

  Returns:
    A dict with `median_s`, `min_s`, `runs`.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times: list[float] = []
  while len(times) < repeats or sum(times) < min_seconds:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


# Trace events that wrap others (a whole executable, a wait) rather than being one operation.
_WRAPPER_EVENTS = ("ThunkExecutor", "PjitFunction", "PjRtCpuClient", "Execute")


def profile_operations(fn: Callable[[], Any], trace_dir: str, *, calls: int = 3,
                       count: int = 12) -> list[dict[str, Any]]:
  """The operations that take the most time in `calls` runs of `fn`, from a profiler trace.

  `fn` should be compiled already (call it once before). The trace (`jax.profiler`, written
  under `trace_dir`, viewable in TensorBoard or Perfetto) is read back with
  `jax.profiler.ProfileData`; the durations of each XLA operation (a fusion, a convolution,
  a copy) are summed over the threads that ran it.

  Returns:
    Up to `count` rows, largest first: `name`, `ms_per_call` (summed over threads, so the
    rows can add up to more than the wall time on several cores) and `share` of the summed
    operation time.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top

  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(calls):
      jax.block_until_ready(fn())
  finally:
    jax.profiler.stop_trace()
  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    return []
  totals: collections.Counter = collections.Counter()
  data = jax.profiler.ProfileData.from_file(paths[-1])
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python" or "XLA" not in line.name:
        continue  # XLA's operations run on its own threads (tf_XLA*).
      for event in line.events:
        if not any(w in event.name for w in _WRAPPER_EVENTS):
          totals[event.name] += event.duration_ns
  whole = sum(totals.values()) or 1
  return [{"name": name, "ms_per_call": ns / 1e6 / calls, "share": ns / whole}
          for name, ns in totals.most_common(count)]


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (`ru_maxrss`), in bytes."""
  import resource  # pylint: disable=g-import-not-at-top

  # Linux reports kibibytes, macOS bytes.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                else 1024)


def print_result(result: dict) -> None:
  """Prints a benchmark's result as the last line: one JSON object, with the device."""
  result = dict(result)
  result.setdefault("device", device_description())
  print(json.dumps(result, sort_keys=True))
