"""Refresh-memory placement: `sharded` and `host` train exactly as `replicated` (8 devices).

One subprocess with 8 fake CPU devices (`XLA_FLAGS` must be set before jax starts, and this
process's jax has started already) trains the same short run through `loop.train_model` in
each placement, then a run whose placement changes at every resume, and writes what the tests
compare: each run's final state (the last step's output), its memories' layout as the step
returned them, and the collectives of the compiled split steps. Each placement compiles once.

The run is a student on 20 patches of 16x16 (not a multiple of 8: the split placements pad to
24 slots) in batches of 8, 3 epochs: epoch 1 writes the SSIM memory, epochs 2-3 read, compare
and refresh it, per sample, so that one batch mixes refreshed and kept slots. Only what the
placements can change is kept, since compiling the step is most of the module's time: one
memory kind (the other is the same code on another dict entry), and no perception, refresh or
distillation loss (their VGG-19 and teacher passes would more than double the compile time).
The placements differ only in where the slots are read and written, which the memory itself
(compared slot by slot) and the refresh gaps logged at every step (computed from the slots
read) show.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.train import loop, refresh, run_record, run_settings, run_spec, update

# Every test here trains in subprocesses: the full suite only (`-m slow`).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]

N = 20  # Patches (memory slots before padding).

_SCRIPT = textwrap.dedent("""
  import json, pathlib, re, sys
  import jax, numpy as np
  from mmdrfuse_jax.configs import default
  from mmdrfuse_jax.models import weight_files
  from mmdrfuse_jax.train import loop, update
  assert len(jax.devices()) == 8, jax.devices()
  out = pathlib.Path(sys.argv[1])
  # A random teacher from its shapes (initialising the network eagerly takes far longer).
  rng = np.random.default_rng(7)
  weight_files.save_params(out / "teacher.npz", {
      layer: {k: rng.normal(0, 0.1, shape).astype(np.float32) for k, shape in p.items()}
      for layer, p in weight_files.expected_shapes("teacher").items()})

  def config(placement):
    c = default.get_config("student")
    c.data.synthetic_pairs = 5
    c.data.synthetic_height = c.data.synthetic_width = 32
    c.data.patch_size = c.data.patch_stride = 16  # 5 pairs x 4 = 20 patches.
    c.batch_size = 8  # 2 steps per epoch over the 8 devices.
    c.num_epochs = 3
    c.loss.w_percep = c.loss.w_refresh = c.loss.w_distill = 0.0
    c.refresh.gmsd = False
    c.refresh.per_sample = True
    c.refresh.placement = placement
    c.allow_random_vgg = True
    c.teacher_weights = str(out / "teacher.npz")
    c.optim.lr = 1e-2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    c.progress_bar = False
    return c

  # The last step's output state (the run's final state), the memories' layout as the step
  # returned them, and the collectives of each placement's compiled step (compiled here, from
  # the first call's arguments: the call then runs that compilation).
  last, layout, collectives = {}, {}, {}
  make_train_step = update.make_train_step

  def spying_make_train_step(cfg, mesh):
    step = make_train_step(cfg, mesh)
    placement = cfg.refresh.placement

    def spying_step(state, batch, frozen):
      if placement not in collectives:
        text = step.jitted.lower(state.replace(memory={}), state.memory, batch,
                                 frozen).compile().as_text()
        collectives[placement] = [
            line.strip() for line in text.splitlines()
            if re.search(r" (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                         r"(-start)?\\(", line)]
      state, metrics = step(state, batch, frozen)
      last["state"] = state
      memory = state.memory["best_ssim"]
      layout[placement] = {
          "shape": list(memory.shape), "memory_kind": memory.sharding.memory_kind,
          "shards": sorted({tuple(s.data.shape) for s in memory.addressable_shards}),
          "devices": len({s.device for s in memory.addressable_shards})}
      return state, metrics
    return spying_step
  update.make_train_step = spying_make_train_step

  def run(name, *placements):
    for placement, stop in zip(placements, (2, 4, None)[-len(placements):]):
      loop.train_model(config(placement), out / name, log=lambda *_: None, stop_at_step=stop)
    state = jax.device_get(last["state"])
    flat = jax.tree_util.tree_flatten_with_path(
        (state.params, state.opt_state, state.memory, state.step, state.epoch, state.position,
         state.rng))[0]
    # The memories' bfloat16 values (kept as uint16 bits) as float32 (exact), which np.load
    # reads back with their NaNs (unwritten slots).
    np.savez(out / f"{name}.npz", **{
        jax.tree_util.keystr(k): v.view(jax.numpy.bfloat16).astype(np.float32)
        if v.dtype == np.uint16 else np.asarray(v) for k, v in flat})

  for placement in ("replicated", "sharded", "host"):
    run(placement, placement)
  # Resumes into another placement: 24 slots -> 20 (truncated), then 20 -> 24 (padded).
  run("host_replicated_sharded", "host", "replicated", "sharded")

  (out / "layout.json").write_text(json.dumps({"layout": layout, "collectives": collectives}))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The subprocess's outputs: `{name: {leaf path: array}}`, layouts, collectives, workdir."""
  out = tmp_path_factory.mktemp("placement")
  # Unoptimised machine code (optimisation level 0): the placements must agree all the same,
  # and the three steps compile in a fraction of the time (the module's setup: 49 s, not 90+).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  states = {}
  for name in ("replicated", "sharded", "host", "host_replicated_sharded"):
    with np.load(out / f"{name}.npz") as f:
      states[name] = dict(f)
  return states, json.loads((out / "layout.json").read_text()), out


def _assert_same_run(a, b):
  """Same leaves and values; memories compared on the N real slots."""
  assert a.keys() == b.keys()
  for key in a:
    x, y = a[key], b[key]
    if "best_" in key:
      x, y = x[:N], y[:N]
    np.testing.assert_array_equal(x, y, err_msg=key)


def _metrics(workdir):
  return [json.loads(row) for row in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("placement", ["sharded", "host"])
def test_placement_equals_replicated(runs, placement):
  states, _, out = runs
  replicated, other = states["replicated"], states[placement]
  _assert_same_run(replicated, other)
  # The memories were written in epoch 1 and read, refreshed or kept in epochs 2-3.
  written = ~np.isnan(replicated["[2]['best_ssim']"][:N, 0, 0, 0])
  assert written.all()
  rows = _metrics(out / placement)
  assert rows == _metrics(out / "replicated")  # Every step's loss, refresh counts and gaps.
  later = [r for r in rows if r["step"] > 2]
  assert all(r["refresh/ssim_first_writes"] < 1 for r in later)
  assert any(0 < r["refresh/ssim_refreshed"] < 1 for r in later)  # Mixed batches.
  assert all(r["refresh/ssim_gap"] != 0 for r in later)
  # The padding slots were never written.
  assert other["[2]['best_ssim']"].shape[0] == 24
  assert np.isnan(other["[2]['best_ssim']"][N:]).all()


def test_memories_live_where_the_placement_says(runs):
  _, info, _ = runs
  layout = info["layout"]
  assert layout["replicated"] == {"shape": [20, 16, 16, 1], "memory_kind": "device",
                                  "shards": [[20, 16, 16, 1]], "devices": 8}
  # Split: each of the 8 devices holds 24 / 8 = 3 slots.
  assert layout["sharded"] == {"shape": [24, 16, 16, 1], "memory_kind": "device",
                               "shards": [[3, 16, 16, 1]], "devices": 8}
  assert layout["host"] == {"shape": [24, 16, 16, 1], "memory_kind": "pinned_host",
                            "shards": [[3, 16, 16, 1]], "devices": 8}


@pytest.mark.parametrize("placement", ["sharded", "host"])
def test_split_step_moves_only_the_batch(runs, placement):
  """No collective of the compiled step carries the whole memory, only the batch's slots."""
  collectives = runs[1]["collectives"][placement]
  assert collectives  # The batch's slots do cross devices.
  whole = [c for c in collectives if "[24,16,16,1]" in c]
  assert not whole, whole
  assert any("[8,16,16,1]" in c for c in collectives), collectives


def test_resume_into_another_placement(runs):
  states, _, out = runs
  _assert_same_run(states["replicated"], states["host_replicated_sharded"])
  assert _metrics(out / "host_replicated_sharded") == _metrics(out / "replicated")


def test_placement_setting(monkeypatch):
  config = default.get_config("student")
  assert config.refresh.placement == "replicated"
  assert "refresh.placement" not in run_record.run_identity(config)  # May change on a rerun.
  assert "refresh.memory_dtype" in run_record.run_identity(config)
  assert run_spec.RunSpec.from_config(config).refresh.placement == "replicated"
  config.refresh.placement = "gpu"
  with pytest.raises(loop.TrainingError,
                     match="config.refresh.placement must be one of replicated, sharded, host"):
    run_settings.check_config(config)
  with pytest.raises(ValueError, match="placement must be one of"):
    refresh.RefreshConfig(placement="gpu")
  # The CPU backend has pinned host memory (the host runs above use it); a backend without it
  # is refused before the run starts.
  assert update.has_pinned_host()
  config.refresh.placement = "host"
  run_settings.check_config(config)
  monkeypatch.setattr(update, "has_pinned_host", lambda device=None: False)
  with pytest.raises(loop.TrainingError, match="placement=host needs pinned host memory"):
    run_settings.check_config(config)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  assert update.memory_slots(20, mesh, "replicated") == 20  # Never padded.


def test_memory_bytes_computed():
  """The README's scaling table: 65,536 bytes a patch (2 kinds, 128x128, bfloat16), D = 8."""
  per = refresh.bytes_per_sample(refresh.RefreshConfig(), 128, 128)
  assert per == 65_536
  assert update.memory_bytes(16_000, 8, "replicated", per) == {
      "slots": 16_000, "device_bytes": 1_048_576_000, "host_bytes": 0}
  assert update.memory_bytes(16_000, 8, "sharded", per) == {
      "slots": 16_000, "device_bytes": 131_072_000, "host_bytes": 0}
  assert update.memory_bytes(16_000, 8, "host", per) == {
      "slots": 16_000, "device_bytes": 0, "host_bytes": 1_048_576_000}
  # Padded as `memory_slots` pads (the runs above: 20 patches, 3 slots on each of 8 devices).
  assert update.memory_bytes(N, 8, "sharded", 512) == {
      "slots": 24, "device_bytes": 3 * 512, "host_bytes": 0}
  assert update.memory_bytes(N, 8, "host", 512) == {
      "slots": 24, "device_bytes": 0, "host_bytes": 24 * 512}
  with pytest.raises(ValueError, match="placement must be one of"):
    update.memory_bytes(N, 8, "gpu", per)


@pytest.mark.parametrize("placement", refresh.PLACEMENTS)
def test_memory_bytes_match_the_placed_arrays(placement):
  """What `bench.py train-step --placement` measures from the shards is what is computed."""
  from mmdrfuse_jax.benchmarks import train_step  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  rcfg = refresh.RefreshConfig(placement=placement)
  memory = refresh.init_memory(update.memory_slots(N, mesh, placement), 16, 16, rcfg,
                               update.memory_sharding(mesh, placement))
  computed = update.memory_bytes(N, 1, placement, refresh.bytes_per_sample(rcfg, 16, 16))
  assert train_step.measured_memory_bytes(memory) == {
      "device_bytes": computed["device_bytes"], "host_bytes": computed["host_bytes"]}


def test_pipeline_host_bytes_match_the_datasets():
  """The computed pipeline bytes are the datasets' own arrays (8 patches of 2 pairs)."""
  from mmdrfuse_jax.benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def index_and_order(ds):
    # The epoch's order and the copy of the process's rows of it that `iterate` keeps (all
    # rows, in one process): twice the order.
    return (ds.patch_image.nbytes + ds.patch_y.nbytes + ds.patch_x.nbytes
            + 2 * ds.epoch_order(0, 0).nbytes)

  in_memory = pipeline.PatchDataset.from_synthetic(2, 256, 256)
  images = sum(x.nbytes for x in in_memory.ir_images + in_memory.vis_images)
  streaming = pipeline.StreamingPatchDataset([{}, {}], [(256, 256)] * 2)
  computed = train_step.pipeline_host_bytes(8, 128)
  assert in_memory.num_patches == streaming.num_patches == 8
  assert computed["in_memory"] == images + index_and_order(in_memory)
  assert computed["streaming"] == index_and_order(streaming) + streaming._cache.max_bytes
