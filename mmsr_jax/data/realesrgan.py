"""The Real-ESRGAN second-order degradation (and the lighter SeeSR preset) applied to batches:
blur / resize / noise as jitted batch stages on fixed-size canvases, split over the batch axis of
the local devices, JPEG on the host. The parameters come from ``realesrgan_params``;
``docs/internals.md`` explains the split and the differences from the reference.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.data.realesrgan_params import (KERNEL_SIZE, RESIZE_MODES, DegradationConfig,
                                             canvas_sizes, get_preset, sample_params)

# Blur implementation: "auto" = FFT on CPU, depthwise convolution on accelerators; "fft"/"conv"
# force one (read at trace time).
BLUR_IMPL = "auto"


# ------------------------------------------------------------------ resize matrices / padding
def _cubic(x: jax.Array, a: float = -0.75) -> jax.Array:
  x = jnp.abs(x)
  return jnp.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                   jnp.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resize_matrix(n_in, n_out, mode, rows: int, cols: int) -> jax.Array:
  """[rows, cols] float32 matrix M with M[:n_out, :n_in] @ v = torch F.interpolate(v, n_out,
  mode) for a 1D signal v of length n_in (align_corners=False, no antialias); zero elsewhere.

  Built on the device from scalars (traceable: ``n_in``, ``n_out`` and ``mode``, an index into
  RESIZE_MODES or its name, may be traced), so the host sends three integers per axis instead of
  a dense matrix. Source positions are exact: (2i + 1) n_in - n_out over 2 n_out, split into its
  integer floor and remainder.
  """
  if isinstance(mode, str):
    if mode not in RESIZE_MODES:
      raise ValueError(f"resize mode {mode!r}: expected one of {RESIZE_MODES}")
    mode = RESIZE_MODES.index(mode)
  n_in, n_out, mode = (jnp.asarray(v, jnp.int32) for v in (n_in, n_out, mode))
  i = jnp.arange(rows, dtype=jnp.int32)[:, None]
  j = jnp.arange(cols, dtype=jnp.int32)[None, :]
  live = (i < n_out) & (j < n_in)
  # area: adaptive average pooling windows [lo, hi)
  lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
  area = jnp.where((j >= lo) & (j < hi), 1.0 / jnp.maximum(hi - lo, 1), 0.0)
  num, den = (2 * i + 1) * n_in - n_out, 2 * n_out
  i0, t = num // den, (num % den).astype(jnp.float32) / den.astype(jnp.float32)
  # bilinear: the source position is clamped at 0 (torch), so left of it both taps are sample 0
  b0, bt = jnp.where(num < 0, 0, i0), jnp.where(num < 0, 0.0, t)
  tap = lambda k: jnp.clip(k, 0, n_in - 1) == j  # noqa: E731  taps past an edge use the edge
  bilinear = jnp.where(tap(b0), 1.0 - bt, 0.0) + jnp.where(tap(b0 + 1), bt, 0.0)
  bicubic = sum(jnp.where(tap(i0 + off), _cubic(off - t), 0.0) for off in (-1, 0, 1, 2))
  m = jnp.select([mode == 0, mode == 1], [area, bilinear], bicubic)
  return jnp.where(live, m, 0.0).astype(jnp.float32)


def reflect_index(n_valid, length: int, radius: int) -> jax.Array:
  """Gather indices that reflect-pad (no edge repeat) a valid prefix of length n_valid by radius
  on both sides; [length + 2 radius] int32 (positions past the valid region fold back too).
  ``n_valid`` may be traced."""
  n_valid = jnp.asarray(n_valid, jnp.int32)
  period = jnp.maximum(2 * (n_valid - 1), 1)
  j = jnp.mod(jnp.arange(length + 2 * radius, dtype=jnp.int32) - radius, period)
  return jnp.where(n_valid == 1, 0, jnp.where(j >= n_valid, period - j, j)).astype(jnp.int32)


# ------------------------------------------------------------------------------- device stages
def _blur(x: jax.Array, kernel: jax.Array, idx_h: jax.Array, idx_w: jax.Array) -> jax.Array:
  """Reflect-padded 2D correlation of one HxWx3 canvas with a KxK kernel (same for all channels).

  On CPU through FFTs (20x faster there than XLA's grouped convolution; equal to 1e-6), on
  accelerators as a depthwise convolution.
  """
  p = jnp.take(jnp.take(x, idx_h, axis=0), idx_w, axis=1)
  k = kernel.shape[0]
  impl = BLUR_IMPL if BLUR_IMPL != "auto" else (
      "fft" if jax.default_backend() == "cpu" else "conv")
  if impl == "fft":
    n0, n1 = p.shape[:2]
    kf = jnp.fft.rfft2(kernel[::-1, ::-1].astype(jnp.float32), s=(n0, n1))
    y = jnp.fft.irfft2(jnp.fft.rfft2(p, axes=(0, 1)) * kf[..., None], s=(n0, n1), axes=(0, 1))
    return y[k - 1:, k - 1:].astype(x.dtype)  # the circular wrap only touches the padding
  c = x.shape[-1]
  rhs = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c)).astype(x.dtype)
  y = jax.lax.conv_general_dilated(p[None], rhs, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=c,
                                   precision=jax.lax.Precision.HIGHEST)
  return y[0]


def _resize(x: jax.Array, rh: jax.Array, rw: jax.Array) -> jax.Array:
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,hwc->owc", rh, x, precision=hp)
  return jnp.einsum("pw,owc->opc", rw, y, precision=hp)


def _grey(x: jax.Array) -> jax.Array:
  return x @ jnp.array([0.299, 0.587, 0.114], x.dtype)


def _distinct_levels(q: jax.Array, mask: jax.Array) -> jax.Array:
  """Number of distinct integer levels 0..255 of q over the masked pixels."""
  hist = jnp.zeros((256,), jnp.float32).at[q.astype(jnp.int32).reshape(-1)].add(
      mask.reshape(-1).astype(jnp.float32))
  return jnp.maximum(jnp.sum(hist > 0), 1)


def poisson(key: jax.Array, lam: jax.Array, cutoff: float = 12.0, terms: int = 36) -> jax.Array:
  """Poisson samples with fixed cost: CDF inversion for lam <= cutoff (exact up to the
  P(N >= terms | lam = 12) ~ 3e-8 tail), rounded N(lam, lam) above it (where the two distributions agree
  closely). jax.random.poisson's rejection loop is 10x slower here under vmap."""
  ku, kn = jax.random.split(key)
  u = jax.random.uniform(ku, lam.shape)
  small = jnp.minimum(lam, cutoff)
  prob = jnp.exp(-small)
  cdf = prob
  count = jnp.zeros(lam.shape, jnp.float32)
  for i in range(1, terms):
    count = count + (u > cdf)
    prob = prob * small * np.float32(1.0 / i)
    cdf = cdf + prob
  big = jnp.maximum(jnp.round(lam + jnp.sqrt(lam) * jax.random.normal(kn, lam.shape)), 0.0)
  return jnp.where(lam > cutoff, big, count)


def _noise(x: jax.Array, params: jax.Array, key: jax.Array, valid_hw: jax.Array) -> jax.Array:
  """Gaussian or Poisson noise, colour or grey, on one canvas; then clamp to [0, 1].

  One 3-channel draw serves both colour and grey noise (grey uses channel 0 on all channels;
  grey Poisson is drawn on the luma), so the per-pixel cost does not double.
  """
  gaussian, sigma, grey, pscale = params[0] > 0.5, params[1], params[2] > 0.5, params[3]
  kg, kp = jax.random.split(key)
  h, w, c = x.shape
  pick = lambda z: jnp.where(grey, jnp.broadcast_to(z[..., :1], z.shape), z)
  g = pick(jax.random.normal(kg, (h, w, c)))
  mask = ((jnp.arange(h) < valid_hw[0])[:, None] & (jnp.arange(w) < valid_hw[1])[None, :])
  # Poisson: image quantised to 1/255; v = 2^ceil(log2(#distinct levels)) of the noised image.
  img = jnp.clip(jnp.round(x * 255.0), 0, 255) / 255.0
  gimg = jnp.round(_grey(img) * 255.0)[..., None] / 255.0
  src = jnp.where(grey, jnp.broadcast_to(gimg, x.shape), img)
  m = jnp.where(grey, mask[..., None] & (jnp.arange(c) == 0), mask[..., None])
  levels = _distinct_levels(jnp.round(src * 255.0), m)
  v = 2.0 ** jnp.ceil(jnp.log2(levels.astype(jnp.float32)))
  p = pick(poisson(kp, src * v).astype(x.dtype) / v - src) * pscale
  return jnp.clip(x + jnp.where(gaussian, g * sigma, p), 0.0, 1.0)


def _stage(x, kernel, hw_in, hw_out, mode, noise, seed, canvas):
  """One canvas: blur the valid ``hw_in`` region, resize it to ``hw_out`` on a ``canvas``-sized
  canvas, add noise."""
  r = KERNEL_SIZE // 2
  key = jax.random.wrap_key_data(seed.astype(jnp.uint32), impl="threefry2x32")
  (h, w), (ch, cw) = x.shape[:2], canvas
  y = _blur(x, kernel, reflect_index(hw_in[0], h, r), reflect_index(hw_in[1], w, r))
  y = _resize(y, resize_matrix(hw_in[0], hw_out[0], mode, ch, h),
              resize_matrix(hw_in[1], hw_out[1], mode, cw, w))
  return _noise(y, noise, key, hw_out)


def _final(x, hw_in, mode, kernel, out):
  """One canvas: resize the valid ``hw_in`` region to exactly ``out``, then the sinc filter."""
  r = KERNEL_SIZE // 2
  h, w = x.shape[:2]
  y = _resize(x, resize_matrix(hw_in[0], out[0], mode, out[0], h),
              resize_matrix(hw_in[1], out[1], mode, out[1], w))
  return _blur(y, kernel, reflect_index(out[0], out[0], r), reflect_index(out[1], out[1], r))


@functools.partial(jax.jit, static_argnames="canvas")
def _stage_batch(x, kernel, hw_in, hw_out, mode, noise, seed, *, canvas):
  return jax.vmap(functools.partial(_stage, canvas=canvas))(x, kernel, hw_in, hw_out, mode,
                                                            noise, seed)


@functools.partial(jax.jit, static_argnames="out")
def _final_batch(x, hw_in, mode, kernel, *, out):
  return jax.vmap(functools.partial(_final, out=out))(x, hw_in, mode, kernel)


@jax.jit
def _to_bgr8(x: jax.Array) -> jax.Array:
  """Canvases quantised for the host JPEG, on the device: uint8, channels in OpenCV's order."""
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)[..., ::-1]


@jax.jit
def _from_bgr8(x: jax.Array, q: jax.Array, which: jax.Array) -> jax.Array:
  """The canvases that went through JPEG (``which``) from their uint8 copy, the others as they
  were (float, unquantised)."""
  y = q[..., ::-1].astype(x.dtype) / jnp.asarray(255.0, x.dtype)
  return jnp.where(which[:, None, None, None], y, x)


# ---------------------------------------------------------------------------------- host JPEG
def _jpeg_bgr8(x8: np.ndarray, quality: float) -> np.ndarray:
  """JPEG round trip (OpenCV, quality rounded) of an HxWx3 uint8 image in OpenCV's BGR order."""
  ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(x8),
                         [int(cv2.IMWRITE_JPEG_QUALITY), int(round(float(quality)))])
  if not ok:
    raise RuntimeError("cv2.imencode failed")
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
  """JPEG round trip of a float HxWx3 RGB image in [0, 1] (values rounded to 1/255 first)."""
  x8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
  return _jpeg_bgr8(x8[..., ::-1], quality)[..., ::-1].astype(np.float32) / np.float32(255.0)


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="jpeg")


def _jpeg_rows(q: np.ndarray, valid: np.ndarray, quality: np.ndarray, which: np.ndarray) -> None:
  """In place: JPEG of the valid region of each selected uint8 BGR canvas of ``q`` (thread pool;
  OpenCV drops the GIL). Only uint8 crosses to the host; the float work stays on the device."""
  def one(i):
    h, w = int(valid[i, 0]), int(valid[i, 1])
    q[i, :h, :w] = _jpeg_bgr8(q[i, :h, :w], quality[i])
  list(_POOL.map(one, np.flatnonzero(which)))


# ---------------------------------------------------------------------------------- degrader
class RealESRGANDegrader:
  """Applies sampled degradations to a batch of HR images (see the module docstring).

  Args:
    preset: 'realesrgan' or 'seesr' (or a DegradationConfig).
    scale: the SR factor; outputs are exactly H/scale x W/scale.
    devices: where the jitted stages run (default: ``jax.local_devices()``). A batch of B is
      split over the largest number of them that divides B (every example is independent, so the
      result does not depend on the split); one device when B is prime to all counts.
  """

  def __init__(self, preset: str | DegradationConfig = "realesrgan", scale: int = 4,
               devices=None):
    self.preset = get_preset(preset) if isinstance(preset, str) else preset
    self.scale = int(scale)
    self.devices = tuple(jax.local_devices() if devices is None else devices)
    if not self.devices:
      raise ValueError("RealESRGANDegrader: no devices given")
    self._shardings: dict[int, jax.sharding.NamedSharding] = {}
    # Process-CPU seconds of the host's share so far (for the data benchmark): all of it
    # (parameter packing and transfers, JPEG, conversions), and the JPEG round trips alone. Waits for the devices are
    # not in either.
    self.host_cpu_seconds = 0.0
    self.jpeg_cpu_seconds = 0.0

  @contextlib.contextmanager
  def _host(self, jpeg: bool = False):
    c0 = time.process_time()
    try:
      yield
    finally:
      dt = time.process_time() - c0
      self.host_cpu_seconds += dt
      if jpeg:
        self.jpeg_cpu_seconds += dt

  def _jpeg(self, x: jax.Array, valid, quality, which, sharding) -> jax.Array:
    """JPEG of the selected canvases of the device array ``x``; the result stays on the device."""
    if not which.any():
      return x
    q = np.array(_to_bgr8(x))  # waits for the device; a writable host copy
    with self._host(jpeg=True):
      _jpeg_rows(q, valid, quality, which)
    return _from_bgr8(x, *jax.device_put((q, which), sharding))

  def batch_sharding(self, b: int) -> jax.sharding.NamedSharding:
    """The batch-axis sharding of a batch of ``b`` over the devices (see the class docstring)."""
    n = max(d for d in range(1, len(self.devices) + 1) if b % d == 0)
    if n not in self._shardings:
      mesh = jax.sharding.Mesh(np.array(self.devices[:n]), ("batch",))
      self._shardings[n] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return self._shardings[n]

  def sample(self, rng: np.random.Generator, hr_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    return sample_params(rng, hr_hw, self.preset, self.scale)

  def __call__(self, hr: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """Degrades a batch (host <-> device copies allowed even under a strict transfer guard)."""
    with jax.transfer_guard("allow"):
      return self._degrade(hr, params)

  def _degrade(self, hr: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """Degrades a batch.

    Args:
      hr: float [B, H, W, 3] in [0, 1]; H and W divisible by the scale.
      params: ``sample_params`` outputs stacked along a leading batch axis.

    Returns:
      float32 [B, H/scale, W/scale, 3] in [0, 1], quantised to multiples of 1/255.
    """
    hr = np.asarray(hr, np.float32)
    if hr.ndim != 4 or hr.shape[-1] != 3:
      raise ValueError(f"RealESRGANDegrader expects [B, H, W, 3] images, got {hr.shape}")
    b, h, w, _ = hr.shape
    s = self.scale
    if h % s or w % s:
      raise ValueError(f"HR size {h}x{w} is not divisible by scale={s}")
    (c1h, c1w), (c2h, c2w) = canvas_sizes((h, w), self.preset, s)
    ho, wo = h // s, w // s
    size1 = np.asarray(params["size1"]).reshape(b, 2)
    size2 = np.asarray(params["size2"]).reshape(b, 2)
    modes = np.asarray(params["mode"]).reshape(b, 3)
    jq = np.asarray(params["jpeg"]).reshape(b, 2)
    order = np.asarray(params["order"]).reshape(b)
    seeds = np.asarray(params["seed"], np.uint32).reshape(b, 2)
    sharding = self.batch_sharding(b)
    # Each device runs the stages on its rows of the batch (every input has the batch axis).
    with self._host():
      hw = np.tile(np.array([h, w], np.int32), (b, 1))
      seed1 = np.stack([seeds[:, 0], np.full(b, 1, np.uint32)], 1)
      seed2 = np.stack([seeds[:, 1], np.full(b, 2, np.uint32)], 1)
      stage1 = jax.device_put((hr, params["k1"], hw, size1, modes[:, 0], params["noise1"], seed1),
                              sharding)
      stage2 = jax.device_put((params["k2"], size1, size2, modes[:, 1], params["noise2"], seed2),
                              sharding)
      final = jax.device_put((size2, modes[:, 2], params["sinc"]), sharding)
    x = _stage_batch(*stage1, canvas=(c1h, c1w))
    x = self._jpeg(x, size1, jq[:, 0], np.ones(b, bool), sharding)
    x = _stage_batch(x, *stage2, canvas=(c2h, c2w))  # clamped to [0, 1] by the noise
    # Final: order 1 does JPEG first; then resize to exactly H/s x W/s and the sinc filter.
    x = self._jpeg(x, size2, jq[:, 1], order == 1, sharding)
    q = np.array(_to_bgr8(_final_batch(x, *final, out=(ho, wo))))
    with self._host(jpeg=True):
      _jpeg_rows(q, np.tile([ho, wo], (b, 1)), jq[:, 1], order == 0)
    with self._host():
      return q[..., ::-1].astype(np.float32) / np.float32(255.0)

  def degrade_one(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples parameters from ``rng`` and degrades one float HxWx3 image."""
    p = self.sample(rng, hr.shape[:2])
    return self(hr[None], {k: np.asarray(v)[None] for k, v in p.items()})[0]
