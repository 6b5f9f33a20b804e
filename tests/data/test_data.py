"""Training data: TFDS builders, the patch pipeline, synthetic pairs, bin/prepare_data.py.

The two shared-data builds (RoadScene_train, LLVIP_train) are the slow part; each is done
once per module.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from mmdrfuse_jax.data import catalog, pipeline, prepare, sources, synthetic


@pytest.fixture(scope="module", autouse=True)
def _quiet_tfds():
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file())


def _expected_patches(ir_folder: pathlib.Path) -> int:
  total = 0
  for p in _files(ir_folder):
    with Image.open(p) as img:
      total += (img.height // 128) * (img.width // 128)
  return total


def _check_pixels(ds: pipeline.PatchDataset, folder: pathlib.Path, image_ids, resize_visible=False):
  """Every patch of these images equals PIL convert("L") of the source, cut at its position."""
  ir_files, vis_files = _files(folder / "ir"), _files(folder / "vi")
  for image_id in image_ids:
    ir_img = Image.open(ir_files[image_id])
    vis_img = Image.open(vis_files[image_id]).convert("RGB")
    if resize_visible and vis_img.size != ir_img.size:
      vis_img = vis_img.resize(ir_img.size, Image.Resampling.BICUBIC)
    ir_ref = np.asarray(ir_img.convert("L"))
    vis_ref = np.asarray(vis_img.convert("L"))
    ids = np.flatnonzero(ds.patch_image == image_id)
    assert len(ids) == (ir_ref.shape[0] // 128) * (ir_ref.shape[1] // 128)
    batch = ds.patches(ids)
    for k, pid in enumerate(ids):
      y, x = ds.patch_y[pid], ds.patch_x[pid]
      np.testing.assert_array_equal(np.round(batch["ir"][k, ..., 0] * 255),
                                    ir_ref[y:y + 128, x:x + 128])
      np.testing.assert_array_equal(np.round(batch["vis"][k, ..., 0] * 255),
                                    vis_ref[y:y + 128, x:x + 128])


@pytest.fixture(scope="module")
def roadscene(shared, tmp_path_factory):
  folder = shared / "data" / "RoadScene_train"
  built = prepare.prepare("roadscene", folder, tmp_path_factory.mktemp("tfds_roadscene"))
  return folder, built


@pytest.fixture(scope="module")
def llvip(shared, tmp_path_factory):
  folder = shared / "data" / "LLVIP_train"
  data_dir = tmp_path_factory.mktemp("tfds_llvip")
  built = prepare.prepare("llvip", folder, data_dir)
  return folder, built, data_dir


@pytest.mark.slow
def test_roadscene_counts_and_pixels(roadscene):
  folder, built = roadscene
  assert len(built.images["train"]) == 171
  expected = _expected_patches(folder / "ir")
  assert expected == 1143
  assert pipeline.count_patches([(h, w) for _, h, w in built.images["train"]]) == expected
  # The shared RoadScene visible images are the high-resolution ones: resized to the infrared size.
  assert len(built.resized["train"]) == 171
  ds = pipeline.PatchDataset.from_tfds(built.data_dir.parents[2], "roadscene")
  assert ds.num_images == 171 and ds.num_patches == expected
  assert ds.stems == [p.stem for p in _files(folder / "ir")]
  _check_pixels(ds, folder, [0, 57, 170], resize_visible=True)


@pytest.mark.slow
def test_llvip_counts_pixels_and_ids(llvip):
  folder, built, data_dir = llvip
  assert [(h, w) for _, h, w in built.images["train"]] == [(1024, 1280)] * 32
  ds = pipeline.PatchDataset.from_tfds(data_dir, "llvip", "train")
  assert ds.num_patches == _expected_patches(folder / "ir") == 2560
  # Dense ids in (image, row, column) order.
  np.testing.assert_array_equal(ds.patch_image, np.repeat(np.arange(32), 80))
  np.testing.assert_array_equal(ds.patch_y[:80], np.repeat(np.arange(8) * 128, 10))
  np.testing.assert_array_equal(ds.patch_x[:80], np.tile(np.arange(10) * 128, 8))
  _check_pixels(ds, folder, [0, 31])
  batch = ds.patches(np.array([5, 2559]))
  assert batch["ir"].shape == (2, 128, 128, 1) and batch["ir"].dtype == np.float32
  np.testing.assert_array_equal(batch["patch_id"], [5, 2559])


def test_rebuild_gives_same_ids_and_order(shared, tmp_path):
  # A rebuilt dataset (another data_dir, the files listed afresh) has the same patches
  # under the same ids, and a seed gives the same batches.
  src = shared / "data" / "LLVIP_train"
  subset = tmp_path / "subset"
  for sub in ("ir", "vi"):
    (subset / sub).mkdir(parents=True)
    for p in _files(src / sub)[:4]:
      (subset / sub / p.name).symlink_to(p)
  loaded = []
  for name in ("a", "b"):
    prepare.prepare("paired_folders", subset, tmp_path / name)
    loaded.append(pipeline.PatchDataset.from_tfds(tmp_path / name, "paired_folders"))
  a, b = loaded
  assert a.num_patches == b.num_patches == 320
  for attr in ("patch_image", "patch_y", "patch_x"):
    np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
  seq_a = [x["patch_id"] for x, _ in a.iterate(30, seed=7, num_epochs=2)]
  seq_b = [x["patch_id"] for x, _ in b.iterate(30, seed=7, num_epochs=2)]
  np.testing.assert_array_equal(np.stack(seq_a), np.stack(seq_b))
  ids = np.arange(0, 320, 37)
  np.testing.assert_array_equal(a.patches(ids)["vis"], b.patches(ids)["vis"])


@pytest.fixture(scope="module")
def small():
  ir, vis = synthetic.make_pairs(3, 160, 300, seed=1)  # 1 x 2 patches each
  return pipeline.PatchDataset.from_arrays(ir, vis, patch_size=64, patch_stride=48)


def test_patch_grid_and_epochs(small):
  # (160-64)//48+1 = 3 rows, (300-64)//48+1 = 5 columns.
  assert small.num_patches == 3 * 15
  assert small.steps_per_epoch(7) == 6
  order0, order1 = small.epoch_order(3, 0), small.epoch_order(3, 1)
  assert sorted(order0) == list(range(45)) and not np.array_equal(order0, order1)
  np.testing.assert_array_equal(order0, small.epoch_order(3, 0))
  assert not np.array_equal(order0, small.epoch_order(4, 0))
  batches = list(small.iterate(7, seed=3, num_epochs=2))
  assert len(batches) == 12
  ids0 = np.concatenate([b["patch_id"] for b, _ in batches[:6]])
  np.testing.assert_array_equal(ids0, order0[:42])  # The last 3 patches are dropped.
  assert batches[5][1] == {"epoch": 1, "step": 0} and batches[6][1] == {"epoch": 1, "step": 1}
  b, _ = batches[0]
  assert b["ir"].shape == (7, 64, 64, 1) and b["patch_id"].dtype == np.int32
  assert 0.0 <= b["ir"].min() and b["vis"].max() <= 1.0
  unshuffled = next(small.iterate(7, seed=3, shuffle=False))[0]["patch_id"]
  np.testing.assert_array_equal(unshuffled, np.arange(7))


@pytest.mark.parametrize("resume_at", [0, 4, 5, 9])
def test_resume_reproduces_batches(small, resume_at):
  import jax.numpy as jnp

  full = list(small.iterate(7, seed=11, num_epochs=3))
  saved = full[resume_at][1]
  # As restored from a checkpoint: array scalars.
  restored = {k: jnp.asarray(v) for k, v in saved.items()}
  rest = list(small.iterate(7, seed=11, start_state=restored, num_epochs=3))
  assert len(rest) == len(full) - resume_at - 1
  for (x, sx), (y, sy) in zip(full[resume_at + 1:], rest):
    assert sx == sy
    for key in ("ir", "vis", "patch_id"):
      np.testing.assert_array_equal(x[key], y[key])


def test_iterate_errors(small):
  with pytest.raises(ValueError, match="do not make one batch"):
    next(small.iterate(46, seed=0))
  with pytest.raises(ValueError, match="bad iteration state"):
    next(small.iterate(7, seed=0, start_state={"epoch": 0, "step": 99}))


def test_sharded_single_device(small):
  import jax

  mesh = jax.make_mesh((1,), ("data",))
  host = next(small.iterate(6, seed=2))[0]
  dev = next(small.iterate(6, seed=2, sharding=mesh))[0]
  assert isinstance(dev["ir"], jax.Array) and dev["ir"].shape == (6, 64, 64, 1)
  np.testing.assert_array_equal(np.asarray(dev["vis"]), host["vis"])


def test_synthetic_deterministic():
  ir, vis = synthetic.make_pairs(3, 64, 96, seed=5)
  assert ir.shape == (3, 64, 96) and vis.shape == (3, 64, 96) and ir.dtype == vis.dtype == np.uint8
  ir2, vis2 = synthetic.make_pairs(2, 64, 96, seed=5)  # pair i depends on (seed, i) only
  np.testing.assert_array_equal(ir[:2], ir2)
  np.testing.assert_array_equal(vis[:2], vis2)
  ir3, _ = synthetic.make_pairs(3, 64, 96, seed=6)
  assert not np.array_equal(ir, ir3)
  _, rgb = synthetic.make_pairs(1, 64, 96, seed=5, color=True)
  assert rgb.shape == (1, 64, 96, 3)
  np.testing.assert_array_equal(np.asarray(Image.fromarray(rgb[0]).convert("L")), vis[0])
  # The two modalities disagree (fusion has something to do) and are not flat.
  assert ir.std() > 10 and vis.std() > 5
  assert abs(np.corrcoef(ir.ravel(), vis.ravel())[0, 1]) < 0.9


def _layout_tree(root: pathlib.Path, dirs):
  for d in dirs:
    (root / d).mkdir(parents=True)
  return root


@pytest.mark.parametrize("config,dirs,expected", [
    ("msrs", ["train/ir", "train/vi", "test/ir", "test/vi"],
     {"train": ("train/ir", "train/vi"), "test": ("test/ir", "test/vi")}),
    ("llvip", ["infrared/train", "infrared/test", "visible/train", "visible/test"],
     {"train": ("infrared/train", "visible/train"), "test": ("infrared/test", "visible/test")}),
    ("tno", ["Infrared", "Visible"], {"train": ("Infrared", "Visible")}),
    ("m3fd", ["Ir", "Vis"], {"train": ("Ir", "Vis")}),
    ("roadscene", ["cropinfrared", "crop_LR_visible", "crop_HR_visible"],
     {"train": ("cropinfrared", "crop_LR_visible")}),
    ("harvard_mri_pet", ["PET", "MRI"], {"train": ("PET", "MRI")}),
    ("harvard_mri_spect", ["SPECT", "MRI"], {"train": ("SPECT", "MRI")}),
    ("harvard_mri_ct", ["CT", "MRI"], {"train": ("CT", "MRI")}),
])
def test_layouts(tmp_path, config, dirs, expected):
  root = _layout_tree(tmp_path / "d", dirs)
  cfg = next(c for c in catalog.CONFIGS if c.name == config)
  got = sources.find_layout(root, cfg)
  assert {s: (str(a.relative_to(root)), str(b.relative_to(root)))
          for s, (a, b) in got.items()} == expected
  assert cfg.name in catalog.CONFIG_NAMES and "Get it from" in cfg.instructions()


def test_every_config_accepts_ir_vi_and_custom_folders(tmp_path):
  root = _layout_tree(tmp_path / "d", ["ir", "vi"])
  for cfg in catalog.CONFIGS:
    assert list(sources.find_layout(root, cfg)) == ["train"]
  custom = _layout_tree(tmp_path / "c", ["thermal", "rgb"])
  got = sources.find_layout(custom, catalog.paired_folders_config("thermal", "rgb"))
  assert got["train"] == (custom / "thermal", custom / "rgb")
  with pytest.raises(sources.DataError, match="no infrared and visible folders"):
    sources.find_layout(custom, next(c for c in catalog.CONFIGS if c.name == "msrs"))


def _bad_folder(root: pathlib.Path) -> pathlib.Path:
  synthetic.write_pairs(root, 3, 128, 256, seed=0)  # 0000..0002, good
  ir, vis = synthetic.make_pairs(1, 128, 128, seed=1)
  Image.fromarray(ir[0]).save(root / "ir" / "0003.png")  # no partner
  Image.fromarray(ir[0]).save(root / "ir" / "0004.png")  # sizes differ
  Image.fromarray(np.zeros((100, 128), np.uint8)).save(root / "vi" / "0004.png")
  Image.fromarray(ir[0]).save(root / "ir" / "0005.png")  # unreadable partner
  (root / "vi" / "0005.png").write_bytes(b"not an image")
  Image.fromarray(ir[0]).save(root / "ir" / "0006.png")  # truncated partner: header fine
  Image.fromarray(vis[0]).save(root / "vi" / "0006.png")
  data = (root / "vi" / "0006.png").read_bytes()
  (root / "vi" / "0006.png").write_bytes(data[:len(data) // 2])
  return root


def test_bad_folder_report_and_skip(tmp_path):
  folder = _bad_folder(tmp_path / "bad")
  with pytest.raises(sources.DataError) as err:
    prepare.prepare("paired_folders", folder, tmp_path / "out")
  report = str(err.value)
  assert report.startswith("4 problem(s)")
  for stem, what in (("0003", "no partner"), ("0004", "different sizes"), ("0005", "cannot read"),
                     ("0006", "cannot read")):
    assert any(stem in line and what in line for line in report.splitlines()), (stem, report)
  assert not (tmp_path / "out" / "fusion_pairs" / "paired_folders" / "1.0.0"
              / "dataset_info.json").exists()

  built = prepare.prepare("paired_folders", folder, tmp_path / "out", skip_bad=True)
  assert [s for s, _, _ in built.images["train"]] == ["0000", "0001", "0002"]
  assert len(built.skipped) == 4
  ds = pipeline.PatchDataset.from_tfds(tmp_path / "out", "paired_folders")
  assert ds.num_patches == 6


def test_prepare_data_cli(tmp_path, capsys):
  sys.path.insert(0, str(REPO_ROOT / "bin"))
  try:
    import prepare_data
  finally:
    sys.path.pop(0)
  folder = _bad_folder(tmp_path / "bad")
  args = ["--dataset", "paired_folders", "--manual_dir", str(folder),
          "--data_dir", str(tmp_path / "out")]
  assert prepare_data.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: 4 problem(s)") and "Traceback" not in err
  assert prepare_data.main(args + ["--skip_bad"]) == 0
  out = capsys.readouterr().out
  assert "skipped 4 problem(s)" in out and "train: 3 images, 6 patches" in out
  assert prepare_data.main(args + ["--skip_bad", "--patch_size", "64", "--patch_stride", "64"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("already built:") and "train: 3 images, 24 patches" in out  # Recounted.
  assert prepare_data.main(["--dataset", "msrs", "--manual_dir", str(tmp_path / "nope"),
                            "--data_dir", str(tmp_path / "o2")]) == 2
  assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such folder"


def test_build_leaves_no_temporary_folders_and_asks_no_bucket(tmp_path, monkeypatch):
  # TFDS looks up unbuilt datasets on its public bucket and leaves an empty temporary folder
  # behind each time (1,942 of them in one machine's /tmp); our builds are local only.
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  from tensorflow_datasets.core.utils import gcs_utils

  def no_bucket(*args):
    raise AssertionError(f"asked TFDS's bucket for {args}")

  monkeypatch.setattr(gcs_utils, "gcs_dataset_info_files", no_bucket)
  synthetic.write_pairs(tmp_path / "pairs", 2, 128, 128, seed=0)
  prepare.prepare("paired_folders", tmp_path / "pairs", tmp_path / "out")
  assert list(scratch.iterdir()) == []


def _run_fresh_python(script: str, **env) -> None:
  """Runs `script` in a new interpreter on CPU with the repo importable; it must print ok."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env,
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_in_memory_data_does_not_import_tfds():
  # A fresh process, since this one has imported the builders already: synthetic and
  # in-memory data must not pay for importing TFDS.
  _run_fresh_python("""
      import sys
      from mmdrfuse_jax.data import pipeline
      ds = pipeline.PatchDataset.from_synthetic(2, 64, 64, seed=0, patch_size=32, patch_stride=32)
      batch, state = next(iter(ds.iterate(4, seed=0, num_epochs=1)))
      assert batch["ir"].shape == (4, 32, 32, 1) and state == {"epoch": 0, "step": 1}
      assert "tensorflow_datasets" not in sys.modules
      assert "mmdrfuse_jax.data.builders" not in sys.modules
      print("ok")
  """)


@pytest.mark.slow
def test_no_tensorflow_and_two_device_sharding(tmp_path):
  # A fresh process: build, load and iterate sharded over two CPU devices; TensorFlow
  # must never be imported.
  _run_fresh_python(f"""
      import sys
      import jax, numpy as np
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      from mmdrfuse_jax.data import pipeline, prepare, synthetic
      synthetic.write_pairs({str(tmp_path / 'src')!r}, 3, 128, 256, seed=0)
      prepare.prepare("paired_folders", {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r})
      ds = pipeline.PatchDataset.from_tfds({str(tmp_path / 'out')!r}, "paired_folders")
      mesh = jax.make_mesh((2,), ("data",))
      n = 0
      for batch, state in ds.iterate(2, seed=0, num_epochs=1, sharding=mesh):
        n += 1
        assert len(batch["ir"].addressable_shards) == 2
        host = ds.patches(np.asarray(batch["patch_id"]))
        np.testing.assert_array_equal(np.asarray(batch["ir"]), host["ir"])
      assert n == 3 and state == {{"epoch": 1, "step": 0}}
      bad = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
      assert not bad, bad
      print("ok")
  """, XLA_FLAGS="--xla_force_host_platform_device_count=2")
