"""Building datasets when things go wrong: stale builds, bad paths, full or read-only disks.

Each test reproduces one user-visible case of bin/prepare_data.py, `prepare.prepare` or
`PatchDataset.from_tfds` on 2-3 tiny pairs. Disk-full and read-only cases use a real tmpfs
when this process may mount one (root), and are skipped otherwise; in-process simulations
of the same errors always run.
"""

import contextlib
import errno
import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO_ROOT, load_script, tmpfs
from PIL import Image

from mmdrfuse_jax.data import builders, pipeline, prepare, sources, synthetic
from mmdrfuse_jax.io import files

DATASET = "paired_folders"


@pytest.fixture(scope="module")
def cli():
  tfds.disable_progress_bar()
  return load_script("prepare_data")


def _version_dir(data_dir: pathlib.Path) -> pathlib.Path:
  return data_dir / "fusion_pairs" / DATASET / "1.0.0"


def _leftovers(data_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in _version_dir(data_dir).parent.glob("incomplete.*"))


def _is_built(data_dir: pathlib.Path) -> bool:
  return builders.make_builder(DATASET, data_dir).is_prepared()


def _run(cli, capsys, src, out, *extra) -> tuple[int, str, str]:
  code = cli.main(["--dataset", DATASET, "--manual_dir", str(src), "--data_dir", str(out),
                   "--patch_size", "32", "--patch_stride", "32", *extra])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _noise_pairs(folder: pathlib.Path, stems, size: int = 64) -> None:
  """Pairs of random pixels: PNG cannot compress them (about size * size bytes each)."""
  rng = np.random.default_rng(len(stems))
  for sub in ("ir", "vi"):
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
      pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / sub / f"{stem}.png")


def _bump_mtime(path: pathlib.Path) -> None:
  st = path.stat()
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _invert_image(path: pathlib.Path) -> None:
  """Other pixels in the same file, with a later modification time."""
  with Image.open(path) as image:
    inverted = Image.fromarray(255 - np.asarray(image))
  inverted.save(path)
  _bump_mtime(path)


def _remount_read_only(path: pathlib.Path) -> None:
  subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


# ---------------------------------------------------------------------------------------
# A. Stale builds.


def test_unchanged_source_is_already_built(cli, capsys, tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 3, 64, 64, seed=0)
  code, stdout, _ = _run(cli, capsys, src, out)
  assert code == 0 and stdout.startswith(f"built: {_version_dir(out)}")
  record = sources.read_source_record(_version_dir(out))
  assert record["options"] == {"config": DATASET, "ir_folders": ["ir"], "vis_folders": ["vi"],
                               "resize_visible": False, "skip_bad": False}
  assert sorted(record["files"]) == [f"{s}/{i:04d}.png" for s in ("ir", "vi") for i in range(3)]
  shard = next(_version_dir(out).glob("*.array_record*"))
  before = shard.stat().st_mtime_ns, shard.stat().st_ino
  # Same source; --skip_bad changes nothing when nothing had to be skipped.
  for extra in ([], ["--skip_bad"], ["--no_resize_visible"]):
    code, stdout, _ = _run(cli, capsys, src, out, *extra)
    assert code == 0 and stdout.startswith(f"already built: {_version_dir(out)}\n"), extra
    assert "train: 3 images, 12 patches" in stdout
  assert (shard.stat().st_mtime_ns, shard.stat().st_ino) == before
  # An option that changes the images does rebuild.
  code, stdout, _ = _run(cli, capsys, src, out, "--resize_visible")
  assert code == 0
  assert stdout.startswith("built with other options (resize_visible was False, now True): "
                           f"rebuilding\nrebuilt: {_version_dir(out)}\n")


def test_paired_folders_with_named_folders(cli, capsys, tmp_path):
  # The reported case: `--ir_folder A --vis_folder B` failed on any folder with a TFDS
  # traceback (a custom builder config named like one of the builder's own).
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  (src / "ir").rename(src / "thermal")
  (src / "vi").rename(src / "rgb")
  named = ("--ir_folder", "thermal", "--vis_folder", "rgb")
  code, stdout, err = _run(cli, capsys, src, out, *named)
  assert (code, err) == (0, ""), err
  assert stdout.startswith(f"built: {_version_dir(out)}\n")
  assert "train: 2 images, 8 patches" in stdout
  record = sources.read_source_record(_version_dir(out))
  assert record["options"]["ir_folders"] == ["thermal", "ir"]
  assert record["options"]["vis_folders"] == ["rgb", "vi"]
  assert sorted(record["files"]) == [f"{sub}/{i:04d}.png" for sub in ("rgb", "thermal")
                                     for i in range(2)]
  code, stdout, _ = _run(cli, capsys, src, out, *named)
  assert code == 0 and stdout.startswith(f"already built: {_version_dir(out)}\n")
  # Training reads the build by the dataset's name alone.
  dataset = pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32, patch_stride=32)
  assert dataset.num_patches == 8
  # Other names: the folders are not found, in one line and before anything is written.
  code, _, err = _run(cli, capsys, src, tmp_path / "other", "--ir_folder", "nope", "--vis_folder",
                      "rgb")
  assert code == 2 and err.count("\n") == 1 and "no infrared and visible folders" in err, err
  assert not (tmp_path / "other").exists()


def test_changed_source_is_rebuilt(cli, capsys, tmp_path):
  # The reported case: a build that skipped a bad file kept listing it after it was deleted.
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 3, 64, 64, seed=0)
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(src / "ir" / "0003.png")  # no partner
  code, stdout, _ = _run(cli, capsys, src, out, "--skip_bad")
  assert code == 0 and "skipped 1 problem(s)" in stdout and "0003.png" in stdout

  (src / "ir" / "0003.png").unlink()
  for sub in ("ir", "vi"):
    (src / sub / "0002.png").unlink()
  synthetic.write_pairs(tmp_path / "more", 5, 64, 64, seed=3)
  for sub in ("ir", "vi"):
    shutil.copy(tmp_path / "more" / sub / "0004.png", src / sub / "0004.png")
  new_ir = synthetic.make_pairs(1, 64, 64, seed=9)[0][0]
  Image.fromarray(new_ir).save(src / "ir" / "0000.png")
  _bump_mtime(src / "ir" / "0000.png")

  code, stdout, err = _run(cli, capsys, src, out, "--skip_bad")
  assert (code, err) == (0, "")
  assert stdout.splitlines()[:2] == [
      "source changed since the build (2 files added, 3 removed, 1 modified): rebuilding",
      f"rebuilt: {_version_dir(out)}"]
  assert "skipped" not in stdout and "0003" not in stdout
  assert _leftovers(out) == []
  ds = pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32)
  assert ds.stems == ["0000", "0001", "0004"]
  np.testing.assert_array_equal(ds.ir_images[0], new_ir)
  code, stdout, _ = _run(cli, capsys, src, out, "--skip_bad")
  assert code == 0 and stdout.startswith("already built:")


def test_build_without_record_is_rebuilt(cli, capsys, tmp_path):
  # Builds made before builds recorded their source cannot be trusted to be current.
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  assert _run(cli, capsys, src, out)[0] == 0
  (_version_dir(out) / sources.SOURCE_RECORD).unlink()
  assert pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32).num_images == 2
  code, stdout, _ = _run(cli, capsys, src, out)
  assert code == 0 and stdout.startswith(
      "no record of the files it was built from (built by an earlier version): rebuilding\n")
  assert (_version_dir(out) / sources.SOURCE_RECORD).is_file()


def test_training_refuses_a_stale_build(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  prepare.prepare(DATASET, src, out)
  assert pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32).num_images == 2
  # A copy of the folder (new modification times, same contents) is not a change.
  for path in sorted(src.rglob("*.png")):
    _bump_mtime(path)
  assert pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32).num_images == 2
  # Same size and name, other bytes: a change.
  path = src / "vi" / "0001.png"
  data = bytearray(path.read_bytes())
  data[-20] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(sources.DataError) as err:
    pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"{_version_dir(out)}: its source {src} changed since the build "
                            "(1 file modified); rebuild it with bin/prepare_data.py")
  assert pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32,
                                         check_source=False).num_images == 2
  # A build whose source folder is gone (deleted, or on another machine) is self-contained.
  src.rename(tmp_path / "elsewhere")
  assert pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32).num_images == 2


# ---------------------------------------------------------------------------------------
# B. Paths that cannot be used: exit 2, one line, nothing written.


def test_bad_data_dir_and_manual_dir(cli, capsys, tmp_path, monkeypatch):
  src = tmp_path / "src"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert _run(cli, capsys, src, a_file) == (2, "", f"error: {a_file}: is a file, not a folder\n")
  assert _run(cli, capsys, src, a_file / "sub") == (
      2, "", f"error: {a_file / 'sub'}: {a_file} is a file, not a folder\n")
  out = tmp_path / "out"
  assert _run(cli, capsys, a_file, out) == (2, "", f"error: {a_file}: is a file, not a folder\n")
  assert _run(cli, capsys, tmp_path / "nope", out) == (
      2, "", f"error: {tmp_path / 'nope'}: no such folder\n")
  unreadable = tmp_path / "unreadable"
  synthetic.write_pairs(unreadable, 2, 64, 64, seed=0)
  if os.geteuid() != 0:
    unreadable.chmod(0)
  else:  # Root reads everything: the refusal is simulated.
    real_scandir = os.scandir

    def scandir(path="."):
      if isinstance(path, (str, os.PathLike)) and pathlib.Path(path) == unreadable:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
      return real_scandir(path)

    monkeypatch.setattr(prepare.os, "scandir", scandir)
  try:
    assert _run(cli, capsys, unreadable, out) == (
        2, "", f"error: {unreadable}: permission denied\n")
  finally:
    unreadable.chmod(0o755)
  assert not out.exists()
  # A source folder deleted after its build: said so, and the build is left alone.
  assert _run(cli, capsys, src, out)[0] == 0
  shutil.rmtree(src)
  assert _run(cli, capsys, src, out) == (
      2, "", f"error: {src}: no such folder (the dataset built from it in {_version_dir(out)} "
      "is still usable)\n")


def test_read_only_data_dir(cli, capsys, tmp_path):
  src = tmp_path / "src"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  if os.geteuid() == 0:
    with tmpfs(tmp_path / "ro", "1m") as ro:
      _remount_read_only(ro)
      assert _run(cli, capsys, src, ro / "out") == (
          2, "", f"error: data_dir {ro / 'out'}: cannot create the folder "
          "(read-only file system)\n")
      assert _run(cli, capsys, src, ro) == (
          2, "", f"error: data_dir {ro}: cannot write in this folder (read-only file system)\n")
    # A dataset built, then made read-only, is still reported (nothing needs writing).
    with tmpfs(tmp_path / "rw", "1m") as rw:
      assert _run(cli, capsys, src, rw)[0] == 0
      _remount_read_only(rw)
      code, stdout, _ = _run(cli, capsys, src, rw)
      assert code == 0 and stdout.startswith("already built:")
  else:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert _run(cli, capsys, src, ro) == (
        2, "", f"error: data_dir {ro}: cannot write in this folder (permission denied)\n")


@pytest.mark.parametrize("code,cause", [(errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied")])
def test_unwritable_data_dir_simulated(cli, capsys, tmp_path, monkeypatch, code, cause):
  # The same refusal wherever no read-only file system can be mounted (and for root).
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  out.mkdir()
  real_mkstemp = files.tempfile.mkstemp

  def mkstemp(*args, dir=None, **kwargs):
    if dir is not None and pathlib.Path(dir) == out:
      raise OSError(code, os.strerror(code), str(out / ".write-test"))
    return real_mkstemp(*args, dir=dir, **kwargs)

  monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
  assert _run(cli, capsys, src, out) == (
      2, "", f"error: data_dir {out}: cannot write in this folder ({cause})\n")
  assert list(out.iterdir()) == []


def test_concurrent_build_is_refused(cli, capsys, tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  lock = _version_dir(out).parent / ".prepare.lock"
  lock.parent.mkdir(parents=True)
  with open(lock, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    assert _run(cli, capsys, src, out) == (
        2, "", f"error: {lock.parent}: another build of this dataset is running now; "
        "wait for it to finish\n")
  assert _run(cli, capsys, src, out)[0] == 0


# ---------------------------------------------------------------------------------------
# C. Failures midway: exit 1, one line, nothing half-written taken as built.


def test_disk_full_on_a_realtmpfs(cli, capsys, tmp_path):
  src = tmp_path / "src"
  _noise_pairs(src, ["0000"])
  # ArrayRecord files take at least 128 KiB: one small pair fits in 256 KiB.
  with tmpfs(tmp_path / "small", "256k") as small:
    out = small / "out"
    assert _run(cli, capsys, src, out)[0] == 0
    first = pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32)
    _noise_pairs(src, ["0000", "0001", "0002", "0003"], size=256)  # About 520 KB: does not.
    code, stdout, err = _run(cli, capsys, src, out)
    assert code == 1 and stdout.startswith("source changed since the build")
    assert err == (f"error: {out}: no space left on device while building '{DATASET}'; "
                   "the earlier build is kept\n")
    assert _is_built(out) and _leftovers(out) == []
    kept = pipeline.PatchDataset.from_tfds(out, DATASET, patch_size=32, check_source=False)
    np.testing.assert_array_equal(kept.ir_images[0], first.ir_images[0])

    shutil.rmtree(out)
    code, _, err = _run(cli, capsys, src, out)
    assert code == 1
    assert err == (f"error: {out}: no space left on device while building '{DATASET}'; "
                   "nothing half-written was kept\n")
    assert not _is_built(out) and _leftovers(out) == []
    assert not _version_dir(out).exists()


@pytest.mark.parametrize("failure,cause", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left on device"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only file system"),
    # ArrayRecord's way: a RuntimeError carrying the system's message.
    (RuntimeError("write() failed: No space left on device; writing /x/incomplete.AB_1.0.0/f"),
     "no space left on device"),
])
@pytest.mark.parametrize("where", ["records", "record_of_source"])
def test_write_errors_midway(cli, capsys, tmp_path, monkeypatch, failure, cause, where):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  if where == "records":  # Writing the examples.
    adapter = tfds.core.file_adapters.ArrayRecordFileAdapter

    def write_examples(cls, path, iterator):
      for _ in iterator:
        raise failure

    monkeypatch.setattr(adapter, "write_examples", classmethod(write_examples))
  else:  # The last file of a build, after every example was written.
    @contextlib.contextmanager
    def atomic_write(path, mode="wb", **kwargs):
      raise failure
      yield

    monkeypatch.setattr(files, "atomic_write", atomic_write)
  assert _run(cli, capsys, src, out) == (
      1, "", f"error: {out}: {cause} while building '{DATASET}'; nothing half-written was kept\n")
  assert not _is_built(out) and _leftovers(out) == [] and not _version_dir(out).exists()
  monkeypatch.undo()
  code, stdout, _ = _run(cli, capsys, src, out)
  assert code == 0 and stdout.startswith("built:")


def test_failed_rebuild_keeps_the_earlier_build(cli, capsys, tmp_path, monkeypatch):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 2, 64, 64, seed=0)
  assert _run(cli, capsys, src, out)[0] == 0
  _invert_image(src / "ir" / "0000.png")

  @contextlib.contextmanager
  def atomic_write(path, mode="wb", **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    yield

  monkeypatch.setattr(files, "atomic_write", atomic_write)
  code, stdout, err = _run(cli, capsys, src, out)
  assert code == 1 and stdout.startswith("source changed since the build (1 file modified)")
  assert err == (f"error: {out}: no space left on device while building '{DATASET}'; "
                 "the earlier build is kept\n")
  assert _is_built(out) and _leftovers(out) == []
  assert sources.read_source_record(_version_dir(out)) is not None


def test_killed_build_is_not_taken_as_built(cli, capsys, tmp_path):
  # A build killed (SIGKILL: no clean-up runs) while writing its examples.
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 3, 64, 64, seed=0)
  script = textwrap.dedent(f"""
      import os, signal
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      from mmdrfuse_jax.data import builders, prepare
      real_png, calls = builders._png, []

      def png(image):
        calls.append(1)
        if len(calls) == 6:  # The second pair.
          os.kill(os.getpid(), signal.SIGKILL)
        return real_png(image)

      builders._png = png
      prepare.prepare({DATASET!r}, {str(src)!r}, {str(out)!r})
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  leftovers = _leftovers(out)
  assert len(leftovers) == 1 and not _is_built(out)
  with pytest.raises(sources.DataError, match="no built 'paired_folders' dataset"):
    pipeline.PatchDataset.from_tfds(out, DATASET)
  code, stdout, _ = _run(cli, capsys, src, out)
  assert code == 0
  assert stdout.splitlines()[:2] == [
      "removed an unfinished build left by an interrupted run: "
      f"{_version_dir(out).parent / leftovers[0]}",
      f"built: {_version_dir(out)}"]
  assert _leftovers(out) == [] and _is_built(out)


def test_os_error_messages():
  assert files.os_error_message(OSError(errno.ENOSPC, "x"), "/d") == "/d: no space left on device"
  assert files.os_error_message(OSError(errno.EPERM, "x", "/f")) == "/f: permission denied"
  assert files.os_error_message(OSError(errno.EIO, "Input/output error"), "/d") == (
      "/d: input/output error")
  wrapped = RuntimeError("Failed: wrapped")
  wrapped.__cause__ = OSError(errno.EROFS, os.strerror(errno.EROFS))
  assert prepare._as_os_error(wrapped).errno == errno.EROFS
  assert prepare._as_os_error(ValueError("no")) is None


def test_sigterm_during_a_build_keeps_nothing_half_written(cli, capsys, tmp_path, monkeypatch):
  src, out = tmp_path / "src", tmp_path / "out"
  synthetic.write_pairs(src, 3, 64, 64, seed=0)
  real_png, calls = builders._png, []

  def png(image):
    calls.append(1)
    if len(calls) == 6:  # The second pair is being encoded.
      os.kill(os.getpid(), signal.SIGTERM)
    return real_png(image)

  monkeypatch.setattr(builders, "_png", png)
  handler = signal.getsignal(signal.SIGTERM)
  code, stdout, err = _run(cli, capsys, src, out)
  assert code == 143
  assert err == "stopped by SIGTERM; nothing half-written was kept\n"
  assert not _is_built(out) and _leftovers(out) == []
  assert signal.getsignal(signal.SIGTERM) is handler
  monkeypatch.setattr(builders, "_png", real_png)
  code, stdout, _ = _run(cli, capsys, src, out)  # A rerun builds it.
  assert code == 0 and _is_built(out)
