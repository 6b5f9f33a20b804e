"""The start-up signal guard (`runtime.startup`), in this process.

A tool's process gets it from `mmdrfuse_jax.tools` (tests/tools/test_startup_signals.py); here
it is installed by hand, and must leave the handlers exactly as they were.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import mmdrfuse_jax.tools  # noqa: F401  (imported by a test process: no guard)
from mmdrfuse_jax.runtime import interrupts, startup

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handlers():
  return {sig: signal.getsignal(sig) for sig in SIGNALS}


def test_importing_the_tools_in_a_test_process_installs_nothing():
  assert not startup.installed()
  assert signal.getsignal(signal.SIGINT) is not startup._handle  # pylint: disable=protected-access


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_inside_the_guard_is_one_line_and_the_exit_code(sig, capsys):
  before, hook = _handlers(), sys.unraisablehook
  with pytest.raises(SystemExit) as exit_info:
    with startup.guard():
      assert startup.installed()
      os.kill(os.getpid(), sig)  # its handler runs as this call returns
      pytest.fail("the guard let the signal pass")
  assert exit_info.value.code == 128 + sig
  assert capsys.readouterr().err == f"stopped by {signal.Signals(sig).name} while starting\n"
  assert _handlers() == before and not startup.installed()
  assert sys.unraisablehook is hook


# Where Python cannot raise the guard's SystemExit (here a gc callback, as jax registers one), it
# reports it as "Exception ignored" and carries on: the guard then exits at once.
_SIGNAL_IN_A_GC_CALLBACK = textwrap.dedent("""
    import gc, os, signal, sys, time
    from mmdrfuse_jax.runtime import startup
    def signal_once(phase, info):
      gc.callbacks.remove(signal_once)
      os.kill(os.getpid(), int(sys.argv[1]))  # the handler runs before this callback returns
    with startup.guard():
      gc.callbacks.append(signal_once)
      gc.collect()
      time.sleep(5)
    print("carried on")
    """)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_the_interpreter_cannot_raise_still_stops(sig):
  run = subprocess.run([sys.executable, "-c", _SIGNAL_IN_A_GC_CALLBACK, str(int(sig))],
                       capture_output=True, text=True, timeout=60)
  assert (run.returncode, run.stdout, run.stderr) == (
      128 + sig, "", f"stopped by {signal.Signals(sig).name} while starting\n")


# A signal while an extension module initialises: an exception raised there crossed jaxlib._jax's
# C++ (nanobind, importing numpy), which then aborted or crashed the process (exit -6 or -11, a
# few times in a hundred under load; not reproducible on demand). The guard leaves at once
# instead, no `finally` runs: shown here with the standard library's _decimal, whose
# initialisation imports `numbers` (raised into, the SystemExit would unwind and print).
_SIGNAL_IN_A_NATIVE_INIT = textwrap.dedent("""
    import importlib.machinery, os, sys
    from mmdrfuse_jax.runtime import startup

    class SignalInsideANativeInit:
      def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None:
          if isinstance(frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader):
            sys.meta_path.remove(self)
            print(f"signalled importing {name}", flush=True)
            os.kill(os.getpid(), int(sys.argv[1]))
          frame = frame.f_back

    with startup.guard():
      sys.meta_path.insert(0, SignalInsideANativeInit())
      try:
        import decimal
      finally:
        print("unwound")
    """)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_inside_a_native_module_init_leaves_at_once(sig):
  run = subprocess.run([sys.executable, "-c", _SIGNAL_IN_A_NATIVE_INIT, str(int(sig))],
                       capture_output=True, text=True, timeout=60)
  assert run.stdout.startswith("signalled importing "), (run.stdout, run.stderr[-2000:])
  assert (run.returncode, run.stdout.splitlines()[1:], run.stderr) == (
      128 + sig, [], f"stopped by {signal.Signals(sig).name} while starting\n")


@pytest.mark.parametrize("takes_over", [interrupts.StopRequest, interrupts.raise_on_signals])
def test_a_tools_own_handling_ends_the_guard_and_restores_what_was_before(takes_over):
  before = _handlers()
  with startup.guard():
    with takes_over():
      assert not startup.installed()
    # Restored: the handlers from before the guard, not the guard's.
    assert _handlers() == before and not startup.installed()
  assert _handlers() == before


def test_handlers_a_program_chose_are_kept():
  old = signal.signal(signal.SIGTERM, lambda signum, frame: None)
  try:
    with startup.guard():
      assert signal.getsignal(signal.SIGINT) is startup._handle  # pylint: disable=protected-access
      assert signal.getsignal(signal.SIGTERM) is not startup._handle  # pylint: disable=protected-access
  finally:
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("argv, orig_argv, expected", [
    (["bin/fuse_video.py", "--ir", "x"], None, True),
    (["/venv/bin/mmdrfuse-fuse-video"], None, True),
    (["-m"], ["python", "-X", "importtime", "-m", "mmdrfuse_jax.tools.train", "--x"], True),
    (["-m"], ["python", "-mmmdrfuse_jax.tools.fuse"], True),
    (["-m"], ["python", "-m", "pytest"], False),
    (["/venv/bin/pytest"], None, False),
    (["-c"], None, False),
    (["my_job.py"], None, False),
    (["bin/not_a_tool.py"], None, False),
    (["/venv/bin/mmdrfuse-nothing"], None, False),
    ([], None, False),
])
def test_which_processes_are_started_to_run_a_tool(argv, orig_argv, expected, monkeypatch,
                                                   tmp_path):
  monkeypatch.chdir(tmp_path)  # bin/NAME.py: a shim where its folder is named bin
  (tmp_path / "bin").mkdir()
  tools = ["evaluate", "fuse", "fuse_video", "train"]
  assert startup.started_as_tool(tools, argv, orig_argv or ["python"]) == expected
