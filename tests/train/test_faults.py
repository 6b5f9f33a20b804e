"""Training survives SIGKILL: a killed run, rerun, ends with bit-identical weights.

The quickstart (teacher stage, then student stage), at tiny sizes, is killed with SIGKILL at
five points: inside a teacher step, while a teacher checkpoint's arrays are being committed,
between the two stages, while a student checkpoint is being committed, and while the
student's final weights file is being renamed into place. The kills are chained in one
workdir (each rerun resumes from what the previous kill left) and the final teacher and
student weights must equal, bit for bit, those of a run that was never interrupted.

A kill point is injected by a small driver that wraps a library function or `os.rename` /
`os.replace` and sends SIGKILL to its own process on the n-th hit; nothing in the library
knows about it. All runs share the test session's persistent XLA compilation cache, so only
the first one compiles.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mmdrfuse_jax.models import networks, weight_files

# Every test here trains in subprocesses: the full suite only (`-m slow`).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]

# 4 patches of 32x32, batch 2: the teacher trains 1 epoch of 2 steps with a checkpoint after
# each, the student 2 epochs (the second uses the refresh memories) with a checkpoint every 2.
_TINY = ["--config.data.synthetic_pairs=2", "--config.data.synthetic_height=32",
         "--config.data.synthetic_width=64", "--config.data.patch_size=32",
         "--config.data.patch_stride=32", "--config.progress_bar=False",
         "--config.batch_size=2", "--config.num_epochs=2", "--config.checkpoint_every_steps=2",
         "--config.log_every_steps=2",
         "--config.teacher_stage.batch_size=2", "--config.teacher_stage.num_epochs=1",
         "--config.teacher_stage.checkpoint_every_steps=1",
         "--config.teacher_stage.log_every_steps=1",
         # The teacher stage without the terms that need VGG-19 (a cheaper step to compile);
         # the student stage keeps every term and both refresh memories.
         "--config.teacher_stage.loss.w_percep=0", "--config.teacher_stage.refresh.ssim=False",
         "--config.teacher_stage.refresh.gmsd=False",
         # The quickstart's validation (2 procedural pairs, every 8 steps and at the end, the
         # best VIF kept), on smaller pairs.
         "--config.validation.synthetic_height=48", "--config.validation.synthetic_width=48"]

# Runs bin/train.py in this process after installing the kill point named by $FAULT:
# "<point>:<n>" kills on the n-th hit of <point>.
_DRIVER = textwrap.dedent("""
  import os, re, runpy, signal, sys

  point, n = os.environ["FAULT"].split(":")
  hits = 0

  def hit():
    global hits
    hits += 1
    if hits == int(n):
      os.kill(os.getpid(), signal.SIGKILL)

  if point in ("teacher_step", "student_step"):  # Killed while a step is in flight.
    from mmdrfuse_jax.train import update
    make_train_step = update.make_train_step

    def make_faulty_step(cfg, mesh):
      step = make_train_step(cfg, mesh)
      if cfg.model != point.split("_")[0]:
        return step

      def faulty_step(*args):
        outputs = step(*args)  # Dispatched, not finished: the kill lands inside the step.
        hit()
        return outputs
      return faulty_step
    update.make_train_step = make_faulty_step
  elif point == "stage":  # Killed as a stage starts.
    from mmdrfuse_jax.train import loop
    train_model = loop.train_model

    def faulty_train_model(*args, **kwargs):
      hit()
      return train_model(*args, **kwargs)
    loop.train_model = faulty_train_model
  else:  # Killed as a file or folder matching the pattern is renamed into place.
    pattern = re.compile(dict(
        teacher_arrays=r"teacher/checkpoints/\\d+\\.orbax-checkpoint-tmp/default$",
        student_commit=r"student/checkpoints/\\d+$",
        student_weights=r"student/student\\.npz$")[point])
    for name in ("rename", "replace"):
      original = getattr(os, name)

      def faulty(src, dst, *args, _original=original, **kwargs):
        if pattern.search(os.fspath(dst)):
          hit()
        return _original(src, dst, *args, **kwargs)
      setattr(os, name, faulty)

  sys.argv = ["bin/train.py", *sys.argv[1:]]
  runpy.run_path("bin/train.py", run_name="__main__")
""")

# (kill point, hit number): each is reached by the rerun after the previous kill.
_KILLS = [
    ("teacher_step", 2),  # Teacher step 2 in flight; the step-1 checkpoint is the latest.
    ("teacher_arrays", 1),  # Step 2's arrays written, the checkpoint not committed.
    ("stage", 2),  # Teacher finished (teacher.npz written), the student stage not started.
    ("student_commit", 1),  # Student step 2's checkpoint complete but not renamed into place.
    ("student_weights", 1),  # student.npz written under its temporary name, not renamed.
]


def _train(workdir, fault=None):
  # The runs share the test session's persistent compilation cache (see conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  args = ["bin/train.py", "--config=configs/quickstart.py", f"--workdir={workdir}", *_TINY]
  if fault is not None:
    env["FAULT"] = f"{fault[0]}:{fault[1]}"
    args = ["-c", _DRIVER, *args[1:]]
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _weights(path):
  with np.load(path, allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout + proc.stderr


def test_quickstart_trains_teacher_then_student(uninterrupted):
  workdir, output = uninterrupted
  assert "RANDOM VGG-19" in output
  assert "== stage 1/2: teacher" in output and "== stage 2/2: student" in output
  assert weight_files.load_params(workdir / "teacher" / "teacher.npz", "teacher")
  student = weight_files.load_params(workdir / "student" / "student.npz", "student")
  assert networks.count_params(student) == 113


def test_quickstart_logs_validation_scalars_and_images(uninterrupted):
  workdir, output = uninterrupted
  for stage, steps in (("teacher", [2]), ("student", [4])):  # Only at the end: 2 and 4 < 8.
    (events,) = (workdir / stage).glob("events.out.tfevents.*")
    accumulator = event_accumulator.EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    for name in ("VIF", "Qabf", "SSIM", "seconds"):
      assert [e.step for e in accumulator.Scalars(f"val/{name}")] == steps, (stage, name)
    assert len(accumulator.Tags()["images"]) == 2
    for tag in accumulator.Tags()["images"]:
      assert [(e.step, e.height, e.width) for e in accumulator.Images(tag)] == [
          (steps[0], 48, 144)]
    assert (workdir / stage / f"{stage}_best_VIF.npz").is_file()
  assert output.count("validation at step") == 2


def test_sigkill_at_five_points_then_rerun_gives_identical_weights(uninterrupted, tmp_path):
  workdir = tmp_path / "run"
  for point in _KILLS:
    proc = _train(workdir, fault=point)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])
  # What the kills left: an uncommitted checkpoint folder, a temporary weights file.
  assert not (workdir / "student" / "student.npz").exists()
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for model in ("teacher", "student"):
    expected = _weights(uninterrupted[0] / model / f"{model}.npz")
    got = _weights(workdir / model / f"{model}.npz")
    assert got.keys() == expected.keys()
    for key in expected:
      assert got[key].dtype == expected[key].dtype
      assert got[key].tobytes() == expected[key].tobytes(), (model, key)
  # Nothing half-written is left behind once the run has finished.
  leftovers = [p for p in workdir.rglob("*") if "tmp" in p.name]
  assert not leftovers, leftovers
