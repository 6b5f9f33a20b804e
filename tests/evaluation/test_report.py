"""bin/report.py and mmdrfuse_jax.evaluation.report: the self-contained HTML comparison page.

Images are tiny (48x48; the evaluation's minimum is 41) and the command runs a few cheap
metrics, so that the module compiles little. The last test renders a report of real images
in headless Chromium (skipped, saying so, without Chromium or the shared reference data).
"""

import base64
import errno
import html
import html.parser
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest
from conftest import load_script, save_image
from PIL import Image

from mmdrfuse_jax.evaluation import comparison, report, scoring
from mmdrfuse_jax.io import files, imageio

report_cli = load_script("report")

SIZE = 48
METRICS = "EN,SD,CC,PSNR"  # cheap to compile; CC and PSNR have undefined cases
STEMS = ("a", "b", "c")


def _snapshot(root):
  """Every file under `root` with its bytes."""
  return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_folders(root, seed=0):
  """ir/, vi/ and two methods' fused images: `avg` (the mean) and `dark` (c.png all zero)."""
  rng = np.random.default_rng(seed)
  for stem in STEMS:
    ir = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    vis = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    save_image(root / "ir" / f"{stem}.png", ir)
    save_image(root / "vi" / f"{stem}.png", vis)
    gray = imageio.to_gray_published(vis)
    save_image(root / "avg" / f"{stem}.png", ((ir.astype(np.uint16) + gray) // 2).astype(np.uint8))
    dark = (ir // 4) if stem != "c" else np.zeros_like(ir)  # c: CC and PSNR undefined
    save_image(root / "dark" / f"{stem}.png", dark)
  return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  return _make_folders(tmp_path_factory.mktemp("report"))


def _args(root, *extra, methods=("avg", "dark")):
  args = ["--ir", root / "ir", "--vis", root / "vi"]
  for m in methods:
    args += ["--fused", f"{m}={root / m}"]
  return [str(a) for a in args + list(extra)]


def _run(capsys, *argv):
  code = report_cli.main([str(a) for a in argv] + ["--no_progress"])
  out, err = capsys.readouterr()
  return code, out, err


def _one_line(err):
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


class _Page(html.parser.HTMLParser):
  """The parts of a report the tests look at: tags with attributes, and table cells."""

  def __init__(self, text):
    super().__init__()
    self.tags = []  # (tag, attrs dict)
    self.tables = []  # (attrs, rows: [(tag, attrs, text), ...] per row)
    self._cell = None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append((tag, attrs))
    if tag == "table":
      self.tables.append((attrs, []))
    elif tag == "tr" and self.tables:
      self.tables[-1][1].append([])
    elif tag in ("td", "th") and self.tables:
      self._cell = [tag, attrs, ""]
      self.tables[-1][1][-1].append(self._cell)

  def handle_endtag(self, tag):
    if tag in ("td", "th"):
      self._cell = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell[2] += data

  def table(self, cls):
    return [rows for attrs, rows in self.tables if cls in attrs.get("class", "").split()]


def _data_uris(text):
  return re.findall(r'data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)', text)


def _check_self_contained(text):
  """No external URL anywhere; every src/href is a data URI or an anchor; all decode."""
  assert "://" not in text  # base64 has no ':'; nothing may name http(s)://, file://, ...
  assert "url(" not in text and "@import" not in text
  for attr, value in re.findall(r'\b(src|href)="([^"]*)"', text):
    assert value.startswith("data:image/") or value.startswith("#"), (attr, value[:60])
  uris = _data_uris(text)
  assert len(uris) == text.count("data:")
  for mime, payload in uris:
    with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as img:
      img.load()
      assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
  return uris


# ---------------------------------------------------------------------------------------------
# The page.


def test_report_structure(folders, tmp_path, capsys):
  out = tmp_path / "sub" / "report.html"
  before = _snapshot(folders)
  code, stdout, err = _run(capsys, *_args(folders, "--out", out, "--metrics", METRICS,
                                          "--title", "Tiny <test>"))
  assert code == 0, err
  assert err == "" and stdout.strip() == f"wrote {out}: 3 image(s), 2 method(s)"
  assert _snapshot(folders) == before
  assert not list(out.parent.glob(".*.tmp"))
  text = out.read_text(encoding="utf-8")
  page = _Page(text)
  assert "<title>Tiny &lt;test&gt;</title>" in text
  assert "MI(F,A) + MI(F,B) in nats" in text and "data range 2 (the published" in text

  # Means: one row per method, the values of scoring.evaluate, the best per column bold.
  names = tuple(METRICS.split(","))
  expected = {}
  for m in ("avg", "dark"):
    triples, _ = scoring.pair_triples(folders / "ir", folders / "vi", folders / m)
    expected[m] = scoring.evaluate(triples, names=names)
  (means,) = page.table("means")
  assert [c[2] for c in means[0]] == ["method", *names]
  assert [r[0][2] for r in means[1:]] == ["avg", "dark"]
  for row in means[1:]:
    method = row[0][2]
    for name, cell in zip(names, row[1:]):
      want = expected[method].means()[name]
      assert cell[2].startswith(f"{want:.3f}")
      others = [expected[m].means()[name] for m in expected]
      assert ("best" in cell[1].get("class", "")) == (f"{want:.3f}" == f"{max(others):.3f}")
  # dark/c.png is all zero: its CC and PSNR are undefined, counted and never averaged.
  assert expected["dark"].undefined() == {"EN": 0, "SD": 0, "CC": 1, "PSNR": 1}
  dark_cells = dict(zip(names, means[2][1:]))
  assert "1 undef." in dark_cells["CC"][2] and "1 undef." in dark_cells["PSNR"][2]
  assert 'id="undefined-total">2<' in text

  # Per-image tables: one per method, a row per image, sortable, undefined cells marked.
  tables = page.table("sortable")
  assert len(tables) == 2
  for rows, m in zip(tables, ("avg", "dark")):
    assert [r[0][2] for r in rows[1:]] == list(STEMS)
    for (name, scores), row in zip(expected[m].rows, rows[1:]):
      for metric, cell in zip(names, row[1:]):
        assert cell[2] == ("undefined" if scores[metric] is None else f"{scores[metric]:.3f}")
        assert cell[1]["data-v"] == ("" if scores[metric] is None else repr(scores[metric]))
  assert "<script>" in text and "addEventListener(\"click\"" in text

  # Images: per image, 4 thumbnails and 4 zoomed crops; one plot per metric.
  imgs = [a for t, a in page.tags if t == "img"]
  assert len(imgs) == len(STEMS) * 4 * 2 + len(names)
  assert sum("plot" in a.get("class", "") for a in imgs) == len(names)
  uris = _check_self_contained(text)
  assert len(uris) == len(imgs)
  (gallery,) = page.table("gallery")
  assert [c[2] for c in gallery[0]] == ["image", "infrared", "visible", "avg", "dark"]


def test_thumbnails_and_zoom(folders):
  """Thumbnails keep the aspect (longest side <= 256); the zoom is the nearest-neighbour crop."""
  big = np.arange(600 * 300, dtype=np.uint32).reshape(300, 600).astype(np.uint8)
  assert report.thumbnail(big).shape == (128, 256)
  small = np.zeros((SIZE, SIZE, 3), np.uint8)
  assert report.thumbnail(small).shape == (SIZE, SIZE, 3)  # never enlarged
  # A textured square in a flat image is where the sources vary most.
  flat = np.full((120, 200), 100, np.float32)
  busy = flat.copy()
  busy[40:72, 130:162] = np.random.default_rng(0).integers(0, 256, (32, 32))
  side = report.crop_side(flat.shape)
  assert side == 60
  top, left = report.busiest_window([flat, busy], 32)
  assert (top, left) == (40, 128)  # on the grid of step 8, the window closest to the square
  crop = report.zoom(busy, top, left, 32)
  assert crop.shape == (192, 192)
  np.testing.assert_array_equal(crop[::6, ::6], busy[top:top + 32, left:left + 32])
  # Every window of a constant image ties: the first one.
  assert report.busiest_window([flat], 16) == (0, 0)


def test_means_table_marks_the_best():
  means = {"A": {"EN": 7.0, "SD": 10.0, "CC": None, "MSE": 3.0, "PSNR": None},
           "B": {"EN": 6.5, "SD": 10.0004, "CC": None, "MSE": 2.0, "PSNR": 12.0}}
  undefined = {"A": {"EN": 0, "SD": 0, "CC": 4, "MSE": 0, "PSNR": 4},
               "B": {"EN": 0, "SD": 0, "CC": 4, "MSE": 0, "PSNR": 1}}
  names = tuple(means["A"])
  assert report.best_methods(names, means) == {
      "EN": {"A"}, "SD": {"A", "B"}, "CC": set(), "MSE": {"B"}, "PSNR": {"B"}}
  page = _Page(report.means_table(names, means, undefined, images=4))
  (table,) = page.table("means")
  best = {(row[0][2], names[i]) for row in table[1:] for i, c in enumerate(row[1:])
          if c[1].get("class") == "best"}
  assert best == {("A", "EN"), ("A", "SD"), ("B", "SD"), ("B", "MSE"), ("B", "PSNR")}
  cells = {row[0][2]: [c[2] for c in row[1:]] for row in table[1:]}
  assert cells["A"] == ["7.000", "10.000", "n/a4 undef.", "3.000", "n/a4 undef."]
  assert cells["B"] == ["6.500", "10.000", "n/a4 undef.", "2.000", "12.0001 undef."]


def test_parse_methods(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "f").write_text("x")
  assert comparison.parse_methods([f"one={tmp_path / 'a'}", f" two ={tmp_path / 'a'}"]) == [
      comparison.Method("one", tmp_path / "a"), comparison.Method("two", tmp_path / "a")]
  cases = {"noequals": "expected NAME=FOLDER", f"={tmp_path / 'a'}": "expected NAME=FOLDER",
           "x=": "expected NAME=FOLDER", f"x={tmp_path / 'nope'}": "no such folder",
           f"x={tmp_path / 'f'}": "is a file, not a folder"}
  for spec, message in cases.items():
    with pytest.raises(comparison.ReportError, match=message):
      comparison.parse_methods([spec])
  with pytest.raises(comparison.ReportError, match="given twice"):
    comparison.parse_methods([f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"])
  with pytest.raises(comparison.ReportError, match="at least one"):
    comparison.parse_methods([])


# ---------------------------------------------------------------------------------------------
# User mistakes: one line, exit 2, before any work; inputs untouched.


def test_bad_options_exit_2_on_one_line(folders, tmp_path, capsys, monkeypatch):
  before = _snapshot(folders)
  out = tmp_path / "r.html"
  scored = []
  monkeypatch.setattr(comparison, "compare", lambda *a, **k: scored.append(1))
  cases = [
      (["--fused", "avg"], "expected NAME=FOLDER"),
      (["--fused", f"x={folders / 'avg'}", "--fused", f"x={folders / 'dark'}"], "given twice"),
      (["--fused", f"x={tmp_path / 'missing'}"], "no such folder"),
  ]
  for fused, message in cases:
    code, _, err = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vi", *fused,
                        "--out", out)
    assert code == 2 and message in _one_line(err) and err.startswith("error: --fused")
  for extra, message in [(["--metrics", "EN,NOPE"], "NOPE"), (["--max_images", "0"], "positive"),
                         (["--bogus"], "bogus"), (["extra"], "unexpected arguments")]:
    code, _, err = _run(capsys, *_args(folders, "--out", out, *extra))
    assert code == 2 and message in _one_line(err)
  code, _, err = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vi", "--out", out)
  assert code == 2 and "--fused" in _one_line(err)
  code, _, err = _run(capsys, "--ir", tmp_path / "nope", "--vis", folders / "vi",
                      "--fused", f"x={folders / 'avg'}", "--out", out)
  assert code == 2 and "no such folder" in _one_line(err)
  assert not out.exists() and not scored
  assert _snapshot(folders) == before


def test_unusable_out_exit_2_before_any_work(folders, tmp_path, capsys, monkeypatch):
  before = _snapshot(folders)
  scored = []
  monkeypatch.setattr(comparison, "compare", lambda *a, **k: scored.append(1))
  a_file = tmp_path / "file"
  a_file.write_text("x")
  read_only = tmp_path / "ro"
  read_only.mkdir()
  real_mkstemp = files.tempfile.mkstemp

  def mkstemp(*args, dir=None, **kwargs):  # root ignores permissions: simulate a read-only one
    if dir is not None and pathlib.Path(dir).resolve() == read_only.resolve():
      raise PermissionError(errno.EACCES, "Permission denied")
    return real_mkstemp(*args, dir=dir, **kwargs)

  monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
  cases = [
      (folders / "ir" / "a.png", "would replace the infrared input"),
      (folders / "dark" / "c.png", "would replace the fused input of dark"),
      (folders / "vi" / ".." / "vi" / "b.png", "would replace the visible input"),
      (folders / "avg", "is the fused input folder of avg"),
      (tmp_path, "is a folder, not a file"),
      (a_file / "r.html", "is a file, not a folder"),
      (read_only / "r.html", "cannot write in this folder (permission denied)"),
  ]
  for out, message in cases:
    code, _, err = _run(capsys, *_args(folders, "--out", out))
    assert code == 2, err
    line = _one_line(err)
    assert line.startswith("error: --out") and message in line, line
  assert not scored
  assert _snapshot(folders) == before
  assert a_file.read_text() == "x" and not list(read_only.iterdir())


def test_without_matplotlib_says_how_to_install(folders, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
  code, _, err = _run(capsys, *_args(folders, "--out", tmp_path / "r.html"))
  assert code == 2
  assert "pip install -e '.[report]'" in _one_line(err) and "matplotlib" in err
  assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------
# Per-image problems, stops.


def test_problems_are_skipped_the_rest_compared(tmp_path, capsys):
  root = _make_folders(tmp_path / "data", seed=1)
  (root / "dark" / "a.png").unlink()  # a: no partner for one method
  save_image(root / "avg" / "b.png", np.zeros((SIZE + 2, SIZE), np.uint8))  # b: sizes differ
  for sub in ("ir", "vi", "avg", "dark"):  # d: unreadable infrared
    save_image(root / sub / "d.png", np.zeros((SIZE, SIZE), np.uint8))
  (root / "ir" / "d.png").write_bytes(b"not an image")
  before = _snapshot(root)
  out = tmp_path / "r.html"
  code, stdout, err = _run(capsys, *_args(root, "--out", out, "--metrics", METRICS))
  assert code == 1, err
  lines = err.strip().splitlines()
  assert "Traceback" not in err
  skipped = [ln for ln in lines if ln.startswith("skipped: ")]
  assert len(skipped) == 3 and lines[-1] == "3 file problem(s) reported; 1 image(s) compared"
  assert "a.png" in skipped[0] and "no partner" in skipped[0]
  assert any("b.png" in ln and "different sizes" in ln for ln in skipped)
  assert any("d.png" in ln and "cannot read" in ln for ln in skipped)
  assert stdout.strip() == f"wrote {out}: 1 image(s), 2 method(s)"
  page = _Page(out.read_text())
  for rows in page.table("sortable"):  # only c, for both methods
    assert [r[0][2] for r in rows[1:]] == ["c"]
  assert "Skipped files (3)" in out.read_text()
  assert _snapshot(root) == before
  # --max_images: the first N complete sets (b, c; a is unpaired), d is not looked at.
  code, stdout, err = _run(capsys, *_args(root, "--out", out, "--metrics", "EN",
                                          "--max_images", "2", "--ssim_data_range", "255"))
  assert code == 1 and "1 image(s)" in stdout  # c; b has sizes that differ
  assert "b.png" in err and "different sizes" in err and "d.png" not in err
  assert "data range 255 (the published" in out.read_text()  # the conventions used
  # Nothing left to compare: exit 2, no report.
  out.unlink()
  code, _, err = _run(capsys, *_args(root, "--out", out, "--metrics", "EN", "--max_images", "1"))
  assert code == 2 and err.strip().splitlines()[-1].startswith("error: no image could be scored")
  assert not out.exists()


def test_sigterm_while_scoring_writes_nothing(folders, tmp_path, capsys, monkeypatch):
  real = comparison.scoring.imageio.read_image
  reads = []

  def read_image(path):  # the signal arrives while the second image is being read
    reads.append(path)
    if len(reads) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(path)

  monkeypatch.setattr(comparison.scoring.imageio, "read_image", read_image)
  handler = signal.getsignal(signal.SIGTERM)
  out = tmp_path / "r.html"
  code, stdout, err = _run(capsys, *_args(folders, "--out", out, "--metrics", METRICS))
  assert code == 143 and stdout == ""
  assert _one_line(err) == "stopped by SIGTERM while scoring: no report written"
  assert not out.exists() and not list(tmp_path.iterdir())
  assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_sigint_while_making_the_page_writes_nothing(folders, tmp_path, capsys, monkeypatch):
  real = report.display_image
  calls = []

  def display_image(path):  # the signal arrives while the first thumbnail is made
    calls.append(path)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGINT)
    return real(path)

  monkeypatch.setattr(report, "display_image", display_image)
  out = tmp_path / "new" / "r.html"
  code, stdout, err = _run(capsys, *_args(folders, "--out", out, "--metrics", METRICS))
  assert code == 130 and stdout == ""
  assert _one_line(err) == "stopped by SIGINT while making the page: no report written"
  assert not (tmp_path / "new").exists()  # created for the check, removed: nothing written


def test_second_signal_exits_130_on_one_line(folders, tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(comparison, "compare", interrupted)
  code, _, err = _run(capsys, *_args(folders, "--out", tmp_path / "r.html"))
  assert code == 130 and "stopped at once" in _one_line(err)
  assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------
# The real thing, in a browser.


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    path = shutil.which(name)
    if path:
      return path
  pytest.skip("no chromium binary found (apt-get install chromium)")


# Marks images that did not load, and sorts the first per-image table by its second column
# (ascending, then descending), once everything has loaded.
_PROBE = """<script>
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (im) {
    return !im.complete || im.naturalWidth === 0;
  }).length;
  var table = document.querySelector("table.scores");
  var names = function () {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[0].textContent; });
  };
  var th = table.tHead.rows[0].cells[1];
  th.click(); var up = names();
  th.click(); var down = names();
  document.body.setAttribute("data-probe", JSON.stringify(
      {images: document.images.length, broken: broken, up: up, down: down}));
});
</script></body>"""


def _browser(chromium, tmp_path, *args):
  cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(shared, tmp_path, capsys):
  """Two methods on the first 3 RoadScene_test pairs: the published student's fused images
  and the average of the sources. All metrics but VIF (whose compilation alone takes 6 s)."""
  chromium = _chromium()
  data = shared / "data" / "RoadScene_test"
  published = shared / "reference" / "golden" / "fused" / "RoadScene_test"
  stems = sorted(p.stem for p in (data / "ir").iterdir())[:3]
  for stem in stems:
    for sub in ("ir", "vi"):
      (tmp_path / sub).mkdir(exist_ok=True)
      (tmp_path / sub / f"{stem}.jpg").write_bytes((data / sub / f"{stem}.jpg").read_bytes())
    (tmp_path / "student").mkdir(exist_ok=True)
    (tmp_path / "student" / f"{stem}.png").write_bytes((published / f"{stem}.png").read_bytes())
    ir = imageio.read_image(tmp_path / "ir" / f"{stem}.jpg")
    vis = imageio.read_image(tmp_path / "vi" / f"{stem}.jpg")
    mean = (imageio.to_gray_published(ir).astype(np.uint16) + imageio.to_gray_published(vis)) // 2
    save_image(tmp_path / "average" / f"{stem}.png", mean.astype(np.uint8))
  names = [n for n in scoring.metrics.METRIC_NAMES if n != "VIF"]
  out = tmp_path / "report.html"
  code, _, err = _run(capsys, "--ir", tmp_path / "ir", "--vis", tmp_path / "vi",
                      "--fused", f"student={tmp_path / 'student'}",
                      "--fused", f"average={tmp_path / 'average'}", "--out", out,
                      "--metrics", ",".join(names), "--title", "RoadScene_test: student vs average")
  assert code == 0, err
  text = out.read_text()
  _check_self_contained(text)

  probe = tmp_path / "probe.html"
  probe.write_text(text.replace("</body>", _PROBE, 1))
  proc = _browser(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom",
                  probe.as_uri())
  found = re.search(r'data-probe="([^"]*)"', proc.stdout)
  assert found, proc.stderr[-2000:]
  result = json.loads(html.unescape(found.group(1)))
  assert result["images"] == 3 * 4 * 2 + len(names) and result["broken"] == 0
  first = _Page(text).table("sortable")[0]  # the student's table; column 1 is EN
  student = {r[0][2]: float(r[1][1]["data-v"]) for r in first[1:]}
  assert result["up"] == sorted(student, key=student.get)
  assert result["down"] == sorted(student, key=student.get, reverse=True)

  shot = tmp_path / "shot.png"
  proc = _browser(chromium, tmp_path, "--screenshot=" + str(shot), "--window-size=1280,4000",
                  out.as_uri())
  assert shot.is_file(), proc.stderr[-2000:]
  with Image.open(shot) as img:
    pixels = np.asarray(img.convert("L"), np.float32)
  assert pixels.shape == (4000, 1280)
  assert pixels.std() > 20  # not blank: text, plots and photographs
  keep = os.environ.get("MMDRFUSE_KEEP_SCREENSHOT")
  if keep:
    shutil.copy(shot, keep)


# ---------------------------------------------------------------------------------------------
# The page in a 1400-px window: four methods (a reproduction's student, teacher, published
# student and one more), all eleven metrics, thumbnails of full size.

WINDOW = 1400
FOUR = ("student", "teacher", "published student", "average of the sources")


@pytest.fixture(scope="module")
def wide_page(tmp_path_factory):
  """A page of 4 methods on 2 images of 320x300 (thumbnails of 256 px), scores made up."""
  root = tmp_path_factory.mktemp("wide")
  rng = np.random.default_rng(9)
  names = scoring.metrics.METRIC_NAMES
  methods, images, results = [], [], {}
  for k, name in enumerate(FOUR):
    methods.append(comparison.Method(name, root / f"m{k}"))
  for stem in ("first", "second"):
    paths = []
    for folder in ["ir", "vi"] + [f"m{k}" for k in range(len(FOUR))]:
      paths.append(root / folder / f"{stem}.png")
      save_image(paths[-1], rng.integers(0, 256, (300, 320), dtype=np.uint8))
    images.append(comparison.ImageSet(stem, paths[0], paths[1], tuple(paths[2:])))
  for method in methods:
    rows = [(im.name, {n: float(rng.uniform(0, 20)) for n in names}) for im in images]
    results[method.name] = scoring.EvaluationResult(names=names, rows=rows, problems=[])
  compared = comparison.Comparison(names=names, methods=methods, images=images, results=results,
                                 problems=[])
  return report.build_html(compared, title="Four methods", sources=("ir", "vi"))


def _css(text):
  """{selector: {property: value}} of the page's style sheet (its simple rules)."""
  style = re.search(r"<style>(.*?)</style>", text, re.S).group(1)
  rules = {}
  for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", style):
    declarations = dict(d.split(":", 1) for d in body.split(";") if ":" in d)
    for selector in selectors.split(","):
      rules.setdefault(selector.strip(), {}).update(
          {k.strip(): v.strip() for k, v in declarations.items()})
  return rules


class _Boxes(html.parser.HTMLParser):
  """Each table with the classes of the elements around it; each img with its row
  (the row's number in the page and its class)."""

  VOID = {"img", "meta", "br", "col", "input", "link"}

  def __init__(self, text):
    super().__init__()
    self.stack, self.tables, self.images = [], [], []
    self.rows = 0
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "table":
      self.tables.append((attrs.get("class", ""), [a.get("class", "") for _, a in self.stack]))
    if tag == "tr":
      self.rows += 1
      attrs["row"] = self.rows
    if tag == "img":
      rows = [(a["row"], a.get("class", "")) for t, a in self.stack if t == "tr"]
      self.images.append((attrs, rows[-1] if rows else (None, None)))
    if tag not in self.VOID:
      self.stack.append((tag, attrs))

  def handle_endtag(self, tag):
    while self.stack and self.stack.pop()[0] != tag:
      pass


def _natural_width(uri):
  with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
    return img.width


def test_page_fits_a_1400_px_window(wide_page):
  """Nothing of fixed width adds up past the window: the gallery's thumbnails and crops shrink
  with their column, and every table scrolls inside its own box (once four methods' 256-px
  thumbnails made the page 1536 px wide, the last method behind the page's scroll bar)."""
  css = _css(wide_page)
  boxes = _Boxes(wide_page)
  rows: dict[int, int] = {}  # gallery row -> the px its images cannot give up
  for attrs, (row, cls) in boxes.images:
    if cls not in ("images", "zooms"):
      continue
    selector = "img.zoom" if "zoom" in attrs.get("class", "") else ".thumb img"
    rule = css.get(selector, {})
    natural = _natural_width(attrs["src"])
    if rule.get("max-width") == "100%":
      fixed = 0  # shrinks with its column
    else:
      cap = re.fullmatch(r"(\d+)px", rule.get("max-width", ""))
      fixed = min(natural, int(cap.group(1))) if cap else natural
    rows[row] = rows.get(row, 0) + fixed
  assert len(rows) == 4 and max(rows.values()) <= WINDOW, rows
  assert css["table.gallery"]["width"] == "100%"
  assert css["table.gallery"]["table-layout"] == "fixed"
  for selector in (".thumb img", "img.zoom", "img.plot"):
    assert css[selector]["max-width"] == "100%" and css[selector]["height"] == "auto", selector
  # Every table sits in a box of its own that scrolls sideways when the table is wider.
  assert css[".wide"]["overflow-x"] == "auto"
  assert len(boxes.tables) == 1 + len(FOUR) + 1
  for cls, around in boxes.tables:
    assert "wide" in around, cls
  # No declared width in px adds up past the window either.
  declared = [int(n) for rule in css.values() for prop, value in rule.items()
              if prop in ("width", "min-width") for n in re.findall(r"(\d+)px", value)]
  assert sum(declared) <= WINDOW


def test_sf_and_ag_note_beside_the_means():
  """SF and AG keep the field's 'higher is better', with a word that noise raises them."""
  means = {"A": {"EN": 7.0, "SF": 30.0, "AG": 9.0}, "B": {"EN": 6.0, "SF": 10.0, "AG": 3.0}}
  undefined = {m: {n: 0 for n in means["A"]} for m in means}
  text = report.means_table(tuple(means["A"]), means, undefined, images=2)
  page = _Page(text)
  (table,) = page.table("means")
  assert [c[1].get("class") for c in table[1][1:]] == ["best"] * 3  # the convention kept
  note = re.search(r'<p class="note" id="sf-ag">(.*?)</p>', text, re.S)
  assert note, text
  words = " ".join(note.group(1).split())
  assert "SF and AG" in words and "noise" in words and "higher is better" in words
  # Only where SF or AG is on the page.
  plain = report.means_table(("EN",), {m: {"EN": v["EN"]} for m, v in means.items()},
                             {m: {"EN": 0} for m in means}, images=2)
  assert 'id="sf-ag"' not in plain


def test_page_fits_1400_px_in_chromium(wide_page, tmp_path):
  """The page of four methods in headless Chromium at 1400x2000: no sideways scrolling."""
  chromium = _chromium()
  probe = tmp_path / "probe.html"
  probe.write_text(wide_page.replace("</body>", """<script>
window.addEventListener("load", function () {
  var root = document.documentElement;
  var gallery = document.querySelector("table.gallery").getBoundingClientRect();
  document.body.setAttribute("data-probe", JSON.stringify(
      {scroll: root.scrollWidth, inner: window.innerWidth, right: gallery.right}));
});
</script></body>""", 1))
  proc = _browser(chromium, tmp_path, f"--window-size={WINDOW},2000", "--virtual-time-budget=10000",
                  "--dump-dom", probe.as_uri())
  found = re.search(r'data-probe="([^"]*)"', proc.stdout)
  assert found, proc.stderr[-2000:]
  result = json.loads(html.unescape(found.group(1)))
  assert result["inner"] == WINDOW
  assert result["scroll"] <= WINDOW and result["right"] <= WINDOW, result
