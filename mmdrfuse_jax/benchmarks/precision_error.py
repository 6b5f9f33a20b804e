"""`bench.py precision`: each loss term's relative error in each precision mode against `exact`.

On the published code's golden batch (`$MMDRFUSE_SHARED/reference/golden`: four 128x128
infrared/visible pairs with the published student's outputs) and the published teacher
(`reference/weights/teacher.model`), with the seeded random VGG-19 of the parity tests, every
term of the training loss is computed as a training step computes it: VGG-19 taps and the
teacher's targets in the mode under test, the loss arithmetic in float32. Terms that read
neither network (intensity, gradient) are the same in every mode and are listed as such.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.models import precision, vgg, weight_files
from mmdrfuse_jax.train import distill, losses, update


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "precision", help="loss terms' relative error per precision mode (shared goldens)")
  parser.add_argument("--shared", default=os.environ.get("MMDRFUSE_SHARED", "../shared"),
                      help="the reference folder (default $MMDRFUSE_SHARED or ../shared)")
  parser.set_defaults(run=run)


def _nhwc(a: np.ndarray) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1))


def loss_terms(mode: str, batch: dict[str, jax.Array], vgg_params, teacher_params
               ) -> dict[str, jax.Array]:
  """The loss terms of the golden batch, VGG-19 and the teacher computing in `mode`."""
  ir, vi, out, s_feat = batch["ir"], batch["vi"], batch["out"], batch["s_feat"]
  taps = update.vgg_taps(vgg_params, jnp.concatenate([out, ir, vi]), vgg.NUM_TAPS, mode)
  taps_out, taps_ir, taps_vi = zip(*[jnp.split(t, 3) for t in taps])
  targets = distill.teacher_targets(teacher_params, jnp.concatenate([ir, vi], -1), mode)
  t_feat, t_out = targets[..., :1], targets[..., 1:]
  # The teacher's output stands in for a refresh memory, as in the parity tests.
  taps_mem = update.vgg_taps(vgg_params, t_out, vgg.NUM_TAPS, mode)
  terms = {
      "intensity": losses.intensity_loss(out, ir, vi),
      "gradient": losses.gradient_loss(out, ir, vi),
      "perception": losses.perception_loss(taps_out, taps_ir, taps_vi),
      "distillation": losses.distillation_loss(s_feat, t_feat, out, t_out),
      "refresh_ssim": losses.refresh_ssim_loss(taps_mem, taps_out, t_out, out),
      "refresh_gmsd": losses.refresh_gmsd_loss(taps_mem[:3], taps_out[:3], t_out, out),
  }
  return terms


def run(args: argparse.Namespace) -> dict:
  golden = pathlib.Path(args.shared) / "reference" / "golden" / "networks.npz"
  teacher_file = pathlib.Path(args.shared) / "reference" / "weights" / "teacher.model"
  if not golden.is_file() or not teacher_file.is_file():
    raise SystemExit(f"error: {args.shared}: no reference goldens and teacher weights there "
                     "(set --shared or $MMDRFUSE_SHARED)")
  with np.load(golden) as net:
    batch = {"ir": _nhwc(net["ir"]), "vi": _nhwc(net["vi"]),
             "out": _nhwc(net["student_decoder_0"]), "s_feat": _nhwc(net["student_encoder_0"])}
  vgg_params = jax.tree_util.tree_map(jnp.asarray, vgg.random_params())
  teacher = weight_files.load_params(teacher_file, "teacher")
  compute = jax.jit(loss_terms, static_argnums=0)
  values = {mode: {k: float(v) for k, v in compute(mode, batch, vgg_params, teacher).items()}
            for mode in precision.MODES}
  exact = values["exact"]
  rel = {mode: {k: abs(v - exact[k]) / abs(exact[k]) for k, v in values[mode].items()}
         for mode in precision.MODES if mode != "exact"}
  return {"benchmark": "precision", "exact": exact, "relative_error": rel,
          "golden": str(golden)}
