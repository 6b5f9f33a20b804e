"""The teacher-target cache (train/teacher_cache.py): an entry is read only for the inputs it
was computed from, a folder keeps the entries across runs, and a damaged store is started
again rather than read."""

import json

import jax
import numpy as np
import pytest

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.train import distill, loop, run_spec, teacher_cache, update


@pytest.fixture
def computations(monkeypatch):
  """Counts the teacher's forward passes made by the caches created after it."""
  calls = []
  jitted = distill.jitted_teacher_targets

  def counting(mesh, precision):
    compute = jitted(mesh, precision)

    def call(teacher, x):
      calls.append(x.shape[0])
      return compute(teacher, x)
    return call

  monkeypatch.setattr(distill, "jitted_teacher_targets", counting)
  return calls


def _batch(seed, ids):
  rng = np.random.default_rng(seed)
  shape = (len(ids), 16, 16, 1)
  return {"ir": rng.random(shape, dtype=np.float32), "vis": rng.random(shape, dtype=np.float32),
          "patch_id": np.array(ids, np.int32)}


def _teacher_output(teacher, batch):
  x = np.concatenate([batch["ir"], batch["vis"]], axis=-1)
  return np.asarray(distill.teacher_targets(teacher, x))


@pytest.fixture(scope="module")
def teacher(teacher_file):
  return weight_files.load_params(teacher_file, "teacher")


def _cache(teacher, **options):
  return teacher_cache.TeacherCache(teacher, 4, 16, update.make_mesh(2), log=lambda line: None,
                                    **options)


def test_an_entry_is_read_only_for_the_inputs_it_was_computed_from(teacher, computations):
  cache = _cache(teacher)
  first = _batch(0, [0, 1])
  got = np.asarray(cache.add_to(first)["teacher"])
  np.testing.assert_allclose(got, _teacher_output(teacher, first), rtol=1e-6, atol=1e-6)
  assert computations == [2] and cache.known.tolist() == [True, True, False, False]
  np.testing.assert_array_equal(np.asarray(cache.add_to(first)["teacher"]), got)
  assert computations == [2]  # Read back.
  # The same patch ids with other inputs (augmentation drawn anew): computed again.
  other = _batch(1, [0, 1])
  got = np.asarray(cache.add_to(other)["teacher"])
  assert computations == [2, 2]
  np.testing.assert_allclose(got, _teacher_output(teacher, other), rtol=1e-6, atol=1e-6)


def test_a_folder_keeps_the_targets_for_the_next_run(tmp_path, teacher, computations):
  batch = _batch(0, [2, 3])
  first = _cache(teacher, directory=tmp_path, data_label="d")
  want = np.asarray(first.add_to(batch)["teacher"])
  lines = []
  second = teacher_cache.TeacherCache(teacher, 4, 16, update.make_mesh(2), directory=tmp_path,
                                      data_label="d", log=lines.append)
  assert second.path == first.path and len(computations) == 1
  assert lines == [f"teacher targets: 2 of 4 patches already in {first.path}"]
  np.testing.assert_array_equal(np.asarray(second.add_to(batch)["teacher"]), want)
  assert len(computations) == 1  # Read from the file, not computed.
  # Another teacher (one weight changed) or other patches: another store.
  changed = jax.tree_util.tree_map(np.array, teacher)
  changed["conv00"]["bias"][0] += 1.0
  assert _cache(changed, directory=tmp_path, data_label="d").path != first.path
  assert _cache(teacher, directory=tmp_path, data_label="e").path != first.path


def test_an_entry_cut_short_is_computed_again(tmp_path, teacher, computations):
  batch = _batch(0, [0, 1])
  cache = _cache(teacher, directory=tmp_path)
  want = np.asarray(cache.add_to(batch)["teacher"])
  del cache
  store = next(tmp_path.rglob("*.npy"))
  entries = np.load(store, mmap_mode="r+")
  entries["targets"][1] = np.nan  # Targets half-written, digest not yet: as a crash leaves it.
  entries["digest"][1] = 0
  entries.flush()
  del entries
  again = _cache(teacher, directory=tmp_path)
  assert again.known.tolist() == [True, False, False, False]
  np.testing.assert_allclose(np.asarray(again.add_to(batch)["teacher"]), want, rtol=1e-6,
                             atol=1e-6)
  assert len(computations) == 2


@pytest.mark.parametrize("damage", ["other array", "cut short", "not npy"])
def test_a_damaged_store_is_started_again_with_one_line(tmp_path, teacher, damage):
  path = _cache(teacher, directory=tmp_path).path
  entries = teacher_cache.entry_dtype(16)
  if damage == "other array":  # Declares a billion entries: never mapped, never allocated.
    header = {"descr": entries.descr, "fortran_order": False, "shape": (10**9,)}
    with open(path, "wb") as f:
      np.lib.format.write_array_header_2_0(f, header)
  elif damage == "cut short":
    path.write_bytes(path.read_bytes()[:-100])
  else:
    path.write_bytes(b"not an array")
  want = {"other array": "holds (1000000000,) entries", "cut short": "where its header says",
          "not npy": "not a teacher-target store"}[damage]
  lines = []
  cache = teacher_cache.TeacherCache(teacher, 4, 16, update.make_mesh(2), directory=tmp_path,
                                     log=lines.append)
  assert len(lines) == 2 and lines[0].startswith(f"{path}: ") and want in lines[0], lines
  assert "starting it again" in lines[0] and "0 of 4 patches" in lines[1]
  batch = _batch(0, [0, 1])
  np.testing.assert_allclose(np.asarray(cache.add_to(batch)["teacher"]),
                             _teacher_output(teacher, batch), rtol=1e-6, atol=1e-6)
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # No temporary left.


@pytest.mark.slow
def test_a_resumed_run_reads_the_targets_of_its_first_part(tmp_path, teacher_file):
  """Half a run, then the rest in a second invocation: the second computes no target, and the
  run ends where one with the teacher in every step does."""
  weights = {}
  for name, cache_setting in (("kept", "host"), ("in_step", "off")):
    config = default.get_config("student")
    config.data.synthetic_pairs = 1
    config.data.synthetic_height = config.data.synthetic_width = 32
    config.data.patch_size = config.data.patch_stride = 16  # 4 patches, 2 steps an epoch.
    config.batch_size = 2
    config.teacher_weights = str(teacher_file)
    config.loss.w_percep = 0.0  # No VGG-19.
    config.refresh.ssim = config.refresh.gmsd = False
    config.progress_bar = False
    config.teacher_cache = cache_setting
    config.teacher_cache_dir = str(tmp_path / "targets")
    config.checkpoint_every_steps = 2
    lines = []
    for epochs in (1, 2):
      config.num_epochs = epochs
      result = loop.train_model(config, tmp_path / name, log=lines.append)
    weights[name] = weight_files.load_params(result.weights, "student")
    if name == "kept":
      store = next((tmp_path / "targets").rglob("*.npy"))
      assert [line for line in lines if line.startswith("teacher targets:")] == [
          f"teacher targets: {n} of 4 patches already in {store}" for n in (0, 4)]
    else:
      assert any("teacher_cache_dir=" in line and "unused" in line for line in lines)
  for x, y in zip(jax.tree_util.tree_leaves(weights["kept"]),
                  jax.tree_util.tree_leaves(weights["in_step"])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert json.loads((tmp_path / "kept" / "config.json").read_text())["teacher_cache_dir"]


def test_runs_share_a_store_unless_their_patches_differ():
  """The mixture's weights change how often a patch comes, not what it holds; the seed draws
  each patch's augmentation, and the data settings choose the patches."""
  def identity(**changes):
    config = default.get_config("student")
    config.data.dataset, config.data.data_dir = "roadscene,llvip", "/data"
    config.update_from_flattened_dict(changes)
    return loop._patch_identity(run_spec.RunSpec.from_config(config))

  assert identity() == identity(**{"data.weights": "1,3", "optim.lr": 1e-4})
  assert identity() != identity(seed=1)
  assert identity() != identity(**{"data.holdout": 0.15})
  assert identity() != identity(**{"data.augment.enabled": True, "data.augment.per_patch": True})
