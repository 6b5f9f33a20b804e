"""Streaming patches (`StreamingPatchDataset`): the in-memory dataset's batches, read on demand.

One small dataset is written and built per module: procedural pairs of two sizes, and one
pair smaller than a patch (no patches), with overlapping patches.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT

from mmdrfuse_jax.data import pipeline, prepare, sources, synthetic
from mmdrfuse_jax.io import imageio

PATCH = dict(patch_size=64, patch_stride=48)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  src = tmp_path_factory.mktemp("pairs")
  synthetic.write_pairs(src, 5, 160, 224, seed=3)  # 3 x 4 patches each
  for stem, (h, w), seed in (("0005", (200, 140), 4), ("0006", (60, 300), 5)):  # 3 x 2; none
    ir, vis = synthetic.make_pairs(1, h, w, seed=seed, color=True)
    imageio.write_image_atomic(src / "ir" / f"{stem}.png", ir[0])
    imageio.write_image_atomic(src / "vi" / f"{stem}.png", vis[0])
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare.prepare("paired_folders", src, data_dir)
  return data_dir


@pytest.fixture(scope="module")
def memory(built):
  ds = pipeline.PatchDataset.from_tfds(built, "paired_folders", **PATCH)
  assert type(ds) is pipeline.PatchDataset and ds.num_patches == 5 * 12 + 6
  return ds


@pytest.fixture
def decodes(monkeypatch):
  """Counts the streaming decoder's calls; TFDS's own image decoding fails the test."""
  import tensorflow_datasets as tfds

  calls = []
  decode = pipeline._decode

  def counted(data):
    calls.append(len(data))
    return decode(data)

  def refused(*args, **kwargs):
    raise AssertionError("TFDS decoded an image")

  monkeypatch.setattr(pipeline, "_decode", counted)
  monkeypatch.setattr(tfds.features.Image, "decode_example_np", refused)
  return calls


def _stream(built, **kwargs):
  return pipeline.PatchDataset.from_tfds(built, "paired_folders", streaming=True,
                                         **PATCH, **kwargs)


def _assert_same(expected, got):
  assert len(got) == len(expected)
  for (x, sx), (y, sy) in zip(expected, got):
    assert sx == sy
    for key in ("ir", "vis", "patch_id"):
      assert x[key].dtype == y[key].dtype
      np.testing.assert_array_equal(x[key], y[key])


def test_index_without_decoding(built, memory, decodes):
  ds = _stream(built)
  assert isinstance(ds, pipeline.StreamingPatchDataset)
  assert decodes == []  # Sizes and stems from the build's description.
  assert (ds.num_images, ds.num_patches, ds.stems) == (7, 66, memory.stems)
  for attr in ("patch_image", "patch_y", "patch_x"):
    np.testing.assert_array_equal(getattr(ds, attr), getattr(memory, attr))
  # Patches 0 and 11 are image 0's first and last, 65 is image 5's last: two images, each
  # decoded once (infrared and visible).
  batch = ds.patches(np.array([0, 65, 11]))
  assert len(decodes) == 4
  for key in ("ir", "vis", "patch_id"):
    np.testing.assert_array_equal(batch[key], memory.patches(np.array([0, 65, 11]))[key])


@pytest.mark.parametrize("cache_bytes,num_threads", [(0, 3), (pipeline.DEFAULT_CACHE_BYTES, 1)])
def test_same_batches_two_epochs(built, memory, decodes, cache_bytes, num_threads):
  ds = _stream(built, cache_bytes=cache_bytes, num_threads=num_threads)
  expected = list(memory.iterate(7, seed=5, num_epochs=2))
  got = list(ds.iterate(7, seed=5, num_epochs=2))
  assert len(got) == 2 * 9
  _assert_same(expected, got)
  # Each batch decodes each of its images once, unless cached.
  per_batch = sum(len(np.unique(ds.patch_image[b["patch_id"]])) for b, _ in got)
  if cache_bytes:
    assert len(decodes) == 2 * 6 and ds._cache.hits == per_batch - 6  # All six fit.
  else:
    assert len(decodes) == 2 * per_batch and ds._cache.hits == 0
  assert ds._cache._bytes <= cache_bytes
  unshuffled = list(ds.iterate(7, seed=5, num_epochs=1, shuffle=False))
  _assert_same(list(memory.iterate(7, seed=5, num_epochs=1, shuffle=False)), unshuffled)


def test_cache_drops_least_recently_used(built, decodes):
  pair_bytes = 2 * 160 * 224
  ds = _stream(built, cache_bytes=2 * pair_bytes)
  for image_id in (0, 1, 0, 2, 1):  # 2 drops 1 (0 was used after it); 1 is read again.
    ds.image(image_id)
  assert len(decodes) == 2 * 4 and (ds._cache.hits, ds._cache.misses) == (1, 4)
  assert list(ds._cache._pairs) == [2, 1] and ds._cache._bytes == 2 * pair_bytes


@pytest.mark.parametrize("resume_at", [3, 8, 12])  # Mid-epoch, an epoch's last batch, mid-epoch.
def test_resume_reproduces_in_memory_batches(built, memory, resume_at):
  import jax.numpy as jnp

  full = list(memory.iterate(7, seed=11, num_epochs=3))
  restored = {k: jnp.asarray(v) for k, v in full[resume_at][1].items()}
  rest = list(_stream(built, cache_bytes=0).iterate(7, seed=11, start_state=restored,
                                                    num_epochs=3))
  _assert_same(full[resume_at + 1:], rest)


def test_sharded_batches(built, memory):
  import jax

  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  got = list(_stream(built).iterate(6, seed=2, num_epochs=1, sharding=mesh))
  expected = list(memory.iterate(6, seed=2, num_epochs=1))
  assert isinstance(got[0][0]["ir"], jax.Array)
  _assert_same(expected, [({k: np.asarray(v) for k, v in b.items()}, s) for b, s in got])


def test_two_device_sharding(built):
  # A fresh process with two CPU devices: each batch split over them, equal to the in-memory
  # dataset's.
  script = f"""
      import jax, numpy as np
      from mmdrfuse_jax.data import pipeline
      args = ({os.fspath(built)!r}, "paired_folders")
      memory = pipeline.PatchDataset.from_tfds(*args, patch_size=64, patch_stride=48)
      stream = pipeline.PatchDataset.from_tfds(*args, streaming=True, patch_size=64,
                                               patch_stride=48)
      mesh = jax.make_mesh((2,), ("data",))
      n = 0
      for (x, sx), (y, sy) in zip(memory.iterate(6, seed=4, start_state={{"epoch": 0, "step": 3}},
                                                 num_epochs=2),
                                  stream.iterate(6, seed=4, start_state={{"epoch": 0, "step": 3}},
                                                 num_epochs=2, sharding=mesh)):
        n += 1
        assert sx == sy and len(y["ir"].addressable_shards) == 2
        for key in x:
          np.testing.assert_array_equal(x[key], np.asarray(y[key]))
      assert n == 2 * 11 - 3, n
      print("ok")
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_auto_setting_and_errors(built, monkeypatch):
  sizes = [(100, 200)] * 3  # 120,000 bytes decoded
  monkeypatch.setattr(pipeline, "AUTO_STREAMING_BYTES", 120_000)
  assert not pipeline.use_streaming("auto", sizes)
  assert pipeline.use_streaming("auto", sizes + [(1, 1)])
  assert pipeline.use_streaming("on", []) and pipeline.use_streaming(True, [])
  assert not pipeline.use_streaming("off", sizes * 9) and not pipeline.use_streaming(False, [])
  with pytest.raises(ValueError, match="streaming must be one of auto, on, off, got 'yes'"):
    pipeline.use_streaming("yes", sizes)
  # This split decodes to 2 x (5 x 160 x 224 + 200 x 140 + 60 x 300) = 450,400 bytes.
  monkeypatch.setattr(pipeline, "AUTO_STREAMING_BYTES", 450_400)
  assert type(pipeline.PatchDataset.from_tfds(built, "paired_folders", streaming="auto",
                                              **PATCH)) is pipeline.PatchDataset
  monkeypatch.setattr(pipeline, "AUTO_STREAMING_BYTES", 450_399)
  assert type(pipeline.PatchDataset.from_tfds(built, "paired_folders", streaming="auto",
                                              **PATCH)) is pipeline.StreamingPatchDataset


def test_records_that_disagree_with_the_description(built):
  # A build whose records no longer match its recorded sizes (damaged since): one line, from
  # the thread that read it, not wrong patches.
  good = _stream(built)
  sizes = list(good.sizes)
  sizes[2] = (224, 160)
  bad = pipeline.StreamingPatchDataset(good._source, sizes, stems=good.stems, where="the build",
                                       **PATCH)
  with pytest.raises(sources.DataError, match=r"the build: record 2 holds image 2 of sizes "
                     r"\(160, 224\) and \(160, 224\), where .* \(224, 160\); rebuild it"):
    list(bad.iterate(7, seed=0, num_epochs=1, num_threads=2))
  with pytest.raises(ValueError, match="7 records but 6 image sizes"):
    pipeline.StreamingPatchDataset(good._source, sizes[:6], **PATCH)


def test_trainer_setting(built):
  from mmdrfuse_jax.configs import default
  from mmdrfuse_jax.train import loop, run_record

  config = default.get_config("teacher")
  config.data.dataset, config.data.data_dir = "paired_folders", os.fspath(built)
  config.data.patch_size, config.data.patch_stride = 64, 48
  assert type(loop.load_dataset(config)) is pipeline.PatchDataset  # auto: small
  config.data.streaming = "on"
  assert type(loop.load_dataset(config)) is pipeline.StreamingPatchDataset
  # Same batches: not part of the run's identity.
  assert "data.streaming" not in run_record.run_identity(config)
  config.data.streaming = "sometimes"
  with pytest.raises(loop.TrainingError, match="streaming must be one of"):
    loop.load_dataset(config)
