"""Reading, pairing and atomically writing image files, and every pixel conversion.

Every function here that deals with files from users reports each failure as an
`ImageError` whose message names the file and the problem in one line. Images are never
decoded with anything that can execute code (PIL only decodes pixels).

The pixel conversions (16 to 8 bits, colour to gray, YCbCr, floats to integer levels) are
all here, so that each is written once. Colour to gray has two conventions on purpose:
`to_gray_published` (what the published code fed its networks) and `to_gray_evaluation`
(what the field's evaluator scored the published tables with); see SPEC sections 2 and 6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm")


class ImageError(MMDRFuseError, ValueError):
  """A user's image file (or pair of files) cannot be used; the message says why."""


@contextlib.contextmanager
def _opened(path: pathlib.Path) -> Iterator[Image.Image]:
  """Opens an image with PIL, turning every decoding failure into a one-line ImageError."""
  try:
    with Image.open(path) as img:
      yield img
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(f"{path}: no such file") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def read_size(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of an image file from its header, without decoding the pixels.

  Raises:
    ImageError: the file is missing or not an image.
  """
  with _opened(pathlib.Path(path)) as img:
    return img.height, img.width


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as stored: 8-bit or 16-bit, gray (H, W) or colour (H, W, 3).

  Palette and alpha images become RGB; 32-bit integer gray ("I" mode, as PIL opens some
  16-bit PNGs) is returned as uint16 when its values fit.

  Raises:
    ImageError: the file is missing, unreadable, or of an unsupported pixel format.
  """
  path = pathlib.Path(path)
  with _opened(path) as img:
    img.load()
    mode = img.mode
    if mode in ("1", "L", "LA"):
      return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
      return np.asarray(img, dtype=np.uint16)
    if mode == "I":
      arr = np.asarray(img)
      if arr.min() < 0 or arr.max() > 65535:
        raise ImageError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
      return arr.astype(np.uint16)
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"{path}: unsupported pixel format {mode!r}")


# ---------------------------------------------------------------------------------------------
# Pixel conversions.

# ITU-R BT.601 luma weights of R, G, B: both gray conventions and YCbCr use them.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Full-range BT.601 (JPEG) colour conversion, the field's convention for colour fusion.
_RGB_TO_YCBCR = np.array([_LUMA_WEIGHTS,
                          [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402],
                          [1.0, -0.344136, -0.714136],
                          [1.0, 1.772, 0.0]])


def max_value(image: np.ndarray) -> int:
  """The full-scale value of an image's integer type (255 or 65535)."""
  return 65535 if image.dtype == np.uint16 else 255


def to_levels(values: np.ndarray, full_scale: int = 255) -> np.ndarray:
  """Float values on 0..full_scale to the integer image type of that scale.

  Rounds half up, `floor(v + 0.5)` (PIL's and the published writer's rounding), in the
  values' own float precision, then clips to 0..full_scale.

  Returns:
    uint16 when `full_scale` is above 255, else uint8.
  """
  values = np.asarray(values)
  dtype = np.uint16 if full_scale > 255 else np.uint8
  return np.clip(np.floor(values + values.dtype.type(0.5)), 0, full_scale).astype(dtype)


def to_8bit(image: np.ndarray) -> np.ndarray:
  """8-bit images unchanged; 16-bit images scaled to 0..255: `round(v / 257)`, half up.

  Computed exactly in integers (65535 -> 255); `v / 257` is never exactly half-way, so this
  also equals float rounding, half up or half to even.
  """
  if image.dtype == np.uint8:
    return image
  return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def has_color(image: np.ndarray) -> bool:
  """Whether an image has colour: RGB (H, W, 3) with channels that differ somewhere.

  An RGB image whose three channels are equal everywhere is gray stored as RGB (the shared
  MRI_PET MRI files are): it has no chroma to give.
  """
  return image.ndim == 3 and not (np.array_equal(image[..., 0], image[..., 1])
                                  and np.array_equal(image[..., 0], image[..., 2]))


def to_gray_published(image: np.ndarray) -> np.ndarray:
  """Gray as the published code reads its inputs (SPEC 2): PIL's `convert("L")`.

  For 8-bit RGB, PIL computes `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16` (ITU-R 601-2
  in fixed point). 16-bit colour has no PIL equivalent, so the same weights are applied in
  float64 and rounded half up. This is the convention for everything fed to a network
  (fusion, training data); `to_gray_evaluation` is the one for scoring.

  Returns:
    A gray image of the input's integer dtype.
  """
  if image.ndim == 2:
    return image
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image, "RGB").convert("L"), dtype=np.uint8)
  return to_levels(image.astype(np.float64) @ np.array(_LUMA_WEIGHTS), max_value(image))


def to_gray_evaluation(image: np.ndarray) -> np.ndarray:
  """Gray as the field's evaluator reads images for the metrics (SPEC 6), float32 on 0..255.

  Colour: `round(0.299 R + 0.587 G + 0.114 B)` in float32 with NumPy's rounding (half to
  even), a 16-bit image's channels first divided by 257 (not rounded). Gray: its own
  values, 16-bit ones as `to_8bit`. On 8-bit colour this differs from `to_gray_published`
  by one level in a few pixels (float32 and half to even against fixed point and half up);
  both are kept because the published networks were fed one and the published tables were
  scored with the other.

  Raises:
    ValueError: the image is neither 8- nor 16-bit.
  """
  if image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"expected an 8- or 16-bit image, got {image.dtype}")
  if image.ndim == 2:
    return to_8bit(image).astype(np.float32)
  img = image.astype(np.float32)
  if image.dtype == np.uint16:
    img = img / np.float32(257.0)
  r, g, b = (np.float32(w) for w in _LUMA_WEIGHTS)
  return np.round(img[..., 0] * r + img[..., 1] * g + img[..., 2] * b).astype(np.float32)


def rgb_to_ycbcr(rgb: np.ndarray, full_scale: int = 255) -> np.ndarray:
  """(H, W, 3) RGB on 0..full_scale to float YCbCr on the same scale (chroma centred at half)."""
  ycbcr = rgb.astype(np.float64) @ _RGB_TO_YCBCR.T
  ycbcr[..., 1:] += (full_scale + 1) / 2
  return ycbcr


def ycbcr_to_rgb(ycbcr: np.ndarray, full_scale: int = 255) -> np.ndarray:
  """Float YCbCr back to RGB integers (rounded half up, clipped to 0..full_scale)."""
  centred = ycbcr.astype(np.float64).copy()
  centred[..., 1:] -= (full_scale + 1) / 2
  return to_levels(centred @ _YCBCR_TO_RGB.T, full_scale)


def to_unit_float(image: np.ndarray) -> np.ndarray:
  """Scales an integer image to float32 in [0, 1] by its type's full scale."""
  return image.astype(np.float32) / np.float32(max_value(image))


def read_gray(path: str | os.PathLike) -> np.ndarray:
  """Reads a file as a float32 (H, W) gray image in [0, 1], as the published code does."""
  image = read_image(path)
  return to_unit_float(to_gray_published(image))


# ---------------------------------------------------------------------------------------------
# Writing and pairing files.


def write_image_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes `image` to `path` through a temporary file in the same folder, then renames.

  A reader never sees a half-written file, and an existing file at `path` is only
  replaced once the new one is complete. PIL cannot write 16-bit RGB, so such images are
  stored with 8 bits per channel (rounded); 16-bit gray stays 16-bit.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fmt = Image.registered_extensions().get(path.suffix.lower())
  if fmt is None:
    raise ImageError(f"{path}: unknown image extension {path.suffix!r}")
  if image.ndim == 3 and image.dtype == np.uint16:
    image = to_8bit(image)
  with files.atomic_write(path) as f:
    Image.fromarray(np.ascontiguousarray(image)).save(f, format=fmt)


@dataclasses.dataclass(frozen=True)
class PairingResult:
  """Files of several folders matched by stem.

  Attributes:
    pairs: (stem, (path_in_folder_0, path_in_folder_1, ...)) sorted by stem.
    problems: one-line messages for files that could not be matched.
  """

  pairs: list[tuple[str, tuple[pathlib.Path, ...]]]
  problems: list[str]


def _images_by_stem(folder: pathlib.Path, problems: list[str]) -> dict[str, pathlib.Path]:
  by_stem: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if (not path.is_file() or path.name.startswith(".")
        or path.suffix.lower() not in IMAGE_EXTENSIONS):
      continue
    if path.stem in by_stem:
      problems.append(
          f"{path}: another image in {folder} has the same stem ({by_stem[path.stem].name})")
      continue
    by_stem[path.stem] = path
  return by_stem


def pair_folders(folders: Sequence[str | os.PathLike]) -> PairingResult:
  """Pairs the image files of several folders by file stem (`a.png` pairs with `a.jpg`).

  Raises:
    ImageError: a folder does not exist or holds no image.
  """
  folder_paths = [pathlib.Path(f) for f in folders]
  problems: list[str] = []
  maps = []
  for folder in folder_paths:
    if not folder.is_dir():
      raise ImageError(f"{folder}: no such folder")
    found = _images_by_stem(folder, problems)
    if not found:
      raise ImageError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    maps.append(found)
  all_stems = sorted(set().union(*maps))
  pairs: list[tuple[str, tuple[pathlib.Path, ...]]] = []
  for stem in all_stems:
    present = [m.get(stem) for m in maps]
    found_paths = [p for p in present if p is not None]
    if len(found_paths) == len(present):
      pairs.append((stem, tuple(found_paths)))
    else:
      have = next(p for p in present if p is not None)
      missing = [str(f) for f, p in zip(folder_paths, present) if p is None]
      problems.append(f"{have}: no partner with stem {stem!r} in {', '.join(missing)}")
  return PairingResult(pairs=pairs, problems=problems)


def pair_inputs(paths: Sequence[str | os.PathLike]) -> PairingResult:
  """Pairs inputs given either as files (one pair) or as folders (paired by stem).

  Raises:
    ImageError: the inputs mix files and folders, or a path does not exist.
  """
  path_list = [pathlib.Path(p) for p in paths]
  if all(p.is_dir() for p in path_list):
    return pair_folders(path_list)
  for p in path_list:
    if not p.exists():
      raise ImageError(f"{p}: no such file or folder")
    if p.is_dir():
      raise ImageError(
          f"{p}: is a folder, but the other input is a file; give two files or two folders")
  return PairingResult(pairs=[(path_list[0].stem, tuple(path_list))], problems=[])


# The roles of the images `check_same_size` compares, by count, in the project's order.
DEFAULT_ROLES = {2: ("infrared", "visible"), 3: ("fused", "infrared", "visible")}


def check_same_size(paths: Iterable[pathlib.Path], images: Iterable[np.ndarray],
                    roles: Sequence[str] | None = None) -> None:
  """Raises ImageError naming each file and its role when the heights and widths differ.

  Args:
    paths, images: the files and their pixels, in the same order.
    roles: what each file is ("infrared", "visible", ...); by default (infrared, visible)
      for two files and (fused, infrared, visible) for three.

  The message reads, for example, `ir/x.png: pair of different sizes (infrared ir/x.png is
  80x64, visible vi/x.png is 96x64)`, sizes as width x height.
  """
  paths, images = list(paths), list(images)
  if roles is None:
    roles = DEFAULT_ROLES.get(len(paths), ("",) * len(paths))
  sizes = [img.shape[:2] for img in images]
  if len(set(sizes)) > 1:
    desc = ", ".join(f"{role} {p} is {w}x{h}".lstrip()
                     for role, p, (h, w) in zip(roles, paths, sizes))
    what = "pair" if len(paths) == 2 else "images"
    raise ImageError(f"{paths[0]}: {what} of different sizes ({desc})")
