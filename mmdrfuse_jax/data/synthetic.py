"""Procedural infrared/visible pairs for the quickstart and tests (NumPy only, no files).

Each pair is one random street-like scene seen by two sensors:
- infrared: temperature. A cool, smooth sky and ground; warm people, vehicles (with a hot
  engine) and building windows; soft object edges, slight blur, Gaussian sensor noise and
  the column stripes of uncooled sensors.
- visible: reflectance under light. Textured ground, a road with lane marks, building
  facades with window grids, coloured objects with their own texture; lit by a low,
  uneven illumination (dusk or night, street-light pools) with deep shadows, one of which
  always hides a warm object that the infrared image still shows; noise that grows in the dark.

So the two images disagree the way real pairs do: each holds detail the other lacks.
A pair depends only on (seed, index), not on how many pairs are made.
"""

from __future__ import annotations

import pathlib

import numpy as np

from mmdrfuse_jax.io import imageio


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
  """Value noise: a (cells+1)^2 random grid, smoothstep-interpolated to (height, width),
  in [0, 1].
  """
  grid = rng.random((cells + 1, cells + 1))

  def axis(n):
    pos = np.linspace(0, cells, n, endpoint=False) + 0.5 * cells / n
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i0
    return i0, f * f * (3 - 2 * f)

  iy, fy = axis(height)
  ix, fx = axis(width)
  rows = grid[iy] * (1 - fy)[:, None] + grid[iy + 1] * fy[:, None]
  return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _fractal(rng: np.random.Generator, height: int, width: int, base_cells: int,
             octaves: int) -> np.ndarray:
  """Sum of value-noise octaves (each twice as fine, half as strong), scaled to [0, 1]."""
  total = np.zeros((height, width))
  amp, norm, cells = 1.0, 0.0, base_cells
  for _ in range(octaves):
    total += amp * _smooth_noise(rng, height, width, min(cells, max(height, width)))
    norm += amp
    amp, cells = amp * 0.5, cells * 2
  return total / norm


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
  """Separable box blur with edge replication (cumulative sums: cost independent of radius)."""
  if radius < 1:
    return image
  k = 2 * radius + 1
  for axis in (0, 1):
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(image, pad, mode="edge"), axis=axis)
    n = image.shape[axis]
    image = (np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / k
  return image


def _ellipse(yy, xx, cy, cx, ry, rx, soft):
  """Soft ellipse mask in [0, 1]: 1 inside, falling to 0 over `soft` (relative) at the rim."""
  d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
  return np.clip((1 + soft - d) / (2 * soft), 0, 1)


def _rect(yy, xx, y0, x0, y1, x1, soft):
  """Soft axis-aligned rectangle mask in [0, 1] (`soft` in pixels)."""
  dy = np.minimum(yy - y0, y1 - yy)
  dx = np.minimum(xx - x0, x1 - xx)
  return np.clip((np.minimum(dy, dx) + soft) / (2 * soft), 0, 1)


def _window(h: int, w: int, y0: float, x0: float, y1: float, x1: float, margin: float):
  """The slices of a box (grown by `margin`) clipped to the image, and its coordinate vectors."""
  ys = slice(max(int(y0 - margin), 0), min(int(np.ceil(y1 + margin)) + 1, h))
  xs = slice(max(int(x0 - margin), 0), min(int(np.ceil(x1 + margin)) + 1, w))
  yy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None]
  xx = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :]
  return (ys, xs), yy, xx


def _paste(image: np.ndarray, sl, mask: np.ndarray, value) -> None:
  """image[sl] <- mix(image[sl], value, mask), in place (mask (h, w); image 2-D or RGB)."""
  region = image[sl]
  m = mask if image.ndim == 2 else mask[..., None]
  region += m * (value - region)


def make_pair(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One scene: infrared uint8 (H, W) and visible RGB uint8 (H, W, 3)."""
  h, w = height, width
  f32 = np.float32
  yy = np.arange(h, dtype=f32)[:, None]
  xx = np.arange(w, dtype=f32)[None, :]
  horizon = rng.uniform(0.25, 0.5) * h
  sky = np.broadcast_to(yy < horizon, (h, w))
  ground_t = np.clip((yy - horizon) / max(h - horizon, 1), 0, 1)

  # Infrared background: cool sky warming towards the horizon, ground slightly warmer,
  # all smooth.
  ir = np.where(sky, 0.08 + 0.12 * yy / max(horizon, 1), 0.25 + 0.1 * ground_t).astype(f32)
  ir += (0.08 * (_fractal(rng, h, w, 3, 3) - 0.5)).astype(f32)

  # Visible background: bright sky, textured ground (grass or gravel).
  sky_rgb = (np.array([0.55, 0.65, 0.85]) * rng.uniform(0.8, 1.1)).astype(f32)
  ground_rgb = rng.uniform([0.25, 0.3, 0.15], [0.45, 0.45, 0.3]).astype(f32)
  tex = _fractal(rng, h, w, 16, 4).astype(f32)
  vis = np.where(sky[..., None], sky_rgb * (1 - 0.3 * (yy / max(horizon, 1)))[..., None],
                 ground_rgb * (0.6 + 0.8 * tex)[..., None]).astype(f32)

  # Road: a darker band to the horizon with dashed lane marks; warmer than grass in infrared.
  road_cx = rng.uniform(0.3, 0.7) * w
  half = (0.05 + 0.4 * ground_t) * w
  road = (~sky) & (np.abs(xx - road_cx) < half)
  vis = np.where(road[..., None], (0.3 + 0.1 * tex)[..., None], vis)
  dash = (road & (np.abs(xx - road_cx) < 0.006 * w + 0.01 * half)
          & ((yy // max(h // 24, 1)) % 2 == 0))
  vis[dash] = 0.9
  ir[road] += 0.06

  # Buildings on the horizon: facades with window grids; windows are warm in infrared.
  for _ in range(rng.integers(1, 4)):
    bw, bh = rng.uniform(0.1, 0.3) * w, rng.uniform(0.12, 0.35) * h
    x0 = rng.uniform(0, w - bw)
    y1 = horizon + rng.uniform(0, 0.05) * h
    y0 = y1 - bh
    sl, wy, wx = _window(h, w, y0, x0, y1, x0 + bw, 2)
    m = _rect(wy, wx, y0, x0, y1, x0 + bw, 1.0)
    cell = rng.uniform(0.03, 0.06) * w
    fy, fx = ((wy - y0) % cell) / cell, ((wx - x0) % cell) / cell
    window = m * ((fy > 0.3) & (fy < 0.75) & (fx > 0.25) & (fx < 0.7))
    facade = rng.uniform(0.3, 0.7, size=3).astype(f32) * (0.85 + 0.3 * tex[sl][..., None])
    _paste(vis, sl, m, facade)
    _paste(vis, sl, window, f32(rng.uniform(0.05, 0.25)))
    _paste(ir, sl, m, f32(rng.uniform(0.3, 0.45)))
    ir[sl] += window * f32(rng.uniform(0.05, 0.2))

  # Warm objects: people and vehicles on the ground.
  objects = []
  for _ in range(rng.integers(3, 8)):
    foot = horizon + rng.uniform(0.15, 1.0) * (h - horizon)
    scale = 0.4 + 0.8 * (foot - horizon) / max(h - horizon, 1)  # farther -> smaller
    cx = rng.uniform(0.05, 0.95) * w
    if rng.random() < 0.6:  # person
      ry, rx = 0.09 * h * scale, 0.022 * w * scale
      cy = foot - ry
      sl, wy, wx = _window(h, w, cy - 1.5 * ry, cx - 1.3 * rx, foot + 0.2 * ry, cx + 1.3 * rx, 2)
      m = np.maximum(_ellipse(wy, wx, cy, cx, ry, rx, 0.15),
                     _ellipse(wy, wx, cy - 1.15 * ry, cx, 0.25 * ry, 0.9 * rx, 0.2))
      heat = f32(rng.uniform(0.75, 0.95))
      colour = rng.uniform(0.05, 0.8, size=3).astype(f32)
      stripes = f32(1.0)
    else:  # vehicle with a hot engine at one end
      vh, vw = 0.07 * h * scale, 0.12 * w * scale
      sl, wy, wx = _window(h, w, foot - vh, cx - vw, foot, cx + vw, 3)
      m = _rect(wy, wx, foot - vh, cx - vw, foot, cx + vw, 1.5)
      side = rng.choice([-1, 1])
      engine = _ellipse(wy, wx, foot - 0.5 * vh, cx + side * 0.7 * vw, 0.4 * vh, 0.3 * vw, 0.5)
      heat = rng.uniform(0.5, 0.7) + 0.3 * engine
      colour = rng.uniform(0.1, 0.9, size=3).astype(f32)
      stripes = (1 + 0.25 * np.sign(np.sin(2 * np.pi * (wy - foot) / max(vh / 3, 1))))[..., None]
    objects.append((cx, foot))
    _paste(ir, sl, m, heat)
    _paste(vis, sl, m, colour * (0.8 + 0.4 * tex[sl][..., None]) * stripes)

  # Illumination: low global level, smooth unevenness, street-light pools, deep shadows.
  level = rng.uniform(0.12, 0.9)
  light = (level * (0.5 + _smooth_noise(rng, h, w, 3))).astype(f32)
  for _ in range(rng.integers(0, 4)):
    sy, sx, sr = rng.uniform(horizon, h), rng.uniform(0, w), rng.uniform(0.05, 0.15) * w
    light += f32(rng.uniform(0.3, 0.8)) * np.exp(
        -((yy - sy) ** 2 + (xx - sx) ** 2) / f32(2 * sr * sr))
  shadow = np.zeros((h, w), f32)
  hidden = objects[rng.integers(len(objects))]  # this one is always in deep shadow
  for k in range(rng.integers(1, 4)):
    if k == 0:
      cy, cx = hidden[1] - 0.08 * h, hidden[0]
    else:
      cy, cx = rng.uniform(horizon, h), rng.uniform(0, w)
    ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.3) * w
    sl, wy, wx = _window(h, w, cy - 1.3 * ry, cx - 1.3 * rx, cy + 1.3 * ry, cx + 1.3 * rx, 1)
    np.maximum(shadow[sl], _ellipse(wy, wx, cy, cx, ry, rx, 0.3), out=shadow[sl])
  light *= 1 - f32(0.92) * shadow
  vis *= light[..., None]
  vis += rng.standard_normal(size=vis.shape, dtype=f32) * f32(0.01 + 0.025 * (1 - level))
  vis = np.clip(vis, 0, 1) ** f32(rng.uniform(0.9, 1.2))

  # Infrared sensor: optics blur, Gaussian noise, fixed-pattern column stripes.
  ir = _box_blur(ir, 1)
  ir += rng.standard_normal(size=ir.shape, dtype=f32) * f32(rng.uniform(0.008, 0.02))
  ir += rng.standard_normal(size=(1, w), dtype=f32) * f32(0.008)
  return imageio.to_levels(np.clip(ir, 0, 1) * 255), imageio.to_levels(np.clip(vis, 0, 1) * 255)


def make_pairs(num_pairs: int, height: int = 256, width: int = 256, seed: int = 0, *,
               color: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Procedural infrared/visible pairs, deterministic from `seed`.

  Args:
    num_pairs: how many pairs; pair i depends only on (seed, i).
    height: image height.
    width: image width.
    seed: the generator's seed.
    color: return the visible images as RGB (N, H, W, 3) instead of gray (N, H, W).

  Returns:
    (ir, vis): uint8 arrays, ir (N, H, W), vis (N, H, W) gray (PIL convert("L") of the
    RGB rendering) or (N, H, W, 3).
  """
  if num_pairs < 0 or height < 1 or width < 1:
    raise ValueError(f"bad synthetic size: {num_pairs} pairs of {height}x{width}")
  ir = np.empty((num_pairs, height, width), np.uint8)
  vis = np.empty((num_pairs, height, width, 3) if color else (num_pairs, height, width), np.uint8)
  for i in range(num_pairs):
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i])))
    a, b = make_pair(height, width, rng)
    ir[i] = a
    vis[i] = b if color else imageio.to_gray_published(b)
  return ir, vis


def write_pairs(folder, num_pairs: int, height: int = 256, width: int = 256, seed: int = 0) -> None:
  """Writes pairs as `folder/ir/NNNN.png` (gray) and `folder/vi/NNNN.png` (RGB), atomically."""
  folder = pathlib.Path(folder)
  ir, vis = make_pairs(num_pairs, height, width, seed, color=True)
  for i in range(num_pairs):
    imageio.write_image_atomic(folder / "ir" / f"{i:04d}.png", ir[i])
    imageio.write_image_atomic(folder / "vi" / f"{i:04d}.png", vis[i])
