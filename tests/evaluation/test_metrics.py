"""Tests of the fusion metrics: golden per-image values, properties, padded evaluation."""

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.evaluation import metrics, scoring
from mmdrfuse_jax.io import imageio

GOLDEN_SETS = {
    # set: (infrared-slot folder, visible-slot folder)
    "RoadScene_test": ("ir", "vi"),
    "MRI_PET": ("PET", "MRI"),
}


def _within(value: float, golden: float) -> bool:
  """1e-3 relative, or 1e-3 absolute where the golden value is below 1."""
  return abs(value - golden) <= 1e-3 * max(1.0, abs(golden))


@pytest.fixture(scope="module", params=sorted(GOLDEN_SETS))
def golden_set(request, shared):
  name = request.param
  ir_dir, vis_dir = GOLDEN_SETS[name]
  data = shared / "data" / name
  triples, problems = scoring.pair_triples(data / ir_dir, data / vis_dir,
                                              shared / "reference" / "golden" / "fused" / name)
  result = scoring.evaluate(triples)
  with open(shared / "reference" / "golden" / "metrics" / f"{name}.csv", newline="") as f:
    golden = {row["name"]: row for row in csv.DictReader(f)}
  return name, problems, result, golden


@pytest.mark.slow
def test_golden_per_image(golden_set):
  name, problems, result, golden = golden_set
  assert not problems and not result.problems
  scores = dict(result.rows)
  assert set(scores) == set(golden), name
  columns = [c for c in next(iter(golden.values())) if c != "name"]
  assert set(columns) <= set(metrics.METRIC_NAMES)
  bad = []
  for image, row in golden.items():
    for metric in columns:
      value, want = scores[image][metric], float(row[metric])
      if not _within(value, want):
        bad.append(f"{name}/{image} {metric}: {value:.6f} != {want:.6f}")
  assert not bad, "\n".join(bad)


def _numpy_psnr_mse(f, a, b):
  f, a, b = (x.astype(np.float64) for x in (f, a, b))
  m = (np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2
  return 10 * np.log10(f.max() ** 2 / m), m


def test_psnr_mse_against_numpy(shared):
  data = shared / "data" / "MRI_PET"
  fused = scoring.read_for_evaluation(shared / "reference/golden/fused/MRI_PET/11.png")
  a = scoring.read_for_evaluation(data / "PET" / "11.png")
  b = scoring.read_for_evaluation(data / "MRI" / "11.png")
  out = metrics.all_metrics(fused, a, b, names=("PSNR", "MSE"))
  want_psnr, want_mse = _numpy_psnr_mse(fused, a, b)
  assert float(out["PSNR"]) == pytest.approx(want_psnr, rel=1e-5)
  assert float(out["MSE"]) == pytest.approx(want_mse, rel=1e-5)


# Properties on small random images (one compile per shape, shared through fixtures).

H, W = 48, 44


def _random_images(seed, n=3):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (H, W)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def images():
  return _random_images(0)


def _all(f, a, b, size=None, **kw):
  # Always an explicit size, so that padded and unpadded calls of one shape share a compile.
  size = np.array(f.shape[-2:], np.int32) if size is None else size
  return {k: float(v)
          for k, v in metrics.all_metrics(f, a, b, size, names=metrics.ALL_NAMES, **kw).items()}


@pytest.mark.slow
def test_identical_images_extremes(images):
  x = images[0]
  out = _all(x, x, x)
  assert out["SSIM"] == pytest.approx(2.0, abs=1e-6)
  assert out["CC"] == pytest.approx(1.0, abs=1e-6)
  assert out["VIF"] == pytest.approx(2.0, abs=1e-5)
  assert out["MSE"] == 0.0
  assert math.isinf(out["PSNR"])
  # MI(F, F) is F's own entropy, in nats here and in bits for EN.
  assert out["MI"] == pytest.approx(2 * out["EN"] * math.log(2), rel=1e-5)
  ssim255 = metrics.ssim(x, x, x, data_range=255.0)
  assert float(ssim255) == pytest.approx(2.0, abs=1e-6)


def test_sources_swap_symmetry(images):
  f, a, b = images
  ab, ba = _all(f, a, b), _all(f, b, a)
  for name in ("MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR", "MSE"):
    assert ab[name] == pytest.approx(ba[name], rel=1e-5), name


def test_ssim_symmetric_in_its_two_images(images):
  f, a, _ = images
  assert float(metrics.ssim(f, a, a)) == pytest.approx(float(metrics.ssim(a, f, f)), rel=1e-6)


def test_invariances(images):
  f, a, b = images
  shifted = np.clip(f, 0, 200) + 50.0
  assert float(metrics.sd(shifted)) == pytest.approx(float(metrics.sd(np.clip(f, 0, 200))),
                                                     rel=1e-5)
  perm = np.random.default_rng(1).permutation(256).astype(np.float32)
  a_perm = perm[a.astype(np.int64)]
  f_perm = perm[f.astype(np.int64)]
  assert float(metrics.mi(f, a_perm, b)) == pytest.approx(float(metrics.mi(f, a, b)), rel=1e-5)
  assert float(metrics.en(f_perm)) == pytest.approx(float(metrics.en(f)), rel=1e-6)
  assert float(metrics.mi(f, a, b, base=2.0)) == pytest.approx(
      float(metrics.mi(f, a, b)) / math.log(2), rel=1e-6)


def test_constant_image():
  c = np.full((H, W), 77.0, np.float32)
  assert float(metrics.en(c)) == 0.0
  assert float(metrics.sd(c)) == 0.0
  assert float(metrics.sf(c)) == 0.0
  assert float(metrics.ag(c)) == 0.0


def test_degenerate_images_give_the_reference_evaluator_values(images):
  """A constant fused image: CC is 0/0 (NaN, as np.corrcoef gives); max(F) = 0: PSNR -inf.

  `metrics` returns these raw values; `scoring` reports every non-finite value as
  undefined (None) instead of a number.
  """
  _, a, b = images
  zero = np.zeros((H, W), np.float32)
  out = _all(zero, a, b)
  assert math.isnan(out["CC"]) and out["PSNR"] == -math.inf
  with np.errstate(invalid="ignore", divide="ignore"):
    assert np.isnan(np.corrcoef(zero.ravel(), a.ravel())[0, 1])
  assert math.isfinite(out["SCD"]) and math.isfinite(out["MSE"])
  assert scoring.defined(out["CC"]) is None and scoring.defined(out["PSNR"]) is None
  assert scoring.defined(out["MSE"]) == out["MSE"]


def test_against_plain_numpy(images):
  f, a, b = (x.astype(np.float64) for x in images)
  out = _all(*images)
  assert out["SD"] == pytest.approx(np.std(f), rel=1e-5)
  sf = np.sqrt(np.mean((f[:, 1:] - f[:, :-1]) ** 2) + np.mean((f[1:] - f[:-1]) ** 2))
  assert out["SF"] == pytest.approx(sf, rel=1e-5)
  gy, gx = np.gradient(f)
  assert out["AG"] == pytest.approx(np.mean(np.sqrt((gx ** 2 + gy ** 2) / 2)), rel=1e-5)

  def corr(x, y):
    return np.corrcoef(x.ravel(), y.ravel())[0, 1]

  assert out["CC"] == pytest.approx((corr(a, f) + corr(b, f)) / 2, abs=1e-5)
  assert out["SCD"] == pytest.approx(corr(a, f - b) + corr(b, f - a), abs=1e-5)
  hist = np.bincount(f.astype(np.int64).ravel(), minlength=256) / f.size
  nz = hist[hist > 0]
  assert out["EN"] == pytest.approx(-np.sum(nz * np.log2(nz)), rel=1e-5)


@pytest.mark.slow
def test_padded_canvas_equals_crop_and_vmap_equals_single(images):
  f, a, b = images
  exact = _all(f, a, b)
  rng = np.random.default_rng(2)
  canvas = [rng.integers(0, 256, (H + 9, W + 13)).astype(np.float32) for _ in range(3)]
  for c, x in zip(canvas, images):
    c[:H, :W] = x
  padded = _all(*canvas, size=jnp.array([H, W]))
  for name in metrics.ALL_NAMES:
    assert padded[name] == pytest.approx(exact[name], rel=2e-5, abs=1e-6), name
  batch = [np.stack([c, np.roll(c, 3, axis=1)]) for c in canvas]
  sizes = np.array([[H, W], [H + 9, W + 13]], np.int32)
  out = metrics.all_metrics(*batch, sizes, names=metrics.ALL_NAMES)
  second = _all(*(x[1] for x in batch))
  for name in metrics.ALL_NAMES:
    assert float(out[name][0]) == pytest.approx(exact[name], rel=2e-5, abs=1e-6), name
    assert float(out[name][1]) == pytest.approx(second[name], rel=2e-5, abs=1e-6), name


def test_jit_and_vmap_of_single_metrics(images):
  f, a, b = (jnp.stack([x, x[::-1]]) for x in images)
  v = jax.jit(jax.vmap(metrics.qabf))(f, a, b)
  assert v.shape == (2,)
  assert float(v[0]) == pytest.approx(float(metrics.qabf(*images)), rel=1e-6)


def test_unknown_metric_name(images):
  with pytest.raises(ValueError, match="unknown metrics"):
    metrics.all_metrics(*images, names=("EN", "FOO"))


# Reading images for evaluation.


def test_evaluation_gray_conversion():
  rgb = np.array([[[255, 0, 0], [10, 200, 30], [1, 2, 3]]], np.uint8)
  f = rgb.astype(np.float32)
  want = np.round(f[..., 0] * np.float32(0.299) + f[..., 1] * np.float32(0.587)
                  + f[..., 2] * np.float32(0.114))
  np.testing.assert_array_equal(imageio.to_gray_evaluation(rgb), want)
  np.testing.assert_array_equal(imageio.to_gray_evaluation(rgb.astype(np.uint16) * 257), want)
  gray = np.array([[0, 7, 255]], np.uint8)
  np.testing.assert_array_equal(imageio.to_gray_evaluation(gray), gray.astype(np.float32))
  np.testing.assert_array_equal(imageio.to_gray_evaluation(gray.astype(np.uint16) * 257), gray)


def test_sixteen_to_eight_bits_is_one_rounding_everywhere():
  # Every 16-bit value: the exact integer scaling equals float rounding of v / 257, half up
  # (as files are written) and half to even in float32 (as the evaluator reads gray files).
  every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  eight = imageio.to_8bit(every)
  assert eight.dtype == np.uint8 and eight[0, 0] == 0 and eight[-1, -1] == 255
  np.testing.assert_array_equal(eight, np.floor(every / 257.0 + 0.5))
  np.testing.assert_array_equal(imageio.to_gray_evaluation(every), eight.astype(np.float32))
  np.testing.assert_array_equal(imageio.to_8bit(eight), eight)


def test_assign_buckets():
  sizes = [(300, 500), (290, 480), (100, 100), (301, 499)]
  canvases = scoring.assign_buckets(sizes, multiple=32, max_waste=3.0)
  assert canvases[0] == canvases[1] == canvases[3] == (320, 512)
  assert canvases[2] == (128, 128)
  assert scoring.assign_buckets(sizes, multiple=1, max_waste=1.0) == sizes


@pytest.mark.slow
def test_differentiable_metrics_have_gradients_and_histograms_do_not():
  rng = np.random.default_rng(0)
  a, b, f = (jnp.asarray(rng.random((48, 48)) * 255, jnp.float32) for _ in range(3))
  single = {"EN": metrics.en, "SD": metrics.sd, "SF": metrics.sf, "AG": metrics.ag}
  for name in metrics.ALL_NAMES:
    fn = getattr(metrics, {"Floor": "floor_share"}.get(name, name.lower()))
    grad = jax.grad(lambda x, fn=fn, name=name: fn(x) if name in single else fn(x, a, b))(f)
    assert np.all(np.isfinite(grad)), name
    if name in metrics.DIFFERENTIABLE:
      assert np.abs(grad).max() > 0, name
    else:
      assert name in ("EN", "MI", "Floor") and np.abs(grad).max() == 0, name
