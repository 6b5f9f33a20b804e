"""The training step and run: determinism, resume, non-finite guard, data parallelism, CLI.

Tiny shapes (32x32 patches, batch 2) with a seeded random VGG-19 and a random teacher, so
that the whole module compiles the step once.
"""

import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tmpfs
from tensorboard.backend.event_processing import event_accumulator

from mmdrfuse_jax.configs import default, quickstart
from mmdrfuse_jax.models import networks, vgg, weight_files
from mmdrfuse_jax.train import (
  distill,
  loop,
  losses,
  refresh,
  run_checkpoints,
  run_settings,
  run_spec,
  stages,
  summary,
  teacher_cache,
  update,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(teacher_file):
  config = default.get_config()
  config.model = "student"
  config.data.synthetic_pairs = 2
  config.data.synthetic_height = 32
  config.data.synthetic_width = 64
  config.data.patch_size = 32
  config.data.patch_stride = 32  # 4 patches, 2 steps per epoch.
  config.batch_size = 2
  config.num_epochs = 2  # The second epoch exercises the refresh memories.
  config.allow_random_vgg = True
  config.teacher_weights = str(teacher_file)
  config.optim.lr = 1e-3
  config.log_every_steps = 1
  config.checkpoint_every_steps = 100
  config.progress_bar = False
  return config


def _step_config(config, steps_per_epoch=2):
  """The train step's settings of a run of `config` (read as the run reads it)."""
  return run_spec.RunSpec.from_config(config).step_config(steps_per_epoch)


def _frozen(config):
  """The frozen networks' files a run of `config` reads."""
  return run_spec.RunSpec.from_config(config).frozen


def _fresh_state(cfg, teacher, mesh):
  """A new student train state for `tiny_config`'s 4 patches of 32x32, placed on `mesh`."""
  state = update.create_train_state("student", update.make_optimizer(1e-3), jax.random.PRNGKey(0),
                                   4, 32, cfg.refresh, teacher_params=teacher)
  return update.replicate(state, mesh)


def _random_batch(seed, patch_ids):
  """A batch of random 32x32 pairs for the given patch ids."""
  rng = np.random.default_rng(seed)
  shape = (len(patch_ids), 32, 32, 1)
  return {"ir": rng.random(shape, dtype=np.float32), "vis": rng.random(shape, dtype=np.float32),
          "patch_id": np.array(patch_ids, np.int32)}


def read_scalars(path):
  """(step, {tag: value}) rows of an event file, read with TensorBoard's own reader."""
  accumulator = event_accumulator.EventAccumulator(str(path))
  accumulator.Reload()
  rows = {}
  for tag in accumulator.Tags()["scalars"]:
    for event in accumulator.Scalars(tag):
      rows.setdefault(event.step, {})[tag] = event.value
  return sorted(rows.items())


def _restore_latest(workdir, config):
  """The final train state saved in `workdir` (restored with the run's own code)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  manager = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").resolve())
  return manager.restore(manager.latest_step()), manager.latest_step()


def _assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, teacher_file):
  workdir = tmp_path_factory.mktemp("straight")
  result = loop.train_model(tiny_config(teacher_file), workdir, log=lambda *_: None)
  return workdir, result


@pytest.mark.slow
def test_run_writes_weights_and_logs(straight_run):
  workdir, result = straight_run
  assert result.step == result.total_steps == 4 and result.weights is not None
  params = weight_files.load_params(result.weights, "student")
  assert networks.count_params(params) == 113
  rows = read_scalars(glob.glob(str(workdir / "events.out.tfevents.*"))[0])
  assert [step for step, _ in rows] == [1, 2, 3, 4]
  # Epoch 1 fills the memories, epoch 2 compares with them.
  assert rows[0][1]["refresh/ssim_first_writes"] == 1.0
  assert rows[3][1]["refresh/ssim_first_writes"] == 0.0
  assert all(np.isfinite(v) for _, r in rows for v in r.values())


@pytest.mark.slow
def test_same_seed_same_params(straight_run, tmp_path, teacher_file):
  workdir, _ = straight_run
  loop.train_model(tiny_config(teacher_file), tmp_path, log=lambda *_: None)
  a, _ = _restore_latest(workdir, None)
  b, _ = _restore_latest(tmp_path, None)
  _assert_trees_equal(a, b)


@pytest.mark.slow
def test_resume_equals_straight_run(straight_run, tmp_path, teacher_file):
  workdir, _ = straight_run
  config = tiny_config(teacher_file)
  half = loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=2)
  assert half.weights is None and half.step == 2
  mid, step = _restore_latest(tmp_path, None)
  assert step == 2 and int(mid["epoch"]) == 1 and int(mid["position"]) == 0
  lines = []
  rest = loop.train_model(config, tmp_path, log=lines.append)
  assert any("resumed" in line and "step 2" in line for line in lines)
  assert rest.step == 4 and rest.weights is not None
  a, _ = _restore_latest(workdir, None)
  b, _ = _restore_latest(tmp_path, None)
  # Params, Adam state, memories, step, data position: everything identical.
  _assert_trees_equal(a, b)
  assert int(b["epoch"]) == 2 and int(b["position"]) == 0


@pytest.mark.slow
def test_nonfinite_loss_skips_update(straight_run, teacher_file):
  config = tiny_config(teacher_file)
  cfg = _step_config(config)
  mesh = update.make_mesh(2)
  teacher = weight_files.load_params(teacher_file, "teacher")
  state = _fresh_state(cfg, teacher, mesh)
  frozen = update.replicate(update.Frozen(vgg=vgg.random_params(), teacher=teacher), mesh)
  before = jax.device_get(state)
  step = update.make_train_step(cfg, mesh)
  ir = np.full((2, 32, 32, 1), 0.5, np.float32)
  ir[0, 3, 3, 0] = np.nan
  batch = {"ir": ir, "vis": np.full_like(ir, 0.25), "patch_id": np.array([0, 3], np.int32)}
  state, metrics = step(state, batch, frozen)
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0
  assert int(after.step) == 1 and int(after.nonfinite_skips) == 1 and int(after.position) == 1
  _assert_trees_equal(before.params, after.params)
  _assert_trees_equal(before.opt_state, after.opt_state)
  _assert_trees_equal(before.memory, after.memory)  # Still all unwritten (NaN).
  # A finite batch afterwards updates as usual.
  batch["ir"] = np.nan_to_num(ir, nan=0.5)
  state, metrics = step(state, batch, frozen)
  assert float(metrics["nonfinite"]) == 0.0
  after2 = jax.device_get(state)
  assert not np.array_equal(after2.params["conv1"]["kernel"], before.params["conv1"]["kernel"])
  # First epoch: both memories now hold the output of the parameters before the update.
  x = np.concatenate([batch["ir"], batch["vis"]], axis=-1)
  expected = networks.Student().apply({"params": before.params}, x)["out"]
  for memory in (after2.memory["best_ssim"], after2.memory["best_gmsd"]):
    img, written = refresh.gather(memory, jnp.array([0, 3]), "bfloat16")
    assert np.all(written)
    np.testing.assert_allclose(img, expected, atol=4e-3)
  _, others = refresh.gather(after2.memory["best_ssim"], jnp.array([1, 2]), "bfloat16")
  assert not np.any(others)


@pytest.mark.slow
def test_checkpoint_with_bfloat16_memory_arrays_restores_bit_for_bit(tmp_path):
  # "bfloat16" memories were bfloat16 arrays and are uint16 bits now. Checkpoints of then
  # restore with the same bits; orbax alone would convert the values (NaN and 0.5 to 0).
  like = update.create_train_state("student", update.make_optimizer(1e-3), jax.random.PRNGKey(0),
                                  4, 8, refresh.RefreshConfig())
  values = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  values[0] = np.nan  # An unwritten slot.
  before = like.replace(memory={k: jnp.asarray(values, jnp.bfloat16) for k in like.memory})
  run_checkpoints.RunCheckpoints(tmp_path, keep=1).save(3, before)
  restored, step = run_checkpoints.RunCheckpoints(tmp_path, keep=1).restore_latest(like, print)
  assert step == 3
  for key, memory in restored.memory.items():
    assert memory.dtype == np.uint16
    np.testing.assert_array_equal(memory, np.asarray(before.memory[key]).view(np.uint16))
    images, written = refresh.gather(memory, jnp.arange(4), "bfloat16")
    assert list(np.asarray(written)) == [False, True, True, True]
    np.testing.assert_array_equal(images[1:], np.asarray(before.memory[key][1:], np.float32))
  # A checkpoint written now restores as it was saved.
  run_checkpoints.RunCheckpoints(tmp_path, keep=1).save(4, restored)
  again, step = run_checkpoints.RunCheckpoints(tmp_path, keep=1).restore_latest(like, print)
  assert step == 4
  _assert_trees_equal(again.memory, restored.memory)


@pytest.mark.slow
def test_per_sample_uint8_ssim_only_run(tmp_path, teacher_file):
  config = tiny_config(teacher_file)
  config.refresh.per_sample = True
  config.refresh.memory_dtype = "uint8"
  config.refresh.gmsd = False
  half = loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=3)
  assert half.step == 3
  result = loop.train_model(config, tmp_path, log=lambda *_: None)
  assert result.step == 4 and result.weights is not None
  final, _ = _restore_latest(tmp_path, None)
  assert final["memory"]["best_ssim"].dtype == np.uint8
  assert np.all(final["memory"]["best_ssim"][:, 0, 0, 0] != 255)  # Every slot written.
  rows = read_scalars(glob.glob(str(tmp_path / "events.out.tfevents.*"))[-1])
  assert rows and not any("gmsd" in k for _, r in rows for k in r)


def test_student_conv2_starts_from_teacher_conv00(teacher_file):
  teacher = weight_files.load_params(teacher_file, "teacher")
  params = distill.init_student_from_teacher(networks.init_params("student", jax.random.PRNGKey(0)),
                                             teacher)
  np.testing.assert_array_equal(params["conv2"]["kernel"], teacher["conv00"]["kernel"])
  np.testing.assert_array_equal(params["conv2"]["bias"], teacher["conv00"]["bias"])


def test_missing_inputs_are_one_line_errors(tmp_path, teacher_file):
  config = default.get_config()
  with pytest.raises(loop.TrainingError, match="prepare_data"):
    loop.load_dataset(config)
  with pytest.raises(loop.TrainingError, match="convert_vgg19"):
    loop.load_vgg(_frozen(config), print)
  config.vgg_weights = str(tmp_path / "nope.npz")
  with pytest.raises(loop.TrainingError, match="nope.npz"):
    loop.load_vgg(_frozen(config), print)
  with pytest.raises(loop.TrainingError, match="teacher"):
    loop.load_teacher(_frozen(config))
  config.teacher_weights = str(tmp_path / "missing.model")
  with pytest.raises(loop.TrainingError, match="missing.model"):
    loop.load_teacher(_frozen(config))


def _run(args, env=None, timeout=600):
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_cli_without_data_fails_in_one_line(tmp_path):
  proc = _run(["bin/train.py", "--config=configs/student.py", f"--workdir={tmp_path}"])
  assert proc.returncode == 1
  assert proc.stderr.strip().count("\n") == 0 and "error: no training data" in proc.stderr


_MULTI_DEVICE = textwrap.dedent("""
  import dataclasses, jax, numpy as np
  from mmdrfuse_jax.models import networks, vgg
  from mmdrfuse_jax.train import losses, refresh, update
  assert len(jax.devices()) == 8, jax.devices()
  rcfg = refresh.RefreshConfig(memory_dtype="float32")
  # The terms that read VGG-19 are off (a step several times cheaper to compile twice); both
  # memories are still scored, refreshed and written across the devices.
  weights = dataclasses.replace(losses.PUBLISHED_WEIGHTS["student"], w_percep=0.0, w_refresh=0.0)
  cfg = update.StepConfig("student", weights, refresh=rcfg, steps_per_epoch=1)
  teacher = networks.init_params("teacher", jax.random.PRNGKey(3))
  frozen = update.Frozen(vgg=vgg.random_params(), teacher=teacher)
  rng = np.random.default_rng(0)
  batch = {"ir": rng.random((8, 32, 32, 1), dtype=np.float32),
           "vis": rng.random((8, 32, 32, 1), dtype=np.float32),
           "patch_id": rng.permutation(8).astype(np.int32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = update.make_mesh(8, devices)
    state = update.create_train_state("student", update.make_optimizer(1e-3),
                                      jax.random.PRNGKey(0), 8, 32, rcfg, teacher_params=teacher)
    state = update.replicate(state, mesh)
    step = update.make_train_step(cfg, mesh)
    fz = update.replicate(frozen, mesh)
    for _ in range(3):  # Epoch 1 writes the memories, epochs 2-3 use them.
      state, metrics = step(state, batch, fz)
    assert state.memory["best_ssim"].sharding.is_fully_replicated
    assert state.params["conv1"]["kernel"].sharding.is_fully_replicated
    results.append(jax.device_get((state.params, state.opt_state, state.memory)))
  one, many = results
  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)))
  print("max abs difference", worst)
  assert worst <= 1e-5, worst
""")


@pytest.mark.slow
def test_eight_devices_match_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = _run(["-c", _MULTI_DEVICE], env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_teacher_cache_setting():
  cache = run_settings.uses_teacher_cache
  assert cache("auto", "cpu") and cache("host", "gpu")
  assert not cache("auto", "gpu") and not cache("off")
  # Augmented patches change every epoch: targets kept from the first would be wrong.
  assert not cache("auto", "cpu", augmented=True) and not cache("host", "gpu", augmented=True)
  config = default.get_config("student")
  config.data.augment.enabled, config.teacher_cache = True, "host"
  with pytest.raises(run_spec.ConfigError, match="changes the patches every epoch"):
    run_spec.RunSpec.from_config(config)
  config.data.augment.per_patch = True  # One draw per patch: its targets stay valid.
  assert run_spec.RunSpec.from_config(config).data.augment.changes_every_epoch is False
  config = default.get_config("student")
  config.teacher_cache = "yes"
  with pytest.raises(loop.TrainingError, match="config.teacher_cache must be one of"):
    run_settings.check_config(config)


@pytest.mark.slow
def test_teacher_cache_matches_teacher_in_step(teacher_file):
  config = tiny_config(teacher_file)
  cfg = _step_config(config)
  mesh = update.make_mesh(2)
  teacher = weight_files.load_params(teacher_file, "teacher")
  frozen = update.replicate(update.Frozen(vgg=vgg.random_params(), teacher=teacher), mesh)
  batch = _random_batch(1, [2, 1])
  cache = teacher_cache.TeacherCache(frozen.teacher, 4, 32, mesh)
  results = []
  for b in (batch, cache.add_to(batch)):
    state, metrics = update.make_train_step(cfg, mesh)(_fresh_state(cfg, teacher, mesh), b, frozen)
    results.append(jax.device_get((state.params, metrics["l_distill"])))
  assert cache.known.tolist() == [False, True, True, False]
  for x, y in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("per_patch", [False, True])
def test_augmented_run_distils_from_the_teacher_of_its_own_inputs(tmp_path, teacher_file,
                                                                   per_patch):
  """With augmentation drawn per step, every epoch's patches differ: on a CPU (where "auto"
  caches the teacher's targets) the run equals one with the teacher in every step. Drawn per
  patch, "auto" caches them, and they are still the targets of the patches trained on."""
  params = []
  for cache in ("auto", "off"):
    config = tiny_config(teacher_file)
    config.data.augment.enabled = True
    config.data.augment.per_patch = per_patch
    config.loss.w_percep = 0.0
    config.refresh.ssim = config.refresh.gmsd = False
    config.teacher_cache = cache
    result = loop.train_model(config, tmp_path / cache, log=lambda line: None)
    params.append(weight_files.load_params(result.weights, "student"))
  for x, y in zip(jax.tree_util.tree_leaves(params[0]), jax.tree_util.tree_leaves(params[1])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_student_accepts_published_teacher(shared):
  config = default.get_config()
  config.teacher_weights = str(shared / "reference" / "weights" / "teacher.model")
  assert networks.count_params(loop.load_teacher(_frozen(config))) == 556489


def test_event_files_read_by_tensorboard(tmp_path):
  writer = summary.MetricWriter(tmp_path)
  writer.config('{"model": "student"}')
  writer.scalars(7, {"loss": 1.5, "refresh/ssim_gap": -0.25})
  writer.scalars(8, {"loss": 0.75})
  writer.close()
  (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert read_scalars(events) == [(7, {"loss": 1.5, "refresh/ssim_gap": -0.25}),
                                  (8, {"loss": 0.75})]
  accumulator = event_accumulator.EventAccumulator(events)
  accumulator.Reload()
  assert accumulator.Tags()["tensors"] == ["config/text_summary"]
  rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(row) for row in rows] == [
      {"step": 7, "loss": 1.5, "refresh/ssim_gap": -0.25}, {"step": 8, "loss": 0.75}]


def test_run_logs_its_config(straight_run):
  workdir, _ = straight_run
  (events,) = glob.glob(str(workdir / "events.out.tfevents.*"))
  accumulator = event_accumulator.EventAccumulator(events)
  accumulator.Reload()
  (text,) = accumulator.Tensors("config/text_summary")
  assert '"teacher_cache": "auto"' in text.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_terms_that_are_off_run_no_vgg(straight_run, teacher_file):
  """With perception and refresh off, a VGG-19 full of NaN never enters the step."""
  config = tiny_config(teacher_file)
  mesh = update.make_mesh(2)
  teacher = weight_files.load_params(teacher_file, "teacher")
  poisoned = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), vgg.random_params())
  frozen = update.replicate(update.Frozen(vgg=poisoned, teacher=teacher), mesh)
  batch = _random_batch(2, [0, 1])
  targets = np.random.default_rng(3).random((2, 32, 32, 2), dtype=np.float32)
  nonfinite = {}
  for w_percep, ssim, gmsd in ((0.0, False, False), (2.0, True, True)):
    config.loss.w_percep = w_percep
    config.refresh.ssim, config.refresh.gmsd = ssim, gmsd
    cfg = _step_config(config)
    # The off case takes the teacher's targets with the batch, as later epochs do (no teacher
    # to compile); the on case is the step the other tests compiled already.
    inputs = {**batch, "teacher": targets} if w_percep == 0 else batch
    _, metrics = update.make_train_step(cfg, mesh)(_fresh_state(cfg, teacher, mesh), inputs, frozen)
    nonfinite[w_percep] = float(metrics["nonfinite"])
    assert ("l_percep" in metrics) == (w_percep != 0)
  assert nonfinite == {0.0: 0.0, 2.0: 1.0}  # Only the step that needs VGG sees its NaNs.


def test_teacher_features_are_the_teachers_first_encoder_maps(teacher_file):
  teacher = weight_files.load_params(teacher_file, "teacher")
  x = jnp.asarray(np.random.default_rng(4).random((2, 16, 20, 1), dtype=np.float32))
  got = distill.teacher_features(teacher, x)
  encoder = networks.Teacher().apply({"params": teacher}, jnp.concatenate([x, x], -1))["encoder"]
  assert len(got) == 2
  for g, want in zip(got, encoder[:2]):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_teacher_perception_runs_no_vgg(teacher_file):
  """perception="teacher": the term is on, reads the teacher's G1 and G2, and never VGG-19."""
  config = tiny_config(teacher_file)
  config.loss.w_percep, config.loss.perception = 2.0, "teacher"
  config.refresh.ssim = config.refresh.gmsd = False
  mesh = update.make_mesh(2)
  teacher = weight_files.load_params(teacher_file, "teacher")
  poisoned = jax.tree_util.tree_map(lambda a: np.full_like(a, np.nan), vgg.random_params())
  frozen = update.replicate(update.Frozen(vgg=poisoned, teacher=teacher), mesh)
  cfg = _step_config(config)
  assert cfg.output_taps == 0 and not run_spec.RunSpec.from_config(config).needs_vgg
  batch = _random_batch(5, [0, 1])
  state = _fresh_state(cfg, teacher, mesh)
  out = networks.Student().apply({"params": state.params}, jnp.concatenate(
      [batch["ir"], batch["vis"]], -1))["out"]
  sources = (distill.teacher_features(teacher, batch[k]) for k in ("ir", "vis"))
  want = losses.perception_loss(distill.teacher_features(teacher, out), *sources)
  _, metrics = update.make_train_step(cfg, mesh)(state, batch, frozen)  # Donates `state`.
  assert float(metrics["nonfinite"]) == 0.0 and float(metrics["l_percep"]) > 0
  np.testing.assert_allclose(metrics["l_percep"], want, rtol=1e-5)
  config.model = "teacher"
  with pytest.raises(run_settings.ConfigError, match="for students"):
    run_settings.check_config(config)


def test_quickstart_is_two_explicit_stages(tmp_path):
  teacher, student = stages.plan(quickstart.get_config(), tmp_path)
  assert (teacher.name, teacher.workdir, teacher.config.model) == (
      "teacher", tmp_path / "teacher", "teacher")
  assert (student.name, student.workdir, student.config.model) == (
      "student", tmp_path / "student", "student")
  assert student.config.teacher_weights == str(tmp_path / "teacher" / "teacher.npz")
  assert "teacher_stage" not in student.config
  assert dict(teacher.config.loss) == {**dataclasses.asdict(losses.PUBLISHED_WEIGHTS["teacher"]),
                                       "gradient_form": "code", "distill_normalize": "batch",
                                       "perception": "vgg", "alive_margin": 0.05}
  assert teacher.config.data == quickstart.get_config().data  # One data setting for both.
  (only,) = stages.plan(default.get_config("teacher"), tmp_path)
  assert only.workdir == tmp_path and only.config.model == "teacher"
  given = quickstart.get_config()
  given.teacher_weights = "published/teacher.model"
  (student,) = stages.plan(given, tmp_path)  # A given teacher: no teacher stage.
  assert (student.name, student.config.teacher_weights) == ("student", "published/teacher.model")


def _workdir_bytes(workdir):
  """Every file of a workdir (relative path -> bytes), to show a refused run touched nothing."""
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_with_other_settings_is_refused(straight_run, teacher_file):
  workdir, _ = straight_run
  before = _workdir_bytes(workdir)
  config = tiny_config(teacher_file)
  config.batch_size = 4
  config.loss.w_percep = 0.0
  with pytest.raises(loop.TrainingError,
                     match=r"other settings \(batch_size: 2 -> 4; loss.w_percep: 2.0 -> 0.0\)"):
    loop.train_model(config, workdir, log=lambda *_: None)
  assert _workdir_bytes(workdir) == before


@pytest.mark.slow
def test_more_epochs_continue_and_start_fresh_moves_the_run_aside(straight_run, tmp_path,
                                                                   teacher_file):
  workdir, _ = straight_run
  shutil.copytree(workdir, tmp_path / "run")
  config = tiny_config(teacher_file)
  config.num_epochs = 3  # Allowed to grow: the run continues from step 4.
  lines = []
  result = loop.train_model(config, tmp_path / "run", log=lines.append)
  assert any("resumed" in line and "step 4" in line for line in lines)
  assert result.step == 6 and result.weights is not None
  config.num_epochs = 2
  with pytest.raises(loop.TrainingError, match="past the 4 steps"):
    loop.train_model(config, tmp_path / "run", log=lambda *_: None)
  config.seed = 1  # Another run: refused, then started over with start_fresh.
  with pytest.raises(loop.TrainingError, match="seed: 0 -> 1"):
    loop.train_model(config, tmp_path / "run", log=lambda *_: None)
  config.start_fresh = True
  result = loop.train_model(config, tmp_path / "run", log=lambda *_: None)
  assert result.step == 4 and result.weights is not None
  (aside,) = (tmp_path / "run").glob("replaced-*")
  assert (aside / "student.npz").is_file() and (aside / "checkpoints").is_dir()


def _damage(step_dir, how):
  if how == "truncated array file":
    for path in step_dir.rglob("*"):
      if path.is_file() and path.parent.name == "d":
        path.write_bytes(path.read_bytes()[:10])
  elif how == "missing metadata":
    for path in step_dir.rglob("*METADATA"):
      path.unlink()
  else:  # "empty directory"
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated array file", "missing metadata", "empty directory"])
def test_resume_skips_a_damaged_newest_checkpoint(straight_run, tmp_path, teacher_file, how):
  config = tiny_config(teacher_file)
  config.checkpoint_every_steps = 1
  loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=3)
  _damage(tmp_path / "checkpoints" / "3", how)
  lines = []
  result = loop.train_model(config, tmp_path, log=lines.append)
  assert result.step == 4 and result.weights is not None
  assert any("resumed" in line and "step 2" in line for line in lines), lines
  # Resuming from step 2 ends exactly where the uninterrupted run ended.
  _assert_trees_equal(_restore_latest(straight_run[0], None)[0], _restore_latest(tmp_path, None)[0])


def test_all_checkpoints_damaged_is_one_line(tmp_path, teacher_file):
  config = tiny_config(teacher_file)
  loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=1)
  _damage(tmp_path / "checkpoints" / "1", "truncated array file")
  with pytest.raises(loop.TrainingError, match="no checkpoint restores, all are damaged"):
    loop.train_model(config, tmp_path, log=lambda *_: None)
  assert list((tmp_path / "damaged_checkpoints").iterdir())  # Moved aside, not deleted.


@pytest.mark.slow
def test_resume_drops_log_rows_after_the_checkpoint(tmp_path, teacher_file):
  config = tiny_config(teacher_file)
  config.checkpoint_every_steps = 2
  loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=3)
  shutil.rmtree(tmp_path / "checkpoints" / "3")  # As if killed after logging step 3.
  loop.train_model(config, tmp_path, log=lambda *_: None)
  steps = [json.loads(row)["step"] for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_config_mistakes_are_one_line(tmp_path):
  for override, expected in [("--config.batchsize=4", "did you mean 'batch_size'"),
                             ("--config.batch_size=0", "batch_size must be a positive integer"),
                             ("--config.num_epochs=-1", "num_epochs must be a positive integer"),
                             ("--config.data.dataset=llvip", "synthetic_pairs=0")]:
    proc = _run(["bin/train.py", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
                 override])
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
  proc = _run(["bin/train.py", "--config=configs/nope.py", f"--workdir={tmp_path}"])
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: --config=configs/nope.py: no such config file")
  assert not list(tmp_path.iterdir())  # Nothing was started.


def test_settings_may_be_corrected_before_the_first_checkpoint(straight_run, tmp_path,
                                                              teacher_file):
  config = tiny_config(teacher_file)
  config.vgg_weights = str(tmp_path / "missing_vgg.npz")
  with pytest.raises(loop.TrainingError, match="missing_vgg.npz"):
    loop.train_model(config, tmp_path / "run", log=lambda *_: None)
  config.vgg_weights = ""  # Corrected: no checkpoint was written, so the run may start.
  result = loop.train_model(config, tmp_path / "run", log=lambda *_: None, stop_at_step=1)
  assert result.step == 1
  config.seed = 1  # Once a checkpoint exists the settings are held.
  with pytest.raises(loop.TrainingError, match="seed: 0 -> 1"):
    loop.train_model(config, tmp_path / "run", log=lambda *_: None)


@pytest.fixture
def small_disk(tmp_path):
  """A 400 KB file system at tmp_path/disk."""
  with tmpfs(tmp_path / "disk", "400k") as mount:
    yield mount


@pytest.mark.slow
def test_full_disk_is_one_line_and_a_rerun_resumes(small_disk, teacher_file):
  # tiny_config's settings (its compiled step is reused), a checkpoint (~100 KB) every step.
  flags = ["--config.data.synthetic_pairs=2", "--config.data.synthetic_height=32",
           "--config.data.synthetic_width=64", "--config.data.patch_size=32",
           "--config.data.patch_stride=32", "--config.batch_size=2", "--config.num_epochs=3",
           "--config.allow_random_vgg=True", f"--config.teacher_weights={teacher_file}",
           "--config.optim.lr=1e-3", "--config.checkpoint_every_steps=1",
           "--config.keep_checkpoints=100", "--config.progress_bar=False"]
  args = ["bin/train.py", "--config=configs/student.py", f"--workdir={small_disk}/run", *flags]
  proc = _run(args)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]  # No tracebacks.
  assert "no space left on device" in proc.stderr and str(small_disk) in proc.stderr
  kept = sorted(int(p.name) for p in (small_disk / "run" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert kept and kept[-1] < 6, kept  # It stopped early, keeping the checkpoints it wrote.
  subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
  proc = _run(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from {small_disk}/run/checkpoints at step {kept[-1]}" in proc.stdout
  assert weight_files.load_params(small_disk / "run" / "student.npz", "student")


@pytest.mark.parametrize("key, value, expected", [
    ("lr", -1e-3, "config.optim.lr must be a positive number, got -0.001"),
    ("lr", 0.0, "config.optim.lr must be a positive number, got 0.0"),
    ("lr", float("nan"), "config.optim.lr must be a positive number, got nan"),
    ("lr", float("inf"), "config.optim.lr must be a positive number, got inf"),
    ("b1", 1.0, "config.optim.b1 must be in [0, 1), got 1.0"),
    ("b1", -0.1, "config.optim.b1 must be in [0, 1), got -0.1"),
    ("b2", 1.5, "config.optim.b2 must be in [0, 1), got 1.5"),
    ("eps", 0.0, "config.optim.eps must be a positive number, got 0.0"),
    ("eps", -1e-8, "config.optim.eps must be a positive number, got -1e-08"),
])
def test_unusable_optimiser_settings_are_refused(key, value, expected):
  # The reported case: a negative learning rate trained by gradient ascent without a word.
  config = default.get_config("student")
  config.optim[key] = value
  with pytest.raises(run_settings.ConfigError) as info:
    run_settings.check_config(config)
  assert str(info.value) == expected


@pytest.mark.parametrize("key, value, expected", [
    ("optim.schedule", "linear", "config.optim.schedule must be one of constant, cosine"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps must be a non-negative integer"),
    ("optim.final_lr_fraction", 1.5, "config.optim.final_lr_fraction must be in [0, 1]"),
    ("init.conv1_bias", float("nan"), "config.init.conv1_bias must be a finite number"),
])
def test_unusable_schedule_and_init_are_refused(key, value, expected):
  config = default.get_config("student")
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(run_settings.ConfigError, match=re.escape(expected)):
    run_settings.check_config(config)


def test_schedules_follow_their_settings():
  """Adam's steps scale with the schedule: warm-up from 0, cosine down to the final fraction."""
  grads = {"w": jnp.ones(3)}

  def steps(tx, n):
    opt, sizes = tx.init(grads), []
    for _ in range(n):
      delta, opt = tx.update(grads, opt)
      sizes.append(-float(delta["w"][0]))
    return np.array(sizes)

  # With constant gradients Adam's step is the learning rate itself (bias-corrected).
  np.testing.assert_allclose(steps(update.make_optimizer(1e-3), 3), 1e-3, rtol=1e-4)
  warm = steps(update.make_optimizer(1e-3, warmup_steps=4), 6)
  np.testing.assert_allclose(warm, [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-4, atol=1e-9)
  cos = steps(update.make_optimizer(1e-3, schedule="cosine", total_steps=5,
                                    final_lr_fraction=0.1), 6)
  want = [1e-4 + 9e-4 * (1 + np.cos(np.pi * min(k, 5) / 5)) / 2 for k in range(6)]
  np.testing.assert_allclose(cos, want, rtol=1e-4)
  assert update.make_optimizer(1e-3) is update.make_optimizer(1e-3)  # One jitted step.
  with pytest.raises(ValueError, match="schedule"):
    update.make_optimizer(1e-3, schedule="step")


def test_conv1_bias_starts_where_the_config_says(teacher_file):
  teacher = weight_files.load_params(teacher_file, "teacher")
  cfg = refresh.RefreshConfig()
  state = update.create_train_state("student", update.make_optimizer(1e-3), jax.random.PRNGKey(0),
                                    4, 16, cfg, teacher_params=teacher, conv1_bias=0.1)
  np.testing.assert_array_equal(state.params["conv1"]["bias"], np.full(4, 0.1, np.float32))
  plain = update.create_train_state("student", update.make_optimizer(1e-3),
                                    jax.random.PRNGKey(0), 4, 16, cfg, teacher_params=teacher)
  np.testing.assert_array_equal(plain.params["conv1"]["bias"], np.zeros(4, np.float32))
  np.testing.assert_array_equal(state.params["conv1"]["kernel"], plain.params["conv1"]["kernel"])
  np.testing.assert_array_equal(state.params["conv2"]["kernel"], teacher["conv00"]["kernel"])


def test_cli_refuses_a_negative_learning_rate_in_one_line(tmp_path, monkeypatch, capsys):
  from conftest import load_script

  from mmdrfuse_jax.runtime import cli

  def trained(*args, **kwargs):
    raise AssertionError("a run with a negative learning rate started")

  def leave(message):  # In-process: not os._exit.
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)

  monkeypatch.setattr(loop, "train_model", trained)
  monkeypatch.setattr(cli, "exit_after_error", leave)
  code = load_script("train").main([f"--config={REPO / 'configs' / 'quickstart.py'}",
                                    f"--workdir={tmp_path / 'run'}", "--config.optim.lr=-1e-3"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err == "error: config.optim.lr must be a positive number, got -0.001\n"
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_claims_no_checkpoint(tmp_path, teacher_file):
  # The reported case: the line promised that "the checkpoints written so far are kept and a
  # rerun resumes from the latest" when nothing had ever been written.
  (tmp_path / "afile").write_text("not a folder")
  for workdir in (tmp_path / "afile", tmp_path / "afile" / "run"):
    with pytest.raises(loop.TrainingError) as info:
      loop.train_model(tiny_config(teacher_file), workdir, log=lambda *_: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "afile")), message
    assert message.endswith("; no checkpoint was written"), message
    assert "resume" not in message and "kept" not in message, message


def _tree_checkpoints(directory, steps):
  """A RunCheckpoints in `directory` holding a small tree at each of `steps`."""
  saved = run_checkpoints.RunCheckpoints(directory, keep=10)
  for step in steps:
    saved.save(step, {"x": np.full(3, step, np.float32)})
  return saved


def test_unwritable_workdir_says_which_checkpoints_are_kept(tmp_path, teacher_file, monkeypatch):
  # A workdir holding an earlier run's checkpoints (and no run record) that cannot be written
  # now: the line names the latest checkpoint a rerun resumes from.
  workdir = tmp_path / "run"
  _tree_checkpoints(workdir / "checkpoints", [2, 4])

  def read_only(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(loop.files, "atomic_write", read_only)
  with pytest.raises(loop.TrainingError) as info:
    loop.train_model(tiny_config(teacher_file), workdir, log=lambda *_: None)
  assert str(info.value) == (
      f"{workdir / 'run.json'}: permission denied; the checkpoints written so far are kept "
      "(the latest: step 4) and a rerun resumes from it")


def test_failed_checkpoint_save_says_which_checkpoints_are_kept(tmp_path, monkeypatch):
  saved = _tree_checkpoints(tmp_path / "checkpoints", [])

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(saved._manager, "save", full)
  with pytest.raises(loop.TrainingError) as info:
    saved.save(1, {"x": np.zeros(3, np.float32)})
  assert str(info.value) == (f"{tmp_path / 'checkpoints'}: cannot save the checkpoint of step 1 "
                             "(no space left on device); no checkpoint was written")
  saved = _tree_checkpoints(tmp_path / "more", [1, 2])
  monkeypatch.setattr(saved._manager, "save", full)
  with pytest.raises(loop.TrainingError) as info:
    saved.save(3, {"x": np.zeros(3, np.float32)})
  assert str(info.value).endswith("(no space left on device); the checkpoints written so far "
                                  "are kept (the latest: step 2) and a rerun resumes from it")


def _tiny_quickstart():
  """The quickstart at test_faults.py's sizes: the teacher stage trains 2 steps, the student 4.

  Without validation, and the teacher stage without the terms that need VGG-19 (cheaper
  steps to compile); a student checkpoint every step.
  """
  config = quickstart.get_config()
  config.data.synthetic_pairs = 2
  config.data.synthetic_height = 32
  config.data.synthetic_width = 64
  config.data.patch_size = config.data.patch_stride = 32
  config.batch_size = 2
  config.num_epochs = 2
  config.checkpoint_every_steps = 1
  config.log_every_steps = 1
  config.progress_bar = False
  config.validation.synthetic_pairs = 0
  config.validation.best_metric = ""
  teacher = config.teacher_stage
  teacher.batch_size = 2
  teacher.num_epochs = 1
  teacher.checkpoint_every_steps = 1
  teacher.log_every_steps = 1
  teacher.loss.w_percep = 0.0
  teacher.refresh.ssim = teacher.refresh.gmsd = False
  return config


@pytest.mark.slow
def test_a_moved_workdir_resumes(tmp_path):
  # The reported case: the run record held the teacher stage's weights by their absolute path,
  # so a run copied or moved elsewhere (a bigger disk, another mount point) was refused as
  # "a run with other settings".
  config = _tiny_quickstart()
  first = tmp_path / "first" / "run"
  result = stages.run(config, first, log=lambda *_: None, stop_at_step=2)
  assert (result.step, result.weights) == (2, None)  # The teacher finished, the student not.
  record = json.loads((first / "student" / "run.json").read_text())
  assert record["identity"]["teacher_weights"] == "../teacher/teacher.npz"

  # An older version's record (absolute paths, no format) is read: the run resumes in place,
  # and its record is rewritten in the new form.
  record = {"identity": {**record["identity"],
                         "teacher_weights": str(first / "teacher" / "teacher.npz")}}
  (first / "student" / "run.json").write_text(json.dumps(record))
  lines = []
  result = stages.run(config, first, log=lines.append, stop_at_step=3)
  assert any(f"resumed from {first / 'student' / 'checkpoints'} at step 2" in line
             for line in lines), lines
  assert result.step == 3
  record = json.loads((first / "student" / "run.json").read_text())
  assert record["identity"]["teacher_weights"] == "../teacher/teacher.npz"

  moved = tmp_path / "elsewhere" / "run"
  shutil.copytree(first, moved)
  shutil.rmtree(tmp_path / "first")  # Moved: nothing may refer to the old place.
  lines = []
  result = stages.run(config, moved, log=lines.append)
  assert any(f"resumed from {moved / 'student' / 'checkpoints'} at step 3" in line
             for line in lines), lines
  assert result.step == 4 and result.weights == moved / "student" / "student.npz"
  assert weight_files.load_params(result.weights, "student")
  # Another teacher is still another run.
  config.teacher_weights = str(moved / "teacher" / "other.npz")
  with pytest.raises(loop.TrainingError, match=r"teacher_weights: '.*/run/teacher/teacher\.npz' "
                     r"-> '.*/run/teacher/other\.npz'"):
    loop.train_model(stages.plan(config, moved)[0].config, moved / "student",
                     log=lambda *_: None)
