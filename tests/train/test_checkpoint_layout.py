"""The documented way to read a run's checkpoint with orbax alone (docs/train.md, "Reading a
checkpoint without this project"): one saved on 8 devices, restored on 1."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Two processes, one of them on 8 fake devices.

REPO = pathlib.Path(__file__).resolve().parents[2]

_SAVE = textwrap.dedent("""
  import pathlib, sys
  import jax, jax.numpy as jnp, numpy as np
  from mmdrfuse_jax.train import loop, refresh, run_checkpoints, update
  assert len(jax.devices()) == 8
  out = pathlib.Path(sys.argv[1])
  mesh = update.make_mesh(8)
  rcfg = refresh.RefreshConfig(placement="sharded")  # bfloat16 memories, split over devices
  state = update.create_train_state("student", update.make_optimizer(1e-3), jax.random.key(0),
                                    20, 16, rcfg, mesh=mesh)
  state = update.place_state(state, mesh, "sharded")
  values = np.random.default_rng(0).uniform(-1, 1, (24, 16, 16, 1)).astype(np.float32)
  state = state.replace(memory={
      key: jax.device_put(refresh.encode(jnp.asarray(values), "bfloat16"), m.sharding)
      for key, m in state.memory.items()})
  run_checkpoints.RunCheckpoints(out / "checkpoints", keep=2).save(3, state)
  np.savez(out / "expected.npz", memory=np.asarray(
      jnp.asarray(values).astype(jnp.bfloat16).astype(jnp.float32)),
      **{f"params/{layer}/{name}": np.asarray(v) for layer, p in state.params.items()
         for name, v in p.items()})
""")

# The recipe, as docs/train.md gives it: orbax's public API and nothing of this project.
_RESTORE = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(sys.argv[1], item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  saved = manager.item_metadata(step)
  saved = getattr(saved, "tree", saved)  # the metadata tree (its shapes and dtypes)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), saved)
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  # bfloat16 memories are kept as their bits (uint16): reinterpret, do not convert.
  memory = {k: jax.lax.bitcast_convert_type(v, jnp.bfloat16).astype(jnp.float32)
            for k, v in state["memory"].items()}

  assert "mmdrfuse_jax" not in sys.modules and len(jax.devices()) == 1
  assert int(state["step"]) == 0 and sorted(state) == sorted(
      ["step", "params", "opt_state", "rng", "memory", "nonfinite_skips", "epoch", "position"])
  np.savez(sys.argv[2], **{f"memory/{k}": np.asarray(v) for k, v in memory.items()},
           **{f"params/{layer}/{name}": np.asarray(v) for layer, p in state["params"].items()
              for name, v in p.items()})
""")


def test_orbax_alone_restores_an_eight_device_checkpoint_on_one(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  saved = subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert saved.returncode == 0, saved.stderr
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  restored = subprocess.run(
      [sys.executable, "-c", _RESTORE, str(tmp_path / "checkpoints"), str(tmp_path / "got.npz")],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert restored.returncode == 0, restored.stderr
  with np.load(tmp_path / "expected.npz") as want, np.load(tmp_path / "got.npz") as got:
    for key in ("memory/best_ssim", "memory/best_gmsd"):
      np.testing.assert_array_equal(got[key], want["memory"], err_msg=key)
    params = [k for k in want.files if k.startswith("params/")]
    assert params
    for key in params:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
