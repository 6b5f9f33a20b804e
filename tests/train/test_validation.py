"""Validation during training: the scores equal bin/evaluate.py's, the logs, the best kept.

One tiny student run (4 steps, 16x16 patches, random teacher, no VGG-19) validates two
procedural 48x48 pairs after steps 2 and 4; the tests read what it wrote back.
"""

import glob
import json
import pathlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.evaluation import scoring
from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.train import loop, run_settings, run_spec, validation

REPO = pathlib.Path(__file__).resolve().parents[2]

METRICS = ("VIF", "Qabf", "SSIM")


def tiny_config(teacher_file):
  config = default.get_config()
  config.data.synthetic_pairs = 1
  config.data.synthetic_height = 32
  config.data.synthetic_width = 32
  config.data.patch_size = 16
  config.data.patch_stride = 16  # 4 patches, 2 steps per epoch.
  config.batch_size = 2
  config.num_epochs = 2
  config.allow_random_vgg = True
  config.teacher_weights = str(teacher_file)
  config.optim.lr = 3e-2  # Large steps, so that the validations differ.
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.progress_bar = False
  # Validation does not depend on the loss: the terms that need VGG-19 are off (a cheaper
  # step to compile).
  config.loss.w_percep = 0.0
  config.refresh.ssim = config.refresh.gmsd = False
  v = config.validation
  v.synthetic_pairs = 2
  v.synthetic_height = v.synthetic_width = 48
  v.every_steps = 2
  v.metrics = ",".join(METRICS)
  v.num_images = 1
  v.best_metric = "VIF"
  return config


def _settings(source, every_steps, names, max_pairs, num_images, best_metric):
  """Validation settings as the run reads them (the pairs' own fields do not matter here)."""
  return run_spec.ValidationSpec(
      source=source, ir_dir="", vis_dir="", split="", datasets=(), synthetic_pairs=0,
      synthetic_height=0, synthetic_width=0, every_steps=every_steps, max_pairs=max_pairs,
      names=names, num_images=num_images, best_metric=best_metric)


def _pairs(config, workdir):
  """The validation pairs a run of `config` in `workdir` validates on."""
  spec = run_spec.RunSpec.from_config(config)
  return validation.prepare_pairs(spec.validation, spec.data, spec.seed, workdir, log=print)


def _rows(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _val_rows(workdir):
  return [r for r in _rows(workdir) if "val/VIF" in r]


@pytest.fixture(scope="module")
def run(tmp_path_factory, teacher_file):
  workdir = tmp_path_factory.mktemp("run")
  lines = []
  result = loop.train_model(tiny_config(teacher_file), workdir, log=lines.append)
  return workdir, result, lines


def _scores(weights, workdir):
  """What bin/evaluate.py --weights computes on the run's validation pairs."""
  triples, problems = scoring.pair_triples(workdir / "validation_pairs" / "ir",
                                              workdir / "validation_pairs" / "vi")
  assert len(triples) == 2 and not problems
  fuser = fusion.Fuser(weight_files.load_params(weights, "student"))
  return scoring.evaluate(triples, names=METRICS, fuse_fn=fuser.fuse_images).means()


@pytest.mark.slow
def test_validates_every_k_steps_with_evaluate_scores(run):
  workdir, result, lines = run
  assert result.weights is not None
  rows = _val_rows(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  assert all(r["val/seconds"] > 0 for r in rows)
  assert rows[0]["val/VIF"] != rows[1]["val/VIF"]
  final = _scores(result.weights, workdir)
  for name in METRICS:
    assert rows[1][f"val/{name}"] == pytest.approx(final[name], rel=1e-6, abs=1e-9), name
  assert sum(line.startswith("validation at step ") for line in lines) == 2
  # Held-out pairs: not the training pair (seed 0, pair 0), and at the validation size.
  stems = sorted(p.stem for p in (workdir / "validation_pairs" / "ir").iterdir())
  assert stems == ["synthetic_0_0001", "synthetic_0_0002"]


def test_tensorboard_holds_validation_scalars_and_images(run):
  workdir, _, _ = run
  (events,) = glob.glob(str(workdir / "events.out.tfevents.*"))
  accumulator = event_accumulator.EventAccumulator(events, size_guidance={"images": 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  assert [e.step for e in accumulator.Scalars("val/VIF")] == [2, 4]
  assert tags["images"] == ["val/images/synthetic_0_0001"]  # num_images = 1.
  images = accumulator.Images("val/images/synthetic_0_0001")
  assert [(e.step, e.height, e.width) for e in images] == [(2, 48, 144), (4, 48, 144)]


def test_strips_reuse_the_fused_images_that_were_scored(run, monkeypatch):
  # Each pair is fused once per validation: the strip shows the image that was scored.
  workdir, _, _ = run
  triples, _ = scoring.pair_triples(workdir / "validation_pairs" / "ir",
                                       workdir / "validation_pairs" / "vi")
  s = _settings("synthetic", 2, METRICS, 0, 2, "")  # Both pairs as strips.
  calls = []
  fuse_images = fusion.Fuser.fuse_images
  monkeypatch.setattr(fusion.Fuser, "fuse_images",
                      lambda self, ir, vis: calls.append(1) or fuse_images(self, ir, vis))
  params = weight_files.load_params(workdir / "student.npz", "student")
  result = validation.Validator(triples, s)(params)
  assert len(calls) == len(triples) == 2 and len(result.strips) == 2
  for t in triples:
    ir, vis = (imageio.read_image(p) for p in (t.ir, t.vis))
    expected = fuse_images(fusion.Fuser(params, output=validation.OUTPUT), ir, vis)
    np.testing.assert_array_equal(result.strips[t.name], np.concatenate([ir, vis, expected], 1))


def test_best_parameters_are_kept(run):
  workdir, _, lines = run
  rows = _val_rows(workdir)
  best_row = max(rows, key=lambda r: r["val/VIF"])
  kept = workdir / "student_best_VIF.npz"
  assert _scores(kept, workdir)["VIF"] == pytest.approx(best_row["val/VIF"], rel=1e-6)
  assert [p.name for p in (workdir / "best_VIF").iterdir() if p.name.isdigit()] == [
      str(best_row["step"])]
  assert any(line.startswith("best validation VIF") for line in lines)


def test_resumed_run_validates_each_step_once(run, tmp_path, teacher_file):
  config = tiny_config(teacher_file)
  stopped = loop.train_model(config, tmp_path, log=lambda *_: None, stop_at_step=3)
  assert stopped.weights is None and [r["step"] for r in _val_rows(tmp_path)] == [2]
  resumed = loop.train_model(config, tmp_path, log=lambda *_: None)
  assert resumed.weights is not None
  workdir, _, _ = run

  def scores(rows):
    return [{k: v for k, v in r.items() if k != "val/seconds"} for r in rows]
  assert scores(_val_rows(tmp_path)) == scores(_val_rows(workdir))
  with np.load(tmp_path / "student_best_VIF.npz") as a, \
       np.load(workdir / "student_best_VIF.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("settings, expected", [
    (dict(ir_dir="/a"), "needs both ir_dir and vis_dir"),
    (dict(ir_dir="/a", vis_dir="/b", synthetic_pairs=2), "several sources"),
    (dict(split="test"), "trains on no built dataset"),
    (dict(synthetic_pairs=2, metrics="VIF,nope"), "unknown metric 'nope'"),
    (dict(synthetic_pairs=2, metrics="VIF", best_metric="Qabf"), "best_metric='Qabf'"),
    (dict(synthetic_pairs=2, every_steps=-1), "every_steps must be an integer >= 0"),
])
def test_setting_mistakes_are_one_line(teacher_file, settings, expected):
  config = tiny_config(teacher_file)
  config.validation.synthetic_pairs = 0
  config.validation.update(settings)
  with pytest.raises(loop.TrainingError, match=expected) as info:
    run_settings.check_config(config)
  assert "\n" not in str(info.value)


def test_unusable_pairs_stop_before_training(tmp_path, teacher_file):
  config = tiny_config(teacher_file)
  config.validation.synthetic_pairs = 0
  config.validation.ir_dir = str(tmp_path / "missing_ir")
  config.validation.vis_dir = str(tmp_path / "missing_vi")
  with pytest.raises(loop.TrainingError, match="missing_ir"):
    loop.train_model(config, tmp_path / "run", log=lambda *_: None)
  assert not (tmp_path / "run" / "checkpoints").exists()
  config = tiny_config(teacher_file)
  config.validation.synthetic_height = 40  # Below VIF's smallest image.
  lines = []
  with pytest.raises(loop.TrainingError, match="none that can be scored"):
    loop.train_model(config, tmp_path / "small", log=lines.append)
  assert sum("too small to score" in line for line in lines) == 2


def test_split_pairs_are_the_built_images(tmp_path, teacher_file):
  # A split of the run's built dataset: only the first `max_pairs` pairs by stem, read from
  # the records one by one, with the pixels the training pipeline reads.
  from mmdrfuse_jax.data import pipeline, prepare, synthetic

  synthetic.write_pairs(tmp_path / "msrs" / "train", 1, 64, 64, seed=0)
  synthetic.write_pairs(tmp_path / "msrs" / "test", 3, 64, 80, seed=1)
  prepare.prepare("msrs", tmp_path / "msrs", tmp_path / "tfds")
  config = tiny_config(teacher_file)
  config.data.synthetic_pairs = 0
  config.data.dataset, config.data.data_dir = "msrs", str(tmp_path / "tfds")
  v = config.validation
  v.synthetic_pairs, v.split, v.max_pairs = 0, "test", 2
  triples = _pairs(config, tmp_path / "run")
  assert [t.name for t in triples] == ["0000", "0001"]
  built = pipeline.PatchDataset.from_tfds(tmp_path / "tfds", "msrs", "test")
  for t in triples:
    i = built.stems.index(t.name)
    np.testing.assert_array_equal(imageio.read_image(t.ir), built.ir_images[i])
    np.testing.assert_array_equal(imageio.read_image(t.vis), built.vis_images[i])


def test_due_steps():
  s = _settings("synthetic", 3, ("VIF",), 0, 0, "")
  assert [k for k in range(1, 11) if s.due(k, 10)] == [3, 6, 9, 10]
  s = _settings("synthetic", 0, ("VIF",), 0, 0, "")
  assert [k for k in range(1, 11) if s.due(k, 10)] == [10]
  assert not _settings("", 3, (), 0, 0, "").due(3, 10)


def _holdout_config(teacher_file, datasets, data_dir):
  """tiny_config training on built `datasets` (16x16 patches), validating on 30% held out."""
  config = tiny_config(teacher_file)
  config.data.synthetic_pairs = 0
  config.data.dataset, config.data.data_dir = datasets, str(data_dir)
  config.data.patch_size = config.data.patch_stride = 16
  config.data.holdout = 0.3
  v = config.validation
  v.synthetic_pairs, v.split, v.max_pairs = 0, "holdout", 0
  return config


def _trained_and_validated(config, workdir):
  """(the training patches, the validated stems), checked to be disjoint and non-empty."""
  validated = {t.name for t in _pairs(config, workdir)}
  dataset = loop.load_dataset(config)
  trained = {dataset.stems[i] for i in set(dataset.patch_image.tolist())}
  assert validated and trained and not validated & trained
  return dataset, validated


def test_holdout_pairs_validate_and_never_train(tmp_path, teacher_file):
  from mmdrfuse_jax.data import prepare, synthetic

  synthetic.write_pairs(tmp_path / "msrs" / "train", 12, 48, 48, seed=0)
  prepare.prepare("msrs", tmp_path / "msrs", tmp_path / "tfds")
  config = _holdout_config(teacher_file, "msrs", tmp_path / "tfds")
  dataset, validated = _trained_and_validated(config, tmp_path / "run")
  assert validated | {dataset.stems[i] for i in set(dataset.patch_image.tolist())} == set(
      dataset.stems)
  config.data.holdout = 0.0
  with pytest.raises(run_settings.ConfigError, match="config.data.holdout"):
    run_spec.RunSpec.from_config(config)


def test_mixture_holds_out_each_dataset_and_never_trains_on_it(tmp_path, teacher_file):
  from mmdrfuse_jax.data import pipeline, prepare, synthetic

  for name, seed in (("msrs", 0), ("llvip", 1)):
    synthetic.write_pairs(tmp_path / name / "train", 10, 48, 48, seed=seed)
  prepare.prepare("msrs", tmp_path / "msrs", tmp_path / "tfds")
  prepare.prepare("llvip", tmp_path / "llvip", tmp_path / "tfds")
  config = _holdout_config(teacher_file, "msrs,llvip", tmp_path / "tfds")
  config.data.weights = "1,2"
  dataset, validated = _trained_and_validated(config, tmp_path / "run")
  assert isinstance(dataset, pipeline.PatchMixture) and dataset.weights == [1.0, 2.0]
  assert {n.split("-")[0] for n in validated} == {"msrs", "llvip"}  # Both datasets' pairs.
  assert validated | {dataset.stems[i] for i in set(dataset.patch_image.tolist())} == set(
      dataset.stems)
  config.data.weights = "1"
  with pytest.raises(run_settings.ConfigError, match="config.data.weights"):
    loop.load_dataset(config)


def test_validation_datasets_give_runs_on_other_data_the_same_pairs(tmp_path, teacher_file):
  """A run on one dataset validates on the held-out pairs of two, exactly those a run on both
  validates on; none of them trains."""
  from mmdrfuse_jax.data import prepare, synthetic

  for name, seed in (("msrs", 0), ("llvip", 1)):
    synthetic.write_pairs(tmp_path / name / "train", 10, 48, 48, seed=seed)
    prepare.prepare(name, tmp_path / name, tmp_path / "tfds")
  both = _holdout_config(teacher_file, "msrs,llvip", tmp_path / "tfds")
  one = _holdout_config(teacher_file, "msrs", tmp_path / "tfds")
  one.validation.datasets = "msrs,llvip"
  on_both = [(t.name, imageio.read_image(t.ir).tobytes()) for t in _pairs(both, tmp_path / "a")]
  on_one = [(t.name, imageio.read_image(t.ir).tobytes()) for t in _pairs(one, tmp_path / "b")]
  assert on_one == on_both and {n.split("-")[0] for n, _ in on_one} == {"msrs", "llvip"}
  dataset = loop.load_dataset(one)
  trained = {f"msrs-{dataset.stems[i]}" for i in set(dataset.patch_image.tolist())}
  assert trained and not trained & {n for n, _ in on_one}
  one.validation.split = ""
  one.validation.synthetic_pairs = 2
  with pytest.raises(run_settings.ConfigError, match="validation.split, which is not set"):
    run_spec.RunSpec.from_config(one)
  one.validation.split, one.validation.synthetic_pairs = "holdout", 0
  one.validation.datasets = "msrs,,llvip"
  with pytest.raises(run_settings.ConfigError, match="config.validation.datasets"):
    run_spec.RunSpec.from_config(one)


def test_validation_reports_the_collapse_diagnostics(run):
  """val/Floor always, and for a student val/DeadUnits: the dead-pixel share over the pairs,
  computed on the images the scoring read (each pair read and fused once)."""
  from mmdrfuse_jax.evaluation import diagnostics

  workdir, _, _ = run
  triples, _ = scoring.pair_triples(workdir / "validation_pairs" / "ir",
                                    workdir / "validation_pairs" / "vi")
  s = _settings("synthetic", 2, ("SD",), 0, 0, "")
  params = weight_files.load_params(workdir / "student.npz", "student")
  result = validation.Validator(triples, s)(params)
  assert set(result.means) == {"SD", "Floor", "DeadUnits"}
  dead = total = 0.0
  for t in triples:
    ir, vis = (imageio.to_unit_float(imageio.to_gray_published(imageio.read_image(p)))
               [None, ..., None] for p in (t.ir, t.vis))
    dead += float(diagnostics.dead_unit_share(params, ir, vis)) * ir.size
    total += ir.size
  assert result.means["DeadUnits"] == pytest.approx(dead / total)
  # All conv1 biases far below zero: every pixel is dead.
  blind = {**params, "conv1": {**params["conv1"], "bias": np.full(4, -1e3, np.float32)}}
  assert validation.Validator(triples, s)(blind).means["DeadUnits"] == 1.0
