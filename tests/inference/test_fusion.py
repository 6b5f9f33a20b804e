"""Fusion API, output modes, colour mode, and reproduction of the published fused images."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import random_params
from PIL import Image
from rounding import assert_equal_up_to_rounding, network_ulps

from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.models import networks, weight_files


@pytest.fixture(scope="module")
def random_student():
  return jax.tree_util.tree_map(np.asarray, networks.init_params("student", jax.random.key(0)))


@pytest.fixture(scope="module")
def published_student(shared):
  return weight_files.load_params(shared / "reference" / "weights" / "student.model", "student")


def test_fuse_is_pure_and_batched(random_student):
  rng = np.random.default_rng(0)
  ir = rng.random((3, 20, 24, 1), dtype=np.float32)
  vis = rng.random((3, 20, 24, 1), dtype=np.float32)
  out = fusion.fuse(random_student, ir, vis)
  assert out.shape == (3, 20, 24, 1)
  single = fusion.fuse(random_student, ir[1:2], vis[1:2])
  assert_equal_up_to_rounding(out[1:2], single, ulps=network_ulps(random_student))
  np.testing.assert_array_equal(fusion.fuse(random_student, ir, vis), out)


def test_fuse_picks_the_network_from_params(random_student):
  teacher = jax.eval_shape(lambda: networks.init_params("teacher", jax.random.key(1)))
  assert networks.model_of(teacher) == "teacher"
  assert networks.model_of(random_student) == "student"
  with pytest.raises(ValueError, match="neither the student's nor the teacher's"):
    networks.model_of({"conv9": {}})


def test_quantize_minmax_and_clip():
  y = np.array([[0.2, 0.4], [0.6, 1.2]], np.float32)
  np.testing.assert_array_equal(fusion.quantize(y, "minmax"), [[0, 51], [102, 255]])
  np.testing.assert_array_equal(fusion.quantize(y, "clip"), [[51, 102], [153, 255]])
  np.testing.assert_array_equal(fusion.quantize(np.full((2, 2), 0.3, np.float32), "minmax"),
                                np.zeros((2, 2)))
  assert fusion.quantize(y, "minmax", 65535).dtype == np.uint16
  with pytest.raises(ValueError, match="unknown output mode"):
    fusion.quantize(y, "sigmoid")


def test_ycbcr_round_trip():
  rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  back = imageio.ycbcr_to_rgb(imageio.rgb_to_ycbcr(rgb))
  assert np.abs(back.astype(int) - rgb).max() <= 1
  rgb16 = np.random.default_rng(3).integers(0, 65536, (8, 8, 3), dtype=np.uint16)
  back16 = imageio.ycbcr_to_rgb(imageio.rgb_to_ycbcr(rgb16, 65535), 65535)
  assert back16.dtype == np.uint16 and np.abs(back16.astype(int) - rgb16).max() <= 1


def test_colour_mode_keeps_the_visible_chroma(random_student):
  rng = np.random.default_rng(4)
  vis = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
  ir = rng.integers(0, 256, (24, 30), dtype=np.uint8)
  out = fusion.Fuser(random_student, color=True).fuse_images(ir, vis)
  assert out.shape == (24, 30, 3) and out.dtype == np.uint8
  gray = fusion.Fuser(random_student, color=False).fuse_images(ir, vis)
  assert gray.shape == (24, 30)
  # The result's chroma is the visible image's chroma (up to rounding and gamut clipping).
  chroma_out = imageio.rgb_to_ycbcr(out)[..., 1:]
  chroma_vis = imageio.rgb_to_ycbcr(vis)[..., 1:]
  inside = np.all((out > 2) & (out < 253), axis=-1)
  assert np.abs(chroma_out - chroma_vis)[inside].max() < 1.5


def test_colour_mode_uses_infrared_slot_colour_for_pet(random_student):
  rng = np.random.default_rng(5)
  pet = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  mri = rng.integers(0, 256, (16, 16), dtype=np.uint8)
  out = fusion.Fuser(random_student, color=True).fuse_images(pet, mri)
  assert out.shape == (16, 16, 3)


def _chroma(rgb):
  return imageio.rgb_to_ycbcr(rgb, imageio.max_value(rgb))[..., 1:]


def test_colour_mode_takes_the_chroma_from_the_input_that_has_colour(random_student):
  """A gray image stored as RGB (equal channels: the shared MRI files) is gray: the PET
  image's chroma is kept, where it once took the MRI's (R = G = B, no colour at all)."""
  rng = np.random.default_rng(7)
  pet = rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)
  mri = rng.integers(0, 256, (16, 18), dtype=np.uint8)
  mri_rgb = np.repeat(mri[..., None], 3, axis=-1)
  fuser = fusion.Fuser(random_student, color=True)
  out = fuser.fuse_images(pet, mri_rgb)
  assert out.shape == (16, 18, 3)
  inside = np.all((out > 2) & (out < 253), axis=-1)
  assert np.abs(_chroma(out) - _chroma(pet))[inside].max() < 1.5
  np.testing.assert_array_equal(out, fuser.fuse_images(pet, mri))  # as if stored gray
  # The other way round too: a colour visible image, an infrared image stored as RGB.
  vis = rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fuser.fuse_images(mri_rgb, vis), fuser.fuse_images(mri, vis))
  assert not imageio.has_color(mri_rgb) and not imageio.has_color(mri)
  assert imageio.has_color(pet)
  assert fuser.chroma_source(pet, mri_rgb) == "ir" and fuser.chroma_source(mri_rgb, vis) == "vis"


def test_colour_mode_without_colour_gives_gray_and_both_keep_the_visible(random_student):
  rng = np.random.default_rng(8)
  ir, vis = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
  as_rgb = [np.repeat(x[..., None], 3, axis=-1) for x in (ir, vis)]
  fuser = fusion.Fuser(random_student, color=True)
  gray = fusion.Fuser(random_student).fuse_images(ir, vis)
  for pair in ((as_rgb[0], as_rgb[1]), (ir, as_rgb[1]), (as_rgb[0], vis)):
    out = fuser.fuse_images(*pair)
    assert out.shape == (16, 16)  # gray, not RGB with three equal channels
    np.testing.assert_array_equal(out, gray)
    assert fuser.chroma_source(*pair) is None
  # 16-bit gray stored as RGB is gray too.
  deep = np.repeat((ir.astype(np.uint16) * 257)[..., None], 3, axis=-1)
  assert not imageio.has_color(deep) and fuser.fuse_images(deep, vis).shape == (16, 16)
  # Both in colour: the visible image's chroma, as before.
  pet, colour_vis = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  assert fuser.chroma_source(pet, colour_vis) == "vis"
  out = fuser.fuse_images(pet, colour_vis)
  inside = np.all((out > 2) & (out < 253), axis=-1)
  assert np.abs(_chroma(out) - _chroma(colour_vis))[inside].max() < 1.5
  # One differing pixel is colour.
  tinted = as_rgb[1].copy()
  tinted[3, 4, 2] += 1
  assert imageio.has_color(tinted) and fuser.chroma_source(ir, tinted) == "vis"
  # Which input gave the chroma, counted per fused image (for a tool's summary).
  assert fuser.chroma_sources == {None: 4, "vis": 1}


def test_sixteen_bit_inputs_give_sixteen_bit_output(random_student):
  rng = np.random.default_rng(6)
  ir16 = rng.integers(0, 65536, (20, 20), dtype=np.uint16)
  vis8 = rng.integers(0, 256, (20, 20), dtype=np.uint8)
  out = fusion.Fuser(random_student).fuse_images(ir16, vis8)
  assert out.dtype == np.uint16 and out.min() == 0 and out.max() == 65535
  # The same scene in 8 bits gives the same result up to quantisation.
  out8 = fusion.Fuser(random_student).fuse_images((ir16 // 257).astype(np.uint8), vis8)
  assert np.abs(out.astype(float) / 257 - out8).max() < 3


def test_bucketed_student_equals_exact_size(random_student):
  rng = np.random.default_rng(7)
  ir = rng.integers(0, 256, (45, 71), dtype=np.uint8)
  vis = rng.integers(0, 256, (45, 71), dtype=np.uint8)
  a = fusion.Fuser(random_student, bucket=64).fuse_images(ir, vis)
  b = fusion.Fuser(random_student, bucket=0).fuse_images(ir, vis)
  np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bucketed_teacher_equals_exact_size():
  # An odd bucket (15) checks that the teacher's canvas is rounded up to even sides.
  params = random_params("teacher", 5)
  rng = np.random.default_rng(8)
  ir = rng.integers(0, 256, (21, 33), dtype=np.uint8)
  vis = rng.integers(0, 256, (21, 33), dtype=np.uint8)
  bucketed, exact = fusion.Fuser(params, bucket=15), fusion.Fuser(params, bucket=0)
  floats = [f._fuse_gray(*(imageio.to_unit_float(x)[None] for x in (ir, vis)))
            for f in (bucketed, exact)]
  assert_equal_up_to_rounding(floats[0], floats[1], ulps=network_ulps(params))
  a, b = bucketed.fuse_images(ir, vis), exact.fuse_images(ir, vis)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # a rounding boundary at most


def test_pair_of_different_sizes_is_refused(random_student):
  with pytest.raises(ValueError, match="different sizes"):
    fusion.Fuser(random_student).fuse_images(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("dataset,ir_dir,vis_dir",
                         [("RoadScene_test", "ir", "vi"), ("MRI_PET", "PET", "MRI")])
def test_reproduces_published_fused_images(shared, published_student, dataset, ir_dir, vis_dir):
  data = shared / "data" / dataset
  pairs = imageio.pair_folders([data / ir_dir, data / vis_dir])
  assert not pairs.problems
  fuser = fusion.Fuser(published_student, output="minmax")
  worst = 0
  for stem, (ir_path, vis_path) in pairs.pairs:
    out = fuser.fuse_images(imageio.read_image(ir_path), imageio.read_image(vis_path))
    golden = np.asarray(
        Image.open(shared / "reference" / "golden" / "fused" / dataset / f"{stem}.png"))
    assert out.shape == golden.shape, stem
    worst = max(worst, int(np.abs(out.astype(int) - golden).max()))
  assert worst <= 1


def test_fuse_checks_its_inputs_when_traced(random_student):
  x = np.zeros((2, 8, 8, 1), np.float32)
  for ir, message in [(x.astype(np.uint8), r"ir has dtype uint8; fuse takes floats in \[0, 1\]"),
                      (x[0], r"ir has shape \(8, 8, 1\).*try ir\[None\]"),
                      (x[0, ..., 0], r"ir\[None, :, :, None\]"),
                      (np.zeros((2, 1, 8, 8), np.float32), "looks like NCHW"),
                      (np.zeros((2, 8, 8, 3), np.float32), "has 3 channels"),
                      (x[:1], "ir and vis differ in shape")]:
    with pytest.raises(fusion.FusionInputError, match=message):
      fusion.fuse(random_student, ir, x)
  with pytest.raises(fusion.FusionInputError, match="vis has dtype int32"):
    fusion.fuse(random_student, x, x.astype(np.int32))
  # Flax's variables dict is taken as it is.
  np.testing.assert_array_equal(fusion.fuse({"params": random_student}, x, x),
                                fusion.fuse(random_student, x, x))


@pytest.mark.slow
def test_docstring_example_on_eight_devices():
  """`fuse`'s example (jit, vmap, grad, a NamedSharding batch) on 8 fake CPU devices."""
  script = ("import doctest, jax; from mmdrfuse_jax.inference import fusion; "
            "assert len(jax.devices()) == 8; "
            "print(doctest.testmod(fusion, optionflags=doctest.ELLIPSIS))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "failed=0" in done.stdout and "attempted=0" not in done.stdout, done.stdout


def _shipped_student():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "weights", "student.npz")
  return weight_files.load_params(path, "student")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("output", ["minmax", "clip"])
def test_fuse_levels_equals_fuse_then_quantize(dtype, output):
  params = _shipped_student()
  full_scale = np.iinfo(dtype).max
  rng = np.random.default_rng(7)
  # Smooth images with dark and bright regions, so that some pixels clip and others do not.
  ramp = np.linspace(0, 1, 40, dtype=np.float32)
  base = np.stack([np.outer(ramp, ramp[::-1]), np.outer(ramp[::-1], ramp) ** 3,
                   np.full((40, 40), 0.5, np.float32)])[..., None]
  ir = np.round(np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) * full_scale)
  vis = np.round(np.clip(base[::-1] + 0.05 * rng.standard_normal(base.shape), 0, 1) * full_scale)
  ir, vis = ir.astype(dtype), vis.astype(dtype)
  out = np.asarray(fusion.fuse_levels(params, ir, vis, output=output))
  assert out.shape == ir.shape and out.dtype == dtype
  fused = np.asarray(fusion.fuse(params, imageio.to_unit_float(ir), imageio.to_unit_float(vis)))
  for b in range(len(ir)):  # Each image is stretched on its own.
    y = fused[b, ..., 0]
    expected = fusion.quantize(y, output, full_scale)
    # Two compilations of the network may round its float output a few ulps apart; a pixel
    # may then land one level apart, but only where the float value sits on a half level.
    scale = full_scale / (y.max() - y.min()) if output == "minmax" else full_scale
    values = (y - y.min()) * scale if output == "minmax" else np.clip(y, 0, 1) * scale
    near_half = np.abs(values - np.floor(values) - 0.5) < 16 * np.finfo(np.float32).eps * scale
    differs = out[b, ..., 0] != expected
    assert np.all(np.abs(out[b, ..., 0].astype(int) - expected) <= 1)
    assert np.all(near_half[differs]), f"image {b}: {differs.sum()} pixels differ off a half level"
    assert differs.mean() < 1e-3


def test_fuse_levels_refuses_floats_and_mixed_types(random_student):
  u8 = np.zeros((1, 8, 8, 1), np.uint8)
  with pytest.raises(fusion.FusionInputError, match="uint8 or uint16 images of one dtype"):
    fusion.fuse_levels(random_student, u8.astype(np.float32), u8)
  with pytest.raises(fusion.FusionInputError, match="ir uint8 and vis uint16"):
    fusion.fuse_levels(random_student, u8, u8.astype(np.uint16))
  with pytest.raises(ValueError, match="unknown output mode"):
    fusion.fuse_levels(random_student, u8, u8, output="sigmoid")


def test_an_image_that_fills_its_canvas_fuses_as_on_a_larger_one():
  # 128x256 with bucket 128 fills its canvas and goes through `fuse` (the student's banded
  # form); bucket 100 puts it on a 200x300 canvas (`fuse_within`, the padded form).
  params = _shipped_student()
  rng = np.random.default_rng(11)
  ir = (rng.random((128, 256)) * 255).astype(np.uint8)
  vis = (np.outer(np.linspace(0, 1, 128), np.linspace(1, 0, 256)) * 255).astype(np.uint8)
  whole = fusion.Fuser(params, bucket=128).fuse_images(ir, vis)
  on_canvas = fusion.Fuser(params, bucket=100).fuse_images(ir, vis)
  differs = whole != on_canvas
  assert np.abs(whole.astype(int) - on_canvas).max() <= 1 and differs.mean() < 1e-3
