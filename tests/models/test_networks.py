"""Network parity with the published PyTorch code (golden/networks.npz) and shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from rounding import assert_equal_up_to_rounding, network_ulps

from mmdrfuse_jax.models import networks, weight_files


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden(shared):
  with np.load(shared / "reference" / "golden" / "networks.npz") as g:
    return dict(g)


@pytest.fixture(scope="module")
def inputs(golden):
  return np.concatenate([nhwc(golden["ir"]), nhwc(golden["vi"])], axis=-1)


def test_student_has_113_parameters():
  assert networks.count_params(networks.init_params("student", jax.random.key(0))) == 113


def test_teacher_has_556489_parameters():
  shapes = jax.eval_shape(lambda: networks.init_params("teacher", jax.random.key(0)))
  assert networks.count_params(shapes) == 556_489


def test_student_matches_published(shared, golden, inputs):
  params = weight_files.load_params(shared / "reference" / "weights" / "student.model", "student")
  out = networks.Student().apply({"params": params}, inputs)
  for name, key in [("feat", "student_encoder_0"), ("feat_pre", "student_encoder_1"),
                    ("out", "student_decoder_0"), ("out_pre", "student_decoder_1")]:
    assert_equal_up_to_rounding(out[name], nhwc(golden[key]), ulps=network_ulps(params),
                                err_msg=name)


def test_student_matches_published_on_odd_full_image(shared, golden):
  params = weight_files.load_params(shared / "reference" / "weights" / "student.model", "student")
  x = np.stack([golden["full_ir"], golden["full_vi"]], axis=-1)[None]
  assert x.shape == (1, 301, 496, 2)
  out = networks.Student().apply({"params": params}, x)["out"]
  assert_equal_up_to_rounding(out, nhwc(golden["full_student_out"]), ulps=network_ulps(params))


@pytest.mark.slow
def test_teacher_matches_published(shared, golden, inputs):
  params = weight_files.load_params(shared / "reference" / "weights" / "teacher.model", "teacher")
  out = jax.jit(networks.Teacher().apply)({"params": params}, inputs)
  for i in range(6):
    assert_equal_up_to_rounding(out["encoder"][i], nhwc(golden[f"teacher_encoder_{i}"]),
                                ulps=network_ulps(params), err_msg=f"G{i + 1}")
  for name, key in [("out", "teacher_decoder_0"), ("feat", "teacher_decoder_1"),
                    ("out_pre", "teacher_decoder_2"), ("feat_pre", "teacher_decoder_3")]:
    assert_equal_up_to_rounding(out[name], nhwc(golden[key]), ulps=network_ulps(params),
                                err_msg=name)


def test_bicubic_upsampling_uses_pytorch_kernel():
  # PyTorch bicubic (a=-0.75, align_corners=False) of [0, 1, 0, 0] differs from a=-0.5.
  x = np.array([0.0, 1.0, 0.0, 0.0], np.float32).reshape(1, 1, 4, 1)
  x = np.repeat(x, 4, axis=1)
  up = np.asarray(networks.upsample2x_bicubic(x))[0, 0, :, 0]
  # Reference values computed by hand from PyTorch's kernel (border indices clamped).
  a = -0.75
  def w(t):
    t = abs(t)
    return (((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1
            else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a)
  src = [0.0, 1.0, 0.0, 0.0]
  expected = []
  for i in range(8):
    center = (i + 0.5) / 2 - 0.5
    base = int(np.floor(center))
    frac = center - base
    expected.append(sum(src[min(max(base + k, 0), 3)] * w(k - frac) for k in (-1, 0, 1, 2)))
  np.testing.assert_allclose(up, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(31, 40), (17, 17)])
def test_teacher_accepts_odd_sizes(height, width):
  params = networks.init_params("teacher", jax.random.key(1))
  x = np.random.default_rng(0).random((1, height, width, 2), dtype=np.float32)
  out = networks.Teacher().apply({"params": params}, x)
  assert out["out"].shape == (1, height, width, 1)
  assert out["feat"].shape == (1, height, width, 4)
  assert np.all(np.isfinite(out["out"]))
  with pytest.raises(ValueError, match="even"):
    networks.Teacher(any_size=False).apply({"params": params}, x)


@pytest.mark.slow
def test_teacher_on_a_canvas_equals_the_cropped_image():
  # Images of several sizes (odd ones too) top-left on one canvas, the rest filled with
  # values no border should see: inside each true region every output matches the image run
  # alone, and the half-resolution taps match on the (even) half size.
  params = random_params("teacher", 3)
  rng = np.random.default_rng(3)
  sizes = [(7, 9), (12, 6), (4, 4)]  # odd sides, the canvas's own height, the smallest
  canvas = np.full((len(sizes), 12, 10, 2), 0.77, np.float32)
  images = []
  for i, (h, w) in enumerate(sizes):
    images.append(rng.random((1, h, w, 2), dtype=np.float32))
    canvas[i, :h, :w] = images[-1][0]
  apply = jax.jit(networks.Teacher().apply)
  ulps = network_ulps(params)  # Rounding differs with the CPU: see tests/rounding.py.
  on_canvas = apply({"params": params}, canvas, sizes=np.array(sizes, np.int32))
  for i, (h, w) in enumerate(sizes):
    alone = apply({"params": params}, images[i])
    for name in ("out", "out_pre", "feat_pre"):
      assert_equal_up_to_rounding(on_canvas[name][i, :h, :w], alone[name][0], ulps=ulps,
                                  err_msg=f"{name} of {h}x{w}")
    half = (h + h % 2) // 2, (w + w % 2) // 2
    assert_equal_up_to_rounding(on_canvas["encoder"][5][i, :half[0], :half[1]],
                                alone["encoder"][5][0], ulps=ulps, err_msg=f"G6 of {h}x{w}")
  with pytest.raises(ValueError, match="even sides"):
    networks.Teacher().apply({"params": params}, canvas[:, :11], sizes=np.array(sizes, np.int32))


def test_teacher_on_even_size_is_unchanged_by_any_size_rule():
  params = networks.init_params("teacher", jax.random.key(2))
  x = np.random.default_rng(1).random((1, 16, 24, 2), dtype=np.float32)
  a = networks.Teacher(any_size=True).apply({"params": params}, x)["out"]
  b = networks.Teacher(any_size=False).apply({"params": params}, x)["out"]
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("height,width", [(37, 51), (64, 64), (2, 5), (63, 2)])
def test_student_on_canvas_equals_cropped(height, width):
  params = networks.init_params("student", jax.random.key(3))
  rng = np.random.default_rng(height * width)
  x = rng.random((1, height, width, 2), dtype=np.float32)
  canvas = np.full((1, 64, 64, 2), 7.0, np.float32)  # Garbage outside the image must not leak in.
  canvas[:, :height, :width] = x
  ref = networks.Student().apply({"params": params}, x)["out"]
  out = networks.Student().apply({"params": params}, canvas,
                                 sizes=np.array([[height, width]]))["out"]
  np.testing.assert_array_equal(np.asarray(out)[:, :height, :width], ref)


def test_get_model_rejects_unknown_name():
  with pytest.raises(ValueError, match="unknown model"):
    networks.get_model("professor")
  with pytest.raises(ValueError, match="unknown model"):
    networks.layer_names("professor")


def test_model_is_told_from_layer_names():
  for name in networks.MODELS:
    params = jax.eval_shape(lambda name=name: networks.init_params(name, jax.random.key(0)))
    assert set(params) == set(networks.layer_names(name))
    assert networks.find_model(params) == networks.model_of(params) == name
    assert networks.model_of(list(networks.layer_names(name))) == name
  assert networks.find_model(["conv1"]) is None
  assert networks.find_model(networks.STUDENT_LAYERS + ("conv3",)) is None
  with pytest.raises(ValueError, match=r"\['conv1'\] are neither"):
    networks.model_of(iter(["conv1"]))


def _reference_student(params, x):
  """The student with XLA's convolution, to check the planar implementation and its grads."""
  def conv(y, p):
    y = networks.reflect_pad(y)
    return jax.lax.conv_general_dilated(y, p["kernel"], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + p["bias"]
  return jax.numpy.tanh(conv(jax.nn.relu(conv(x, params["conv1"])), params["conv2"]))


@pytest.mark.slow
def test_student_values_and_gradients_match_xla_convolution():
  params = networks.init_params("student", jax.random.key(4))
  rng = np.random.default_rng(4)
  x = rng.random((2, 19, 23, 2), dtype=np.float32)
  target = rng.random((2, 19, 23, 1), dtype=np.float32)

  def loss(p, f):
    return jax.numpy.mean((f(p, x) - target) ** 2)

  def ours(p, x):
    return networks.Student().apply({"params": p}, x)["out"]

  assert_equal_up_to_rounding(ours(params, x), _reference_student(params, x),
                              ulps=network_ulps(params))
  g_ours = jax.grad(loss)(params, ours)
  g_ref = jax.grad(loss)(params, _reference_student)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         g_ours, g_ref)


@pytest.mark.slow
def test_xla_and_planar_convolutions_agree():
  """`conv_impl` picks how the narrow convolutions run, never what they compute."""
  rng = np.random.default_rng(5)
  student = networks.init_params("student", jax.random.key(5))
  x = rng.random((2, 19, 23, 2), dtype=np.float32)
  canvas = np.zeros((2, 32, 32, 2), np.float32)
  canvas[:, :19, :23] = x
  sizes = np.array([[19, 23], [17, 20]])
  for kwargs, args in (({}, (x,)), ({"sizes": sizes}, (canvas,))):
    planar, xla = (jax.jit(networks.Student(conv_impl=impl).apply)({"params": student}, *args,
                                                                 **kwargs)
                   for impl in ("planar", "xla"))
    for key in ("feat", "out"):
      assert_equal_up_to_rounding(xla[key], planar[key], ulps=network_ulps(student), err_msg=key)
  # The teacher's conv11 (64 -> 4): the tap matmul or XLA's convolution on the same params.
  y = jax.numpy.asarray(rng.random((1, 10, 12, 64), dtype=np.float32))
  conv11 = networks.TapMatmulConv(4).init(jax.random.key(6), y)["params"]
  planar = networks.TapMatmulConv(4).apply({"params": conv11}, y)
  xla = networks._conv(4, "conv11").apply({"params": conv11}, y)  # pylint: disable=protected-access
  assert_equal_up_to_rounding(xla, planar, ulps=network_ulps(conv11))
  assert networks.resolve_conv_impl("auto") == "planar"  # This CPU.
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    networks.resolve_conv_impl("winograd")


def _published_student(params, x):
  """The student as published, from its definition: reflection pad, 3x3 conv, ReLU, reflection
  pad, 3x3 conv, tanh; every padded array written out (the form the banded path replaces)."""
  pad = lambda p: jnp.pad(p, ((0, 0), (1, 1), (1, 1)), mode="reflect")  # noqa: E731
  c1, c2 = params["conv1"], params["conv2"]
  feat = [jax.nn.relu(f) for f in networks.conv3x3_planes(
      [pad(x[..., 0]), pad(x[..., 1])], c1["kernel"], c1["bias"])]
  (out_pre,) = networks.conv3x3_planes([pad(f) for f in feat], c2["kernel"], c2["bias"])
  return out_pre[..., None], jnp.tanh(out_pre)[..., None]


@pytest.mark.parametrize("height,width", [(5, 5), (5, 9), (6, 5), (17, 23), (64, 80)])
def test_the_banded_student_equals_the_published_computation(height, width):
  # Sizes from the smallest the banded path takes (5, where the bands meet in the middle).
  params = jax.tree_util.tree_map(
      lambda a: a + 0.3 * np.random.default_rng(a.size).standard_normal(a.shape, np.float32),
      networks.init_params("student", jax.random.key(3)))
  x = np.random.default_rng(height * width).random((2, height, width, 2), dtype=np.float32)
  out = jax.jit(networks.Student(conv_impl="planar", banded=True).apply)({"params": params}, x)
  out_pre, fused = jax.jit(_published_student)(params, x)
  # The same sums in the same order; XLA may still vectorise the two programs differently
  # on another CPU, so the claim is "equal up to rounding" (tests/rounding.py), which a
  # misplaced band or a wrong reflection misses by thousands of times.
  ulps = network_ulps(params)
  assert_equal_up_to_rounding(out["out_pre"], out_pre, ulps=ulps)
  assert_equal_up_to_rounding(out["out"], fused, ulps=ulps)
  # The gradient of a loss on the fused image, to float rounding (sums in another order).
  banded = networks.Student(conv_impl="planar", banded=True)
  grad = jax.grad(lambda p: jnp.sum(banded.apply({"params": p}, x)["out"] ** 2))(params)
  want = jax.grad(lambda p: jnp.sum(_published_student(p, x)[1] ** 2))(params)
  for got, expected in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fuse_runs_the_banded_form_and_training_the_padded_one():
  assert networks.get_model("student", inference=True).banded
  assert not networks.get_model("student").banded  # What the train step builds.
  empty = np.zeros((0, 16, 16, 2), np.float32)  # No pixel to key a cond by: the padded form.
  params = networks.init_params("student", jax.random.key(0))
  assert networks.Student(banded=True).apply({"params": params}, empty)["out"].shape == (
      0, 16, 16, 1)


def test_the_banded_student_is_unchanged_under_vmap_and_with_weights_closed_over():
  # Its fusion barriers are conds keyed by a weight and a pixel; each must still hold the
  # same values where XLA removes one (weights as constants; a batched pixel).
  params = networks.init_params("student", jax.random.key(4))
  x = np.random.default_rng(5).random((3, 1, 12, 16, 2), dtype=np.float32)
  apply = networks.Student(conv_impl="planar", banded=True).apply
  want = jnp.stack([_published_student(params, xi)[1] for xi in x])
  closed = jax.jit(lambda xi: apply({"params": params}, xi)["out"])
  mapped = jax.jit(jax.vmap(lambda xi: apply({"params": params}, xi)["out"]))
  ulps = network_ulps(params)
  assert_equal_up_to_rounding(jnp.stack([closed(xi) for xi in x]), want, ulps=ulps)
  assert_equal_up_to_rounding(mapped(x), want, ulps=ulps)
  nan_corner = x[0].copy()
  nan_corner[0, 0, 0, 0] = np.nan  # The pixel key is NaN: the other branch, the same values.
  got = closed(nan_corner)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(_published_student(params, nan_corner)[1]))
