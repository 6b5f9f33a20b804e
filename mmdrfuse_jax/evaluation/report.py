"""One self-contained HTML page that compares fusion methods on the same image pairs.

`comparison.compare` scores the methods on the same images; `build_html` turns its result
and the images into one page:

- the metric means, one row per method, the best of each column marked, the conventions
  stated (with the caveat of SF and AG: higher is better, but noise raises them too) and the
  undefined values counted;
- one sortable per-image table per method (click a column header);
- per-metric distributions across the images (box and strip plots drawn with matplotlib);
- a grid of thumbnails, one row per image (infrared | visible | each method), each with a
  zoomed crop of the same region (the window where the two sources vary most), upscaled by
  nearest neighbour.

The page fits the window's width whatever the number of methods: the thumbnails and crops
shrink with their columns (the gallery shares the width among them), and a table wider than
the window (many metrics) scrolls sideways inside its own box, not the page.

Everything is embedded (images as base64 data URIs, inline CSS and JavaScript): the file can
be mailed and names no external URL. matplotlib is imported only where the plots are drawn
(`require_matplotlib` checks for it up front), so the rest of the project does not need it.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import io
import os
import pathlib
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from mmdrfuse_jax.evaluation import metrics, scoring
from mmdrfuse_jax.evaluation.comparison import Comparison, ImageSet, Method, ReportError
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.runtime import interrupts


def _asset(name: str) -> str:
  """A file of the page's style or script, shipped as package data (report_page/)."""
  return (importlib.resources.files("mmdrfuse_jax.evaluation") / "report_page" / name
          ).read_text(encoding="utf-8")


INSTALL_HINT = "pip install -e '.[report]'"
THUMB_SIDE = 256  # longest side of a thumbnail, pixels
ZOOM_CROP = 64  # side of the zoomed crop in image pixels (at most half the shorter side)
ZOOM_SIDE = 192  # the crop is upscaled by an integer factor to about this many pixels
JPEG_QUALITY = 85
# Higher is better for the eleven published metrics; MSE (an error) and Floor (a share of
# collapsed pixels), available with --metrics, are lower-is-better.
LOWER_IS_BETTER = metrics.LOWER_IS_BETTER
# Higher is better by the field's convention, but they grow with any pixel-to-pixel change,
# noise and artefacts included: the page says so beside the means (`means_table`).
NOISE_REWARDING = ("SF", "AG")

# The evaluation conventions, worded as in docs/evaluate.md; {ssim} is SSIM's
# data range.
CONVENTIONS = (
    "Images are read as the field's Python evaluator reads them: colour to gray as "
    "round(0.299 R + 0.587 G + 0.114 B); 16-bit files scaled to 0..255 (divided by 257).",
    "EN: entropy in bits of the 256-bin histogram. SD: population standard deviation. "
    "SF, AG: spatial frequency and average gradient.",
    "MI: MI(F,A) + MI(F,B) in nats (natural log) over 256x256 joint histograms.",
    "SCD: corr(A, F-B) + corr(B, F-A). CC: (corr(A,F) + corr(B,F)) / 2.",
    "VIF: VIFp(A,F) + VIFp(B,F), 4-scale pixel-domain VIF. "
    "Qabf: Xydeas-Petrovic with Sobel responses.",
    "SSIM: SSIM(F,A) + SSIM(F,B), 7x7 uniform window, data range {ssim} (the published tables "
    "use 2; 255 is the textbook value). PSNR: 10 log10(max(F)^2 / MSE), MSE averaged over both "
    "sources.",
    "A value that is not finite for an image (CC of a constant image, PSNR of an all-zero "
    "fused image) is undefined: left out of the mean and of the plots, and counted.",
)


class Stopped(Exception):
  """A stop request (SIGINT/SIGTERM) ended the page before it was complete."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by {interrupts.signal_name(signum)}")
    self.signum = signum


# ---------------------------------------------------------------------------------------------
# Options and inputs.


def require_matplotlib() -> None:
  """Raises ReportError, saying how to install it, when matplotlib cannot be imported."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ReportError(f"the report needs matplotlib, which is not installed: {INSTALL_HINT}"
                      ) from None


# ---------------------------------------------------------------------------------------------
# Images.


def data_uri(data: bytes, mime: str) -> str:
  """`data:<mime>;base64,...` for embedding."""
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode(image: np.ndarray, fmt: str = "JPEG") -> str:
  """An 8-bit gray or RGB array as a JPEG or PNG data URI."""
  buf = io.BytesIO()
  pil = Image.fromarray(np.ascontiguousarray(image))
  if fmt == "JPEG":
    pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(buf.getvalue(), "image/jpeg")
  pil.save(buf, format="PNG")
  return data_uri(buf.getvalue(), "image/png")


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
  """An 8-bit image shrunk (never enlarged) so that its longest side is at most `side`."""
  pil = Image.fromarray(np.ascontiguousarray(image))
  pil.thumbnail((side, side), Image.Resampling.BICUBIC)
  return np.asarray(pil)


def crop_side(shape: tuple[int, ...], crop: int = ZOOM_CROP) -> int:
  """Side of the zoomed crop: `crop`, at most half the image's shorter side (at least 1)."""
  return max(1, min(crop, min(shape[:2]) // 2))


def busiest_window(grays: Sequence[np.ndarray], side: int) -> tuple[int, int]:
  """(top, left) of the `side` x `side` window where the images' summed variance is largest.

  Windows are tried on a grid of step `side // 4` (and flush with the bottom/right borders);
  variances come from summed-area tables, so this costs a few passes over the pixels. Ties
  go to the first window (top, then left).
  """
  h, w = grays[0].shape[:2]
  step = max(1, side // 4)
  tops = np.unique(np.append(np.arange(0, h - side + 1, step), h - side))
  lefts = np.unique(np.append(np.arange(0, w - side + 1, step), w - side))
  score = np.zeros((tops.size, lefts.size))
  n = side * side
  for gray in grays:
    x = gray.astype(np.float64)
    sums = []
    for v in (x, x * x):
      table = np.zeros((h + 1, w + 1))
      table[1:, 1:] = v.cumsum(0).cumsum(1)
      sums.append(table[np.ix_(tops + side, lefts + side)] - table[np.ix_(tops, lefts + side)]
                  - table[np.ix_(tops + side, lefts)] + table[np.ix_(tops, lefts)])
    score += sums[1] / n - (sums[0] / n) ** 2
  i, j = np.unravel_index(int(np.argmax(score)), score.shape)
  return int(tops[i]), int(lefts[j])


def zoom(image: np.ndarray, top: int, left: int, side: int, target: int = ZOOM_SIDE) -> np.ndarray:
  """The `side` x `side` crop at (top, left), enlarged by nearest neighbour to about `target`."""
  factor = max(1, target // side)
  crop = image[top:top + side, left:left + side]
  return np.repeat(np.repeat(crop, factor, axis=0), factor, axis=1)


def display_image(path: pathlib.Path) -> np.ndarray:
  """A file as stored, brought to 8 bits for display (gray or RGB).

  Raises:
    imageio.ImageError: the file is missing or unreadable.
  """
  return imageio.to_8bit(imageio.read_image(path))


# ---------------------------------------------------------------------------------------------
# Plots.


def distribution_plot(name: str, methods: Sequence[str],
                      values: Sequence[Sequence[float]]) -> str:
  """A box and strip plot of one metric's per-image values for each method, as a PNG data URI.

  Args:
    name: the metric (the title says whether higher or lower is better).
    methods: method names (x axis).
    values: per method, the values where the metric is defined (may be empty).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  # Fixed margins: a layout engine would double the cost of drawing.
  fig = Figure(figsize=(3.3, 2.5), dpi=100)
  FigureCanvasAgg(fig)
  fig.subplots_adjust(left=0.17, right=0.97, top=0.9, bottom=0.2)
  ax = fig.add_subplot()
  filled = [(k + 1, v) for k, v in enumerate(values) if len(v)]
  if filled:
    ax.boxplot([v for _, v in filled], positions=[p for p, _ in filled], widths=0.5,
               showfliers=False, medianprops={"color": "black"})
  rng = np.random.default_rng(0)  # fixed jitter: the same page for the same scores
  for p, v in filled:
    ax.plot(p + rng.uniform(-0.18, 0.18, len(v)), v, "o", ms=3, alpha=0.55)
  ax.set_xticks(range(1, len(methods) + 1))
  long_names = max(len(m) for m in methods) > 8
  ax.set_xticklabels(methods, rotation=20 if long_names else 0,
                     ha="right" if long_names else "center", fontsize=8)
  ax.set_xlim(0.4, len(methods) + 0.6)
  ax.tick_params(axis="y", labelsize=8)
  better = "lower" if name in LOWER_IS_BETTER else "higher"
  ax.set_title(f"{name} ({better} is better)", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"Software": None})
  return data_uri(buf.getvalue(), "image/png")


# ---------------------------------------------------------------------------------------------
# HTML.


def _esc(text) -> str:
  return html.escape(str(text), quote=True)


def _fmt(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def best_methods(names: Sequence[str],
                 means: Mapping[str, Mapping[str, Optional[float]]]) -> dict[str, set[str]]:
  """For every metric, the methods with the best mean (none where no mean is defined).

  Higher is better except for `LOWER_IS_BETTER`. Means equal at the precision the page shows
  (3 decimals) are a tie, and every one of them is best.
  """
  best: dict[str, set[str]] = {}
  for n in names:
    defined = {m: mean for m, v in means.items() if (mean := v[n]) is not None}
    if not defined:
      best[n] = set()
      continue
    top = (min if n in LOWER_IS_BETTER else max)(defined.values())
    best[n] = {m for m, v in defined.items() if _fmt(v) == _fmt(top)}
  return best


def means_table(names: Sequence[str], means: Mapping[str, Mapping[str, Optional[float]]],
                undefined: Mapping[str, Mapping[str, int]], images: int) -> str:
  """The table of means (rows: methods in mapping order), best of each column in bold.

  A mean over fewer images than `images` carries a superscript with the undefined count.
  """
  best = best_methods(names, means)
  head = "".join(f"<th>{_esc(n)}</th>" for n in names)
  rows = []
  for method, values in means.items():
    cells = []
    for n in names:
      text = _fmt(values[n])
      k = undefined[method][n]
      note = (f'<sup class="undef" title="undefined for {k} of {images} image(s)">{k} undef.'
              f'</sup>' if k else "")
      if method in best[n]:
        cells.append(f'<td class="best"><strong>{text}</strong>{note}</td>')
      else:
        cells.append(f"<td>{text}{note}</td>")
    rows.append(f'<tr><th scope="row">{_esc(method)}</th>{"".join(cells)}</tr>')
  total = sum(sum(u.values()) for u in undefined.values())
  lowered = [n for n in names if n in LOWER_IS_BETTER]
  lower = f"; lower for {' and '.join(lowered)}" if lowered else ""
  noisy = " and ".join(n for n in NOISE_REWARDING if n in names)
  caveat = ""
  if noisy:  # The convention is kept (the published tables bold the highest), and qualified.
    caveat = (f'\n<p class="note" id="sf-ag">{noisy}: higher is better, the field\'s convention, '
              f"and bold here by it; but they grow with any change from pixel to pixel, so "
              f"noise, ringing and an embossed look raise them as much as detail does, and the "
              f"highest is not for that reason the sharpest image. Read them with the images "
              f"below and the other metrics.</p>")
  return (f'<div class="wide"><table class="means"><thead><tr><th>method</th>{head}</tr>'
          f'</thead><tbody>{"".join(rows)}</tbody></table></div>\n'
          f'<p class="note">Means over {images} image(s). Bold: the best of the column, ties at '
          f'the precision shown included (higher is better{lower}). '
          f'Undefined values: <span id="undefined-total">{total}</span>'
          f'{" (the superscripts give how many per mean)" if total else ""}.</p>{caveat}')


def per_image_table(method: str, result: scoring.EvaluationResult) -> str:
  """One method's per-image scores as a table sortable by clicking a column header."""
  head = '<th data-sort="text">image</th>' + "".join(f"<th>{_esc(n)}</th>" for n in result.names)
  rows = []
  for name, row in result.rows:
    cells = [f'<td data-v="{_esc(name)}">{_esc(name)}</td>']
    for n in result.names:
      v = row[n]
      cells.append('<td data-v="" class="undef">undefined</td>' if v is None
                   else f'<td data-v="{v!r}">{v:.3f}</td>')
    rows.append(f'<tr>{"".join(cells)}</tr>')
  return (f'<details><summary>{_esc(method)} ({len(rows)} images)</summary>\n'
          f'<div class="wide"><table class="sortable scores" data-method="{_esc(method)}">'
          f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></details>')


def _figure(uri: str, alt: str, box: Optional[tuple[float, float, float, float]] = None) -> str:
  mark = ""
  if box is not None:
    left, top, width, height = box
    mark = (f'<span class="box" style="left:{left:.2f}%;top:{top:.2f}%;width:{width:.2f}%;'
            f'height:{height:.2f}%"></span>')
  return f'<div class="thumb"><img src="{uri}" alt="{_esc(alt)}">{mark}</div>'


def gallery_rows(image: ImageSet, methods: Sequence[Method], problems: list[str]) -> str:
  """Two table rows for one image: the thumbnails, then the zoomed crops.

  A file that cannot be read now gives a cell saying so and a message in `problems`.
  """
  paths = [image.ir, image.vis, *image.fused]
  labels = ["infrared", "visible"] + [m.name for m in methods]
  arrays: list[Optional[np.ndarray]] = []
  for path in paths:
    try:
      arrays.append(display_image(path))
    except imageio.ImageError as e:
      problems.append(str(e))
      arrays.append(None)
  grays = [imageio.to_gray_evaluation(a) for a in arrays[:2] if a is not None]
  shape = next((a.shape for a in arrays if a is not None), (1, 1))
  side = crop_side(shape)
  top, left = busiest_window(grays, side) if grays else (0, 0)
  h, w = shape[:2]
  box = (100 * left / w, 100 * top / h, 100 * side / w, 100 * side / h)
  thumbs, crops = [], []
  for array, label in zip(arrays, labels):
    if array is None:
      thumbs.append('<td class="missing">cannot read</td>')
      crops.append("<td></td>")
      continue
    thumbs.append(f"<td>{_figure(encode(thumbnail(array)), f'{image.name} {label}', box)}</td>")
    crop = encode(zoom(array, top, left, side), "PNG")
    crops.append(f'<td><img class="zoom" src="{crop}" alt="{_esc(f"{image.name} {label} zoom")}">'
                 "</td>")
  factor = max(1, ZOOM_SIDE // side)
  where = f"zoom x{factor}<br><small>{side}x{side} at x={left}, y={top}</small>"
  return (f'<tr class="images"><th scope="row">{_esc(image.name)}</th>{"".join(thumbs)}</tr>\n'
          f'<tr class="zooms"><th scope="row">{where}</th>{"".join(crops)}</tr>')


# Fits any window (see the module docstring): no width in px; images shrink with their box
# (`max-width:100%`, `height:auto` keeps the aspect), and the gallery shares the page's width
# among its columns (`table-layout:fixed`), where four methods' 256-px thumbnails once made a
# 1536-px row. `.wide` boxes scroll a table wider than the window within themselves.
_STYLE = _asset("style.css")

# Click a header of a `table.sortable` to sort by it; again to reverse. Cells carry their sort
# key in `data-v` (numbers; "" for undefined, always last; text where the header says so).
_SCRIPT = _asset("script.js")


def build_html(comparison: Comparison, *, title: str = "Fusion comparison",
               sources: tuple[str, str] = ("", ""),
               stop: Optional[interrupts.StopRequest] = None) -> str:
  """The complete page for a comparison.

  Args:
    comparison: the scores (from `compare`); files that cannot be read for the gallery are
      appended to its `problems` (and listed on the page).
    title: the page's title.
    sources: how the page names the infrared and visible folders.
    stop: checked before each image of the gallery; raises `Stopped` once it is set.

  Raises:
    Stopped: a stop request arrived (nothing is returned).
  """
  names, methods = comparison.names, comparison.methods
  results = comparison.results
  n = len(comparison.images)

  def check_stop():
    if stop is not None and stop.signum is not None:
      raise Stopped(stop.signum)

  means = {m.name: results[m.name].means() for m in methods}
  undefined = {m.name: results[m.name].undefined() for m in methods}
  plots = []
  for name in names:
    check_stop()
    values = [[v for _, r in results[m.name].rows if (v := r[name]) is not None] for m in methods]
    uri = distribution_plot(name, [m.name for m in methods], values)
    plots.append(f'<img class="plot" src="{uri}" alt="{_esc(name)} per image, per method">')
  gallery = []
  for image in comparison.images:
    check_stop()
    gallery.append(gallery_rows(image, methods, comparison.problems))
  method_list = "".join(f"<li><b>{_esc(m.name)}</b>: {_esc(m.folder)}</li>" for m in methods)
  ir_dir, vis_dir = sources
  skipped = ""
  if comparison.problems:
    items = "".join(f"<li>{_esc(p)}</li>" for p in comparison.problems)
    skipped = (f'<h2 id="skipped">Skipped files ({len(comparison.problems)})</h2>'
               f'<ul class="skipped">{items}</ul>')
  columns = "".join(f"<th>{_esc(m.name)}</th>" for m in methods)
  ssim = f"{comparison.ssim_data_range:g}"
  conventions = "".join(f"<li>{_esc(c.format(ssim=ssim))}</li>" for c in CONVENTIONS)
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p>{n} image pair(s), infrared (or PET/SPECT/CT) from {_esc(ir_dir)} and visible (or MRI)
from {_esc(vis_dir)}, paired by file stem; {len(methods)} method(s):</p>
<ul>{method_list}</ul>
<p class="note">{len(comparison.problems)} file problem(s){
    ' (listed <a href="#skipped">at the end</a>)' if comparison.problems else ''}.
Every method is scored on the same images.</p>
<h2>Means</h2>
{means_table(names, means, undefined, n)}
<ul class="conventions">{conventions}</ul>
<h2>Distributions across the images</h2>
<p class="note">Box: quartiles and median (whiskers 1.5 IQR); dots: the images.</p>
<div class="plots">{"".join(plots)}</div>
<h2>Per image</h2>
<p class="note">One table per method (click a method to show it); click a column header to sort
(again to reverse).</p>
{"".join(per_image_table(m.name, results[m.name]) for m in methods)}
<h2>Images</h2>
<p class="note">Thumbnails (longest side at most {THUMB_SIDE} px, smaller where the window is
narrow); the frame marks the zoomed region, the window where the two sources vary most, shown
below each row enlarged by nearest neighbour.</p>
<div class="wide"><table class="gallery">
<thead><tr><th>image</th><th>infrared</th><th>visible</th>{columns}</tr></thead><tbody>
{"".join(gallery)}
</tbody></table></div>
{skipped}
<script>{_SCRIPT}</script>
</body></html>
"""


def write_atomic(path: str | os.PathLike, page: str) -> None:
  """Writes the page through a temporary file, then renames (`files.atomic_write`)."""
  with files.atomic_write(path, "w", encoding="utf-8") as f:
    f.write(page)
