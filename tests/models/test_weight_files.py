"""Weight import (restricted PyTorch reader) and the project's own weight formats."""

import logging
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
from conftest import random_params

from mmdrfuse_jax.io import torch_reader
from mmdrfuse_jax.models import networks, weight_files


@pytest.fixture(scope="module")
def student_params():
  return jax.tree_util.tree_map(np.asarray, networks.init_params("student", jax.random.key(0)))


def _write_zip_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/version", b"3\n")


def test_reads_published_weights(shared):
  state = torch_reader.load_state_dict(shared / "reference" / "weights" / "student.model")
  assert {k: v.shape for k, v in state.items()} == {
      "conv1.1.weight": (4, 2, 3, 3), "conv1.1.bias": (4,),
      "conv2.1.weight": (1, 4, 3, 3), "conv2.1.bias": (1,)}
  teacher = torch_reader.load_state_dict(shared / "reference" / "weights" / "teacher.model")
  assert sum(v.size for v in teacher.values()) == 556_489


def test_writer_round_trip_keeps_values_and_strides(tmp_path):
  state = {"a": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # Non-contiguous input.
           "b": np.array(3, np.int64), "c": np.ones((2, 0), np.float64)}
  torch_reader.save_state_dict(tmp_path / "x.pth", state)
  loaded = torch_reader.load_state_dict(tmp_path / "x.pth")
  assert list(loaded) == list(state)
  for k in state:
    np.testing.assert_array_equal(loaded[k], state[k])
    assert loaded[k].dtype == state[k].dtype


def test_published_state_dict_round_trip(tmp_path, student_params):
  state = weight_files.params_to_state_dict(student_params)
  torch_reader.save_state_dict(tmp_path / "s.pth", state)
  loaded = weight_files.load_params(tmp_path / "s.pth", "student")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, student_params)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("touch /tmp/mmdrfuse_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
  marker = "/tmp/mmdrfuse_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  path = tmp_path / "evil.pth"
  _write_zip_pickle(path, pickle.dumps({"conv1.1.weight": _RunsCode()}, protocol=2))
  with pytest.raises(torch_reader.WeightsError, match=r"refusing to load (posix|os)\.system"):
    weight_files.load_params(path, "student")
  assert not os.path.exists(marker)


def test_eval_global_is_refused(tmp_path):
  payload = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R."
  path = tmp_path / "evil2.pth"
  _write_zip_pickle(path, payload)
  with pytest.raises(torch_reader.WeightsError, match="refusing to load builtins.eval"):
    torch_reader.load_state_dict(path)


def test_non_mapping_pickle_is_refused(tmp_path):
  path = tmp_path / "list.pth"
  _write_zip_pickle(path, pickle.dumps([1, 2, 3], protocol=2))
  with pytest.raises(torch_reader.WeightsError, match="does not hold a state dict"):
    torch_reader.load_state_dict(path)


def test_truncated_file(tmp_path, shared):
  data = (shared / "reference" / "weights" / "teacher.model").read_bytes()
  path = tmp_path / "cut.model"
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_reader.WeightsError, match="cut.model: not a PyTorch zip checkpoint"):
    weight_files.load_params(path, "teacher")


def test_missing_file(tmp_path):
  with pytest.raises(torch_reader.WeightsError, match="no such weights file"):
    weight_files.load_params(tmp_path / "nope.model", "student")


def test_teacher_file_given_as_student(shared):
  with pytest.raises(weight_files.WeightsError,
                     match="holds teacher weights, but the student was asked for"):
    weight_files.load_params(shared / "reference" / "weights" / "teacher.model", "student")


def test_wrong_shape_is_named(tmp_path, student_params):
  state = weight_files.params_to_state_dict(student_params)
  state["conv1.1.weight"] = np.zeros((8, 2, 3, 3), np.float32)
  torch_reader.save_state_dict(tmp_path / "w.pth", state)
  with pytest.raises(weight_files.WeightsError,
                     match=r"conv1 kernel has shape \(3, 3, 2, 8\), expected \(3, 3, 2, 4\)"):
    weight_files.load_params(tmp_path / "w.pth", "student")


def test_missing_key_is_named(tmp_path, student_params):
  state = weight_files.params_to_state_dict(student_params)
  del state["conv2.1.bias"]
  torch_reader.save_state_dict(tmp_path / "m.pth", state)
  with pytest.raises(weight_files.WeightsError, match="missing conv2 bias"):
    weight_files.load_params(tmp_path / "m.pth", "student")


def test_unrelated_state_dict(tmp_path):
  torch_reader.save_state_dict(tmp_path / "r.pth", {"fc.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(weight_files.WeightsError, match="unexpected entry 'fc.weight'"):
    weight_files.load_params(tmp_path / "r.pth", "student")


def test_npz_round_trip_and_size(tmp_path, student_params):
  path = tmp_path / "student.npz"
  weight_files.save_params(path, student_params)
  loaded = weight_files.load_params(path, "student")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, student_params)
  assert path.stat().st_size < 4096
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_npz_with_objects_is_refused(tmp_path):
  path = tmp_path / "obj.npz"
  np.savez(path, **{"conv1/kernel": np.array([object()], dtype=object)})
  with pytest.raises(weight_files.WeightsError, match="not a plain-array .npz"):
    weight_files.load_params(path, "student")


def test_orbax_round_trip(tmp_path, student_params):
  path = tmp_path / "student_ckpt"
  weight_files.save_params(path, student_params)
  loaded = weight_files.load_params(path, "student")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, student_params)
  with pytest.raises(weight_files.WeightsError, match="holds student weights, but the teacher"):
    weight_files.load_params(path, "teacher")


def test_training_checkpoints_give_their_parameters(tmp_path, student_params):
  # --weights may name a training run's folder, its checkpoints/ or one step: the newest
  # committed step (or that step) gives its parameters alone.
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager((tmp_path / "run" / "checkpoints").resolve(),
                                  options=ocp.CheckpointManagerOptions(create=True))
  for step in (1, 2):
    params = jax.tree_util.tree_map(lambda x, s=step: x + s, student_params)
    state = {"params": params, "step": np.int32(step), "memories": np.zeros((4, 8, 8), np.float32)}
    manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  newest = jax.tree_util.tree_map(lambda x: x + 2, student_params)
  for path in ("run", "run/checkpoints", "run/checkpoints/2"):
    loaded = weight_files.load_params(tmp_path / path, "student")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, newest)
  loaded = weight_files.load_params(tmp_path / "run" / "checkpoints" / "1", "student")
  jax.tree_util.tree_map(np.testing.assert_allclose, loaded,
                         jax.tree_util.tree_map(lambda x: x + 1, student_params))


def test_folder_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(weight_files.WeightsError, match="not a readable orbax checkpoint"):
    weight_files.load_params(tmp_path / "empty", "student")


def test_non_finite_weights_are_refused(tmp_path, student_params):
  state = weight_files.params_to_state_dict(student_params)
  state["conv2.1.bias"] = np.array([np.nan], np.float32)
  torch_reader.save_state_dict(tmp_path / "n.pth", state)
  with pytest.raises(weight_files.WeightsError, match="non-finite"):
    weight_files.load_params(tmp_path / "n.pth", "student")


def test_model_defaults_to_what_the_weights_hold(tmp_path, shared):
  teacher = random_params("teacher", 3)
  torch_reader.save_state_dict(tmp_path / "t.pth", weight_files.params_to_state_dict(teacher))
  weight_files.save_params(tmp_path / "t.npz", teacher)
  weight_files.save_params(tmp_path / "t_checkpoint", teacher)
  for name in ("t.pth", "t.npz", "t_checkpoint"):
    loaded = weight_files.load_params(tmp_path / name)
    assert networks.model_of(loaded) == "teacher", name
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, teacher)
  published = weight_files.load_params(shared / "reference" / "weights" / "student.model")
  assert networks.model_of(published) == "student"
  # A model asked for that the file does not hold is still refused.
  with pytest.raises(weight_files.WeightsError,
                     match="holds teacher weights, but the student was asked for"):
    weight_files.load_params(tmp_path / "t.npz", "student")


def test_weights_of_neither_network_name_the_closest(tmp_path, student_params):
  path = tmp_path / "extra.npz"
  weight_files.save_params(path, {**student_params, "conv9": student_params["conv2"]})
  with pytest.raises(weight_files.WeightsError,
                     match=r"extra.npz: not student weights \(unexpected layers conv9\)"):
    weight_files.load_params(path)


def test_damaged_orbax_checkpoint_is_one_quiet_line(tmp_path, student_params, caplog):
  # orbax logged an absl warning ("Failed to get item metadata") and tensorstore's error
  # carried its whole JSON spec: the message alone must say it, on one short line.
  path = tmp_path / "checkpoint"
  weight_files.save_params(path, student_params)
  (path / "manifest.ocdbt").write_bytes(b"damaged")
  with caplog.at_level(logging.INFO):
    with pytest.raises(weight_files.WeightsError,
                       match=r"checkpoint: not a readable orbax checkpoint") as raised:
      weight_files.load_params(path, "student")
  message = str(raised.value)
  assert "\n" not in message and "tensorstore_spec" not in message and len(message) < 700, message
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
