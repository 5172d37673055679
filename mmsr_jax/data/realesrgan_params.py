"""The Real-ESRGAN second-order degradation's presets (and the lighter SeeSR one) and the random
parameters drawn from them per example on the host: blur kernels, resize factors and modes, noise,
JPEG qualities. ``realesrgan.RealESRGANDegrader`` applies them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.special

from mmsr_jax.schema.choices import DEGRADATION_PRESETS

KERNEL_SIZE = 21  # every kernel is zero-padded to this size
RESIZE_MODES = ("area", "bilinear", "bicubic")
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Ranges of one degradation order."""
  kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
  sinc_prob: float = 0.1
  blur_sigma: tuple[float, float] = (0.2, 3.0)
  betag: tuple[float, float] = (0.5, 4.0)
  betap: tuple[float, float] = (1.0, 2.0)
  blur_prob: float = 1.0
  resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
  resize_range: tuple[float, float] = (0.15, 1.5)
  gaussian_noise_prob: float = 0.5
  noise_range: tuple[float, float] = (1.0, 30.0)  # sigma, of 255
  poisson_scale_range: tuple[float, float] = (0.05, 3.0)
  gray_noise_prob: float = 0.4
  jpeg_range: tuple[float, float] = (30.0, 95.0)


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
  """A full second-order preset."""
  name: str
  first: StageConfig
  second: StageConfig
  final_sinc_prob: float = 0.8
  kernel_range: tuple[int, ...] = tuple(range(7, 22, 2))


REALESRGAN = DegradationConfig(
    name="realesrgan",
    first=StageConfig(),
    second=StageConfig(blur_sigma=(0.2, 1.5), blur_prob=0.8, resize_prob=(0.3, 0.4, 0.3),
                       resize_range=(0.3, 1.2), noise_range=(1.0, 25.0),
                       poisson_scale_range=(0.05, 2.5)),
)
SEESR = DegradationConfig(
    name="seesr",
    first=StageConfig(resize_range=(0.3, 1.5), noise_range=(1.0, 15.0),
                      poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0)),
    second=StageConfig(blur_sigma=(0.2, 1.5), blur_prob=0.5, resize_prob=(0.3, 0.4, 0.3),
                       resize_range=(0.6, 1.2), noise_range=(1.0, 12.0),
                       poisson_scale_range=(0.05, 1.0), jpeg_range=(60.0, 100.0)),
)
PRESETS: dict[str, DegradationConfig] = {"realesrgan": REALESRGAN, "seesr": SEESR}
assert tuple(PRESETS) == DEGRADATION_PRESETS, "name the presets in schema/choices.py too"


def get_preset(name: str) -> DegradationConfig:
  if name not in PRESETS:
    raise ValueError(f"degradation preset {name!r}: expected one of {tuple(PRESETS)}")
  return PRESETS[name]


# ------------------------------------------------------------------------------------- kernels
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  return np.meshgrid(r, r)  # xx varies along columns, yy along rows


def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
  """x^T Sigma^-1 x on a size x size grid, Sigma = R diag(sx^2, sy^2) R^T."""
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  cov = rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T
  inv = np.linalg.inv(cov)
  xx, yy = _grid(size)
  return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def gaussian_family_kernel(kind: str, size: int, sigma_x: float, sigma_y: float, theta: float,
                           beta: float = 1.0) -> np.ndarray:
  """A normalised Gaussian-family kernel (the BasicSR shapes), with d = x^T Sigma^-1 x for the
  rotated covariance: Gaussian exp(-d / 2), generalized exp(-d^beta / 2), plateau
  1 / (1 + d^beta). 'iso' kinds are called with sigma_x = sigma_y and theta = 0."""
  d = _mahalanobis(size, sigma_x, sigma_y, theta)
  if kind.startswith("generalized"):
    k = np.exp(-0.5 * np.power(d, beta))
  elif kind.startswith("plateau"):
    k = 1.0 / (1.0 + np.power(d, beta))
  else:
    k = np.exp(-0.5 * d)
  return k / k.sum()


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
  """Circular low-pass (2D sinc) kernel: cutoff J1(cutoff r) / (2 pi r), normalised to sum 1."""
  xx, yy = _grid(size)
  r = np.hypot(xx, yy)
  with np.errstate(divide="ignore", invalid="ignore"):
    k = cutoff * scipy.special.j1(cutoff * r) / (2.0 * np.pi * r)
  k[r == 0] = cutoff ** 2 / (4.0 * np.pi)
  return k / k.sum()


def pad_kernel(k: np.ndarray, size: int = KERNEL_SIZE) -> np.ndarray:
  p = (size - k.shape[0]) // 2
  return np.pad(k, p).astype(np.float32)


def delta_kernel(size: int = KERNEL_SIZE) -> np.ndarray:
  k = np.zeros((size, size), np.float32)
  k[size // 2, size // 2] = 1.0
  return k


def _beta(rng: np.random.Generator, lo: float, hi: float) -> float:
  # Half of the time below 1 (sharper core), half above (as the reference).
  return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi))


def random_blur_kernel(rng: np.random.Generator, stage: StageConfig,
                       kernel_range: tuple[int, ...]) -> tuple[np.ndarray, dict[str, Any]]:
  """One stage's kernel: sinc with p = sinc_prob, else a Gaussian-family kernel; padded to 21."""
  size = int(rng.choice(kernel_range))
  if rng.random() < stage.sinc_prob:
    cutoff = float(rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi))
    return pad_kernel(sinc_kernel(cutoff, size)), {"type": "sinc", "size": size,
                                                    "cutoff": cutoff}
  kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(stage.kernel_prob)))]
  sx = float(rng.uniform(*stage.blur_sigma))
  if kind.endswith("iso") and not kind.endswith("aniso"):
    sy, theta = sx, 0.0
  else:
    sy = float(rng.uniform(*stage.blur_sigma))
    theta = float(rng.uniform(-np.pi, np.pi))
  beta = 1.0
  if kind.startswith("generalized"):
    beta = _beta(rng, *stage.betag)
  elif kind.startswith("plateau"):
    beta = _beta(rng, *stage.betap)
  k = gaussian_family_kernel(kind, size, sx, sy, theta, beta)
  return pad_kernel(k), {"type": kind, "size": size, "sigma": (sx, sy), "theta": theta,
                         "beta": beta}


# ----------------------------------------------------------------------- parameters (host side)
def _resize_factor(rng: np.random.Generator, stage: StageConfig) -> float:
  kind = int(rng.choice(3, p=np.asarray(stage.resize_prob)))
  if kind == 0:
    return float(rng.uniform(1.0, stage.resize_range[1]))
  if kind == 1:
    return float(rng.uniform(stage.resize_range[0], 1.0))
  return 1.0


def _noise_params(rng: np.random.Generator, stage: StageConfig) -> np.ndarray:
  """[gaussian?, sigma (0..1 scale), grey?, poisson scale]."""
  gaussian = rng.random() < stage.gaussian_noise_prob
  sigma = float(rng.uniform(*stage.noise_range)) / 255.0
  grey = rng.random() < stage.gray_noise_prob
  pscale = float(rng.uniform(*stage.poisson_scale_range))
  return np.array([gaussian, sigma, grey, pscale], np.float32)


def sample_params(rng: np.random.Generator, hr_hw: tuple[int, int], preset: DegradationConfig,
                  scale: int = 4) -> dict[str, np.ndarray]:
  """Draws every random choice of one example's degradation (fixed-shape numpy arrays).

  Keys: ``k1``, ``k2``, ``sinc`` [21, 21] (kernels summing to 1; a skipped blur is a delta);
  ``size1``, ``size2`` [2] (stage output sizes), ``mode`` [3] (resize mode per stage 1, 2,
  final, index into RESIZE_MODES); ``noise1``, ``noise2`` [4]; ``jpeg`` [2] (qualities);
  ``order`` (0: resize -> sinc -> JPEG, 1: JPEG -> resize -> sinc); ``seed`` [2] uint32.
  """
  h, w = hr_hw
  first, second = preset.first, preset.second
  k1, _ = random_blur_kernel(rng, first, preset.kernel_range)
  k2, _ = random_blur_kernel(rng, second, preset.kernel_range)
  if rng.random() >= second.blur_prob:
    k2 = delta_kernel()
  if rng.random() < preset.final_sinc_prob:
    size = int(rng.choice(preset.kernel_range))
    sinc = pad_kernel(sinc_kernel(float(rng.uniform(np.pi / 3, np.pi)), size))
  else:
    sinc = delta_kernel()
  f1 = _resize_factor(rng, first)
  size1 = (max(1, int(h * f1)), max(1, int(w * f1)))
  f2 = _resize_factor(rng, second)
  size2 = (max(1, int(h / scale * f2)), max(1, int(w / scale * f2)))
  return {
      "k1": k1, "k2": k2, "sinc": sinc,
      "size1": np.array(size1, np.int32), "size2": np.array(size2, np.int32),
      "mode": rng.integers(0, len(RESIZE_MODES), size=3).astype(np.int32),
      "noise1": _noise_params(rng, first), "noise2": _noise_params(rng, second),
      "jpeg": np.array([rng.uniform(*first.jpeg_range), rng.uniform(*second.jpeg_range)],
                       np.float32),
      "order": np.int32(rng.random() < 0.5),
      "seed": rng.integers(0, 2 ** 32, size=2, dtype=np.uint32),
  }


def canvas_sizes(hr_hw: tuple[int, int], preset: DegradationConfig,
                 scale: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The fixed (max) canvas of stage 1 and stage 2 outputs for an HR size."""
  h, w = hr_hw
  m1 = max(1.0, preset.first.resize_range[1])
  m2 = max(1.0, preset.second.resize_range[1])
  return ((int(h * m1), int(w * m1)),
          (max(h // scale, int(h / scale * m2)), max(w // scale, int(w / scale * m2))))



def stack_params(params: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-example ``sample_params`` outputs stacked along a leading batch axis."""
  return {k: np.stack([np.asarray(p[k]) for p in params]) for k in params[0]}
