"""Stopping jobs cleanly on SIGTERM/SIGINT.

A job of many units (training steps, images) checks `StopRequest.signum` between units and
finishes what it must (a checkpoint, the current file) before it returns; a second signal
stops at once (KeyboardInterrupt). A job that is one indivisible unit (converting a weights
file, building a dataset) runs inside `raise_on_signals()`, which turns either signal into an
`Interrupted` exception, so its temporary files are removed as the exception unwinds.
Command-line tools then exit with the shell's code for the signal, `128 + signum` (130 for
SIGINT, 143 for SIGTERM). Until a tool enters either, the start-up guard of `startup` handles
the signals; entering takes over from it, and leaving restores the handlers from before it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from mmdrfuse_jax.runtime import startup

SIGINT_EXIT_CODE = 128 + signal.SIGINT  # 130: also the exit code after a KeyboardInterrupt.


def exit_code(signum: int) -> int:
  """The shell's exit code for a process stopped by signal `signum` (128 + signum)."""
  return 128 + int(signum)


def signal_name(signum: int) -> str:
  """'SIGINT', 'SIGTERM', ..."""
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


class StopRequest:
  """Context manager that turns SIGTERM/SIGINT into a flag (`signum`) checked between items.

  Only installs its handlers in the main thread (Python allows no others); elsewhere it is a
  flag that never turns on.
  """

  def __init__(self):
    self.signum: int | None = None
    self._old = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = startup.handed_over(sig, signal.signal(sig, self._handle))
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # A second signal: stop now.
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Interrupted(BaseException):
  """SIGTERM or SIGINT arrived inside `raise_on_signals()` (a BaseException, like KeyboardInterrupt,
  so that `except Exception` clean-up code does not swallow it)."""

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.signum = signum


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
  """Within the block, SIGTERM and SIGINT raise `Interrupted` (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    raise Interrupted(signum)

  old = {sig: startup.handed_over(sig, signal.signal(sig, handle))
         for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)
