"""Multi-process training: 2 processes on this machine train exactly as 1 process on 2 devices.

`bin/train.py` runs as 2 processes (a localhost coordinator, one CPU device each, JAX's CPU
collectives) and, for reference, as 1 process with 2 (fake) CPU devices, on the same tiny
student run with the same seed: 8 patches of 32x32 in batches of 2, 2 epochs, distilled from a
random teacher through the teacher cache (each process keeps its own rows' targets), with both
refresh memories on (written in epoch 1, compared and refreshed in epoch 2). Perception and the
refresh losses are off: they need VGG-19, which would double the compile time and which the
processes use no differently from any other term. No validation (its metrics would compile in
every process of every launch).

One workdir, three launches of the pair: SIGTERM to process 1 alone as step 5 is dispatched
(both must stop after step 5, exit 143, and have saved step 5 together, equal to the reference's
step 5: params, Adam, memories, data position); SIGKILL to both as step 7 is dispatched (the
latest checkpoint is then step 6); a rerun that resumes and must end with the reference's
weights and final state.

Cost: the persistent compilation cache (conftest.py) serves process 0 and the 1-process run,
but JAX lets only process 0 write it and, on a CPU, process 1's programs have other cache keys:
process 1 compiles every program in every launch. So every run here computes the networks'
convolutions with XLA's own convolution (`conv_impl="xla"`, the default on accelerators; the
CPU default "planar" computes the same thing, and its train step compiles about 4x longer), and
XLA compiles without optimising the machine code (`--xla_backend_optimization_level=0`, 2x
faster to compile and fast enough to run 8 steps).
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmdrfuse_jax.train import distributed

# Every test here trains in subprocesses: the full suite only (`-m slow`).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8  # 8 patches, batch 2: 4 steps per epoch, 2 epochs.

_TINY = ["--config=configs/quickstart.py", "--config.data.synthetic_pairs=4",
         "--config.data.synthetic_height=32", "--config.data.synthetic_width=64",
         "--config.data.patch_size=32", "--config.data.patch_stride=32",
         "--config.batch_size=2", "--config.num_epochs=2", "--config.progress_bar=False",
         "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
         "--config.keep_checkpoints=10", "--config.loss.w_percep=0",
         "--config.loss.w_refresh=0", "--config.validation.synthetic_pairs=0"]

# Runs bin/train.py with XLA's convolution (see above) and, given $FAULT = "<signal>:<n>", sends
# this process that signal right after the n-th train step of this launch is dispatched
# (nothing in the library knows).
_DRIVER = textwrap.dedent("""
  import os, runpy, signal, sys
  from mmdrfuse_jax.models import networks
  from mmdrfuse_jax.train import update

  networks.resolve_conv_impl = lambda conv_impl: "xla"
  if os.environ.get("FAULT"):
    name, n = os.environ["FAULT"].split(":")
    make_train_step = update.make_train_step
    hits = 0

    def make_faulty_step(cfg, mesh):
      step = make_train_step(cfg, mesh)

      def faulty_step(*args):
        global hits
        outputs = step(*args)
        hits += 1
        if hits == int(n):
          os.kill(os.getpid(), getattr(signal, name))
        return outputs
      return faulty_step
    update.make_train_step = make_faulty_step
  sys.argv = ["bin/train.py", *sys.argv[1:]]
  runpy.run_path("bin/train.py", run_name="__main__")
""")


def _env(devices=1, fault=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  # No inherited distributed settings: the flags below say everything.
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  # Unoptimised machine code compiles 2x faster (every run here alike; see above).
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  if fault:
    env["FAULT"] = fault
  return env


def _start(workdir, teacher, *args, devices=1, process=None, port=None, fault=None):
  args = [*_TINY, f"--config.teacher_weights={teacher}", f"--workdir={workdir}", *args]
  if process is not None:
    args += [f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={process}"]
  return subprocess.Popen([sys.executable, "-c", _DRIVER, *args], cwd=REPO,
                          env=_env(devices, fault), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pair(workdir, teacher, faults=(None, None)):
  port = _free_port()  # A new one for every launch: a killed coordinator's port may linger.
  return [_start(workdir, teacher, process=i, port=port, fault=faults[i]) for i in (0, 1)]


def _finish(procs, timeout=600):
  """(return codes, outputs) of started processes."""
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in procs:
        other.kill()
      raise
    outputs.append(out)
  return [p.returncode for p in procs], outputs


def _state(workdir, step=None):
  """The train state saved at `step` (default: the latest) in `workdir`, as NumPy arrays.

  Restored onto this process's one device, whatever devices and processes wrote it.
  """
  directory = (pathlib.Path(workdir) / "student" / "checkpoints").resolve()
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step() if step is None else step
  metadata = ocp.StandardCheckpointer().metadata(directory / str(step) / "default")
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  # As float32 (exact); the memories' bfloat16 values are kept as uint16 bits.
  return step, jax.tree_util.tree_map(
      lambda x: x.view(jnp.bfloat16).astype(np.float32) if x.dtype == np.uint16
      else np.asarray(x, np.float32), jax.device_get(state))


def _assert_states_close(a, b):
  paths_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  paths_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(paths_a, paths_b):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, equal_nan=True,
                               err_msg=jax.tree_util.keystr(path))


def _weights(workdir):
  with np.load(pathlib.Path(workdir) / "student" / "student.npz") as data:
    return dict(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_file):
  """The reference and the two-process chain: (reference workdir, chain workdir, outputs).

  The reference (checkpointed at every step) runs beside the chain's first launch: process 0
  waits for process 1's compilations there, and leaves a core free.
  """
  one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
  reference = _start(one, teacher_file, "--config.checkpoint_every_steps=1", devices=2)
  # SIGTERM to process 1 alone, as step 5 is dispatched: both stop after step 5.
  stopped = _finish(_start_pair(two, teacher_file, faults=(None, "SIGTERM:5")))
  # SIGKILL to both as the rerun's second step (step 7) is dispatched: step 6 is the latest.
  killed = _finish(_start_pair(two, teacher_file, faults=("SIGKILL:2", "SIGKILL:2")))
  done = _finish(_start_pair(two, teacher_file))
  ref = _finish([reference])
  return one, two, {"reference": ref, "stopped": stopped, "killed": killed, "done": done}


def _check(result, codes):
  assert result[0] == codes, "\n".join(o[-3000:] for o in result[1])


def test_sigterm_to_one_process_stops_both_after_the_same_step(runs):
  _, _, results = runs
  _check(results["reference"], [0])
  _check(results["stopped"], [143, 143])
  log = results["stopped"][1][0]
  assert "over 2 device(s) of 2 processes" in log
  assert f"stopped at step 5/{STEPS} (signal {int(signal.SIGTERM)})" in log
  # Every process saved step 5 together (the killed rerun's kill came after it had resumed).
  assert "resumed from" in results["killed"][1][0] and "at step 5" in results["killed"][1][0]


def test_two_processes_train_as_one_process_on_two_devices(runs):
  one, two, _ = runs
  _, state_one = _state(one, 5)
  _, state_two = _state(two, 5)
  assert int(state_two["step"]) == 5 and int(state_two["epoch"]) == 1
  _assert_states_close(state_one, state_two)  # Params, Adam, memories, data position, step.
  for memory in state_two["memory"].values():  # Every slot written in epoch 1.
    assert not np.isnan(memory).any()


def test_killed_pair_resumes_and_ends_equal(runs):
  one, two, results = runs
  _check(results["killed"], [-signal.SIGKILL] * 2)
  _check(results["done"], [0, 0])
  # Step 7 was in flight: the rerun resumed from step 6, the latest checkpoint.
  assert "resumed from" in results["done"][1][0] and "at step 6" in results["done"][1][0]
  expected, got = _weights(one), _weights(two)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5, err_msg=key)
  step_one, state_one = _state(one)
  step_two, state_two = _state(two)
  assert step_one == step_two == STEPS
  _assert_states_close(state_one, state_two)


def test_process_zero_alone_logs(runs):
  _, two, results = runs
  process_0, process_1 = results["done"][1]
  for step in (7, 8):
    assert f"step {step}/{STEPS}" in process_0 and f"step {step}/{STEPS}" not in process_1
  assert "done:" in process_0 and "done:" not in process_1
  # One writer: each step logged once (rows after a checkpoint a run resumes from are dropped).
  steps = [json.loads(row)["step"] for row in
           (two / "student" / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))


_SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("mode, flags, environ, expected", [
    # Nothing given, no launcher: one process, as always.
    ("auto", {}, {}, None),
    ("auto", {}, {**_SLURM, "SLURM_NTASKS": "1"}, None),  # A one-task SLURM job.
    # Flags, the environment, or a launcher of several tasks (JAX fills in the rest).
    ("auto", dict(coordinator_address="h:1", num_processes=2, process_id=1), {},
     dict(coordinator_address="h:1", num_processes=2, process_id=1)),
    ("auto", {}, {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4",
                  "JAX_PROCESS_ID": "3"},
     dict(coordinator_address="h:2", num_processes=4, process_id=3)),
    ("auto", dict(process_id=0), {"JAX_PROCESS_ID": "3", "JAX_NUM_PROCESSES": "4"},
     dict(coordinator_address=None, num_processes=4, process_id=0)),  # The flag wins.
    ("auto", {}, _SLURM, dict(coordinator_address=None, num_processes=None, process_id=None)),
    ("auto", {}, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"},
     dict(coordinator_address=None, num_processes=None, process_id=None)),
    ("on", {}, {}, dict(coordinator_address=None, num_processes=None, process_id=None)),
    ("off", dict(num_processes=2), _SLURM, None),
])
def test_distributed_settings(mode, flags, environ, expected):
  assert distributed.settings(mode, environ=environ, **flags) == expected


@pytest.mark.parametrize("flags, environ, message", [
    (dict(num_processes=2, process_id=2), {}, "--process_id must be in 0..1, got 2"),
    (dict(num_processes=0), {}, "--num_processes must be at least 1"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer, got 'two'"),
])
def test_unusable_distributed_settings(flags, environ, message):
  with pytest.raises(distributed.UsageError, match=message):
    distributed.settings(environ=environ, **flags)


def test_cli_distributed_mistakes_are_one_line(tmp_path, teacher_file):
  # Too few settings for JAX to start (no coordinator, no cluster): exit 2 before any work.
  proc = subprocess.run(
      [sys.executable, "bin/train.py", *_TINY, f"--config.teacher_weights={teacher_file}",
       f"--workdir={tmp_path}", "--num_processes=2", "--process_id=1"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "cannot start a distributed run" in errors[0], proc.stderr[-2000:]
  assert "--coordinator_address" in errors[0]
  assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())
