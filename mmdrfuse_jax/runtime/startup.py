"""Signals while a command-line tool starts: one line and the signal's exit code, no traceback.

A tool spends its first seconds importing jax and the libraries it needs, before it installs
its own handling of SIGINT and SIGTERM (`interrupts.StopRequest`, `interrupts.raise_on_signals`);
a Ctrl-C there used to print a KeyboardInterrupt traceback of some 30 lines. The guard covers
that time: SIGINT or SIGTERM prints `stopped by SIGINT while starting` (or SIGTERM) on stderr
and exits with 128 + the signal's number (130, 143) by raising SystemExit, so that clean-up
(`finally` blocks, temporary files) still runs, then skips the interpreter's finalization
(`os._exit` from atexit); a second signal meanwhile exits at once. Where
Python cannot raise that SystemExit (the handler ran inside a garbage-collector callback, such as
jax's, or a `__del__`: Python reports it as "Exception ignored" and carries on), or should not
(an extension module is initialising: jaxlib's C++ aborted or crashed when the SystemExit crossed
it), the process exits at once, with the same code.

`mmdrfuse_jax.tools` installs the guard when it is imported by a process started to run a tool
(`started_as_tool`: a `bin/` shim, a `mmdrfuse-*` console script, `python -m
mmdrfuse_jax.tools.NAME`), before the tool's own imports; never in a process that merely imports
a tool (tests calling `main(argv)`, notebooks), whose handlers stay as they are. The guard ends
when the tool installs its own handling: `interrupts` asks `handed_over` what to restore once it
is done, and gets the handlers the guard replaced, not the guard's. A tool that never installs
any keeps the guard until its process ends.

Only stdlib imports here: the guard must be in place before anything slow is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import os
import pathlib
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

# What the guard may replace: Python's own default for each signal (not a handler a program
# chose, nor SIG_IGN, which e.g. a shell gives background jobs for SIGINT).
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

# The handlers the guard replaced, by signal, while it is installed.
_replaced: dict[int, Any] = {}
_raised: Optional[SystemExit] = None  # set when a guarded signal arrived: unwinding
_hook: Optional[Callable[[Any], None]] = None  # the sys.unraisablehook the guard then replaced


def _handle(signum: int, frame: Any) -> None:
  """The guard: one line on stderr, then SystemExit(128 + signum)."""
  global _raised, _hook
  code = 128 + int(signum)
  if _raised is not None:  # A second signal while the first unwinds (a slow clean-up): stop now.
    os._exit(code)
  try:
    name = signal.Signals(signum).name
  except ValueError:
    name = f"signal {signum}"
  with contextlib.suppress(Exception):  # stderr closed: the exit code still says it
    sys.stderr.write(f"stopped by {name} while starting\n")
    sys.stderr.flush()
  if _inside_a_native_module_init(frame):
    # An exception raised here would cross C++ that calls back into Python while it builds a
    # module (jaxlib._jax imports numpy through nanobind) and does not expect one: the process
    # then aborts or crashes (exit -6 or -11, a few times in a hundred under load). Nothing of
    # ours needs unwinding in the middle of an import: leave now.
    _leave(code)
  _raised = SystemExit(code)
  _hook = previous = sys.unraisablehook

  def unraisable(report: Any) -> None:
    # Python could not raise it here (a gc callback, a __del__): it would carry on otherwise.
    if report.exc_value is _raised:
      os._exit(code)
    previous(report)

  sys.unraisablehook = unraisable
  # Once the `finally` blocks have run, leave without the interpreter's finalization: a
  # native module interrupted half-imported (jaxlib) can crash while it is torn down, which
  # turned the exit code into -11 (SIGSEGV) once in CI. atexit runs the last-registered first.
  atexit.register(_leave, code)
  raise _raised


def _inside_a_native_module_init(frame: Any) -> bool:
  """Whether `frame` runs inside the initialisation of an extension module (its `PyInit_*`)."""
  while frame is not None:
    if (frame.f_code.co_name in ("create_module", "exec_module")
        and isinstance(frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader)):
      return True
    frame = frame.f_back
  return False


def _leave(code: int) -> None:
  """Exits at once with `code`, after flushing what the clean-up wrote (os._exit does not)."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):  # A stream closed or replaced: nothing to keep.
      stream.flush()
  os._exit(code)


def install() -> bool:
  """Installs the guard for SIGINT and SIGTERM where they still have Python's default handling.

  Only in the main thread (Python allows handlers nowhere else); installing it again changes
  nothing.

  Returns:
    Whether the guard is installed (for at least one of the two signals).
  """
  global _raised
  if threading.current_thread() is not threading.main_thread():
    return False
  if not _replaced:
    _raised = None
  for sig, default in _DEFAULTS.items():
    if sig not in _replaced and signal.getsignal(sig) is default:
      _replaced[sig] = signal.signal(sig, _handle)
  return bool(_replaced)


def uninstall() -> None:
  """Removes the guard, restoring the handlers it replaced where it is still the handler (and
  the `sys.unraisablehook` it replaced when a signal came)."""
  global _hook
  if threading.current_thread() is not threading.main_thread():
    return
  if _hook is not None:
    sys.unraisablehook, _hook = _hook, None
  for sig in list(_replaced):
    handler = _replaced.pop(sig)
    if signal.getsignal(sig) is _handle:
      signal.signal(sig, handler)


def installed() -> bool:
  """Whether the guard handles SIGINT or SIGTERM now."""
  return any(signal.getsignal(sig) is _handle for sig in _replaced)


def handed_over(signum: int, handler: Any) -> Any:
  """What to restore, once done, in place of `handler`, which a tool's own handling replaced.

  Where `handler` is the guard's, the start-up is over for `signum`: the handler the guard had
  replaced is returned (and the guard forgets it); any other `handler` is returned as it is.
  """
  if handler is _handle and signum in _replaced:
    return _replaced.pop(signum)
  return handler


@contextlib.contextmanager
def guard() -> Iterator[None]:
  """The guard within a block (for a program's own start-up code); removed after it, unless it
  was installed before."""
  already = bool(_replaced)
  install()
  try:
    yield
  finally:
    if not already:
      uninstall()


def started_as_tool(tools: Iterable[str], argv: Optional[Sequence[str]] = None,
                    orig_argv: Optional[Sequence[str]] = None) -> bool:
  """Whether this process was started to run one of the command-line tools.

  Args:
    tools: the tools' module names in `mmdrfuse_jax.tools` ("fuse_video", ...).
    argv: `sys.argv` by default. Its first item is the program: a `bin/NAME.py` shim, or a
      console script `mmdrfuse-NAME` (`.exe`, `-script.py` on Windows); "-m" while `python -m`
      imports the packages of its module.
    orig_argv: `sys.orig_argv` by default: the interpreter's own arguments, where `python -m`
      names its module.
  """
  argv = sys.argv if argv is None else argv
  orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
  tools = set(tools)
  program = argv[0] if argv else ""
  if program == "-m":
    for index, arg in enumerate(orig_argv[1:], start=1):
      if arg.startswith("-m"):
        module = arg[2:] or (orig_argv[index + 1] if index + 1 < len(orig_argv) else "")
        package, _, name = module.rpartition(".")
        return package == "mmdrfuse_jax.tools" and name in tools
    return False
  path = pathlib.Path(program)
  name = path.name.lower()
  for suffix in (".exe", "-script.py", "-script.pyw"):
    name = name.removesuffix(suffix)
  if name.startswith("mmdrfuse-"):
    return name.removeprefix("mmdrfuse-").replace("-", "_") in tools
  if path.suffix == ".py" and path.stem in tools:
    with contextlib.suppress(OSError):
      return path.resolve().parent.name == "bin"
  return False
