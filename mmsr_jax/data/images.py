"""Reading and writing images of every common mode: :class:`Picture` is float RGB in [0, 1] for the
model plus what is needed to write the result back in the input's kind (alpha, grey, 16 bits).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from mmsr_jax.schema.choices import (  # noqa: F401 (this module's API: the readers' limits)
    DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_PIXELS, pillow_limit)

# Read as one picture; of an animated GIF / WebP / APNG the first frame (Picture.frames says so).
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_ORIENTATION_TAG = 0x0112
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclasses.dataclass
class Picture:
  """An image as the model needs it, plus how to write the result back.

  Attributes:
    rgb: float32 ``[H, W, 3]`` in [0, 1] (grey inputs replicated over the channels).
    alpha: float32 ``[H, W]`` in [0, 1], or None.
    grey: the input had one colour channel (the output is written as grey too).
    bits: 8 or 16, the input's bit depth per channel (the output's too).
    mode: a short description of the source (PIL mode and depth), for the sidecar.
    frames: frames in the file (an animation); only the first is in ``rgb``.
  """

  rgb: np.ndarray
  alpha: np.ndarray | None = None
  grey: bool = False
  bits: int = 8
  mode: str = "RGB"
  frames: int = 1

  def frames_note(self, name: str) -> str | None:
    """A note for the user when frames were left out (None when the file has one)."""
    if self.frames <= 1:
      return None
    return (f"note: {name} is an animation of {self.frames} frames; only the first frame is "
            "used")

  @property
  def size(self) -> tuple[int, int]:
    """``(height, width)``."""
    return self.rgb.shape[0], self.rgb.shape[1]


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
  """Applies an EXIF orientation (1..8) to ``[H, W, ...]``, as ``ImageOps.exif_transpose``."""
  ops = {
      1: lambda a: a,
      2: lambda a: a[:, ::-1],
      3: lambda a: a[::-1, ::-1],
      4: lambda a: a[::-1],
      5: lambda a: np.swapaxes(a, 0, 1),
      6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
      7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
      8: lambda a: np.swapaxes(a, 0, 1)[::-1],
  }
  return np.ascontiguousarray(ops.get(int(orientation), ops[1])(arr))


def _is_16bit_colour(im: Image.Image) -> bool:
  """A PNG/TIFF stored with 16 bits per colour channel (Pillow would load it as 8-bit)."""
  if im.mode not in ("RGB", "RGBA", "LA") or not im.tile:
    return False
  args = im.tile[0].args if hasattr(im.tile[0], "args") else im.tile[0][3]
  rawmode = args[0] if isinstance(args, tuple) else args
  return isinstance(rawmode, str) and ";16" in rawmode


def _read_16bit_colour(path: str, im: Image.Image, oriented: bool = True) -> Picture:
  import cv2
  arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if arr is None or arr.dtype != np.uint16:
    raise ValueError("OpenCV could not read it as 16-bit")
  if oriented:
    arr = orient(arr, im.getexif().get(_ORIENTATION_TAG, 1))
  if arr.ndim == 2:
    arr = arr[..., None]
  grey = im.mode == "LA"
  if arr.shape[2] in (3, 4):  # OpenCV order is BGR(A)
    arr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=-1)
  x = arr.astype(np.float32) / 65535.0
  alpha = x[..., 3] if x.shape[2] == 4 else (x[..., 1] if x.shape[2] == 2 else None)
  rgb = np.repeat(x[..., :1], 3, axis=-1) if x.shape[2] <= 2 else x[..., :3]
  return Picture(np.ascontiguousarray(rgb), alpha, grey=grey, bits=16, mode=f"{im.mode};16")


def _from_pil(im: Image.Image) -> Picture:
  """A loaded, already oriented PIL image -> Picture."""
  mode = im.mode
  if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / wide greyscale
    arr = np.asarray(im).astype(np.float32)
    if mode == "F":
      grey, bits = np.clip(arr, 0.0, 1.0), 8
    else:
      grey, bits = np.clip(arr, 0, 65535) / 65535.0, 16
    return Picture(np.repeat(grey[..., None], 3, -1).astype(np.float32), None, True, bits, mode)
  has_alpha = mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in im.info
  grey = mode in _GREY_MODES or (mode in ("P", "PA") and _palette_is_grey(im))
  target = ("LA" if has_alpha else "L") if grey else ("RGBA" if has_alpha else "RGB")
  arr = np.asarray(im.convert(target)).astype(np.float32) / 255.0
  if grey:
    arr = arr[..., None] if arr.ndim == 2 else arr
    rgb = np.repeat(arr[..., :1], 3, axis=-1)
  else:
    rgb = arr[..., :3]
  alpha = arr[..., -1] if has_alpha else None
  return Picture(np.ascontiguousarray(rgb), alpha, grey=grey, bits=8, mode=mode)


def _palette_is_grey(im: Image.Image) -> bool:
  pal = im.getpalette() or []
  rgb = np.asarray(pal[: 3 * 256], np.int32).reshape(-1, 3)
  used = np.unique(np.asarray(im)) if rgb.size else []
  rgb = rgb[[u for u in used if u < len(rgb)]]
  return bool(rgb.size) and bool((rgb == rgb[:, :1]).all())


class BadImage(ValueError):
  """An image that cannot be used (unreadable, truncated, too small or too large)."""


def check_limit(max_pixels: int, field: str) -> int:
  """``max_pixels`` as an int, or a ValueError naming ``field`` when it is out of range."""
  if isinstance(max_pixels, bool) or int(max_pixels) != max_pixels or not (
      1 <= max_pixels <= pillow_limit()):
    raise ValueError(f"{field}={max_pixels}: expected an integer in [1, {pillow_limit()}] "
                     "(pixels; the upper end is where Pillow refuses files outright)")
  return int(max_pixels)


def _open_checked(path: str) -> Image.Image:
  """Image.open without Pillow's decompression-bomb warning: our own limit applies (its
  DecompressionBombError, over :func:`pillow_limit`, still comes through)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return Image.open(path)


def header_size(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                field: str = "--max_pixels") -> tuple[int, int]:
  """``(height, width)`` from the file's header, without decoding it.

  Raises BadImage (a ValueError) naming the file when it is not an image, or when it holds more
  than ``max_pixels`` pixels (``field`` names the setting that raises the limit); Pillow's own
  decompression-bomb refusal is reported the same way.
  """
  try:
    with _open_checked(path) as im:
      w, h = im.size
  except Image.DecompressionBombError as e:
    raise BadImage(f"{path}: more than {pillow_limit():,} pixels by its header (Pillow refuses "
                   f"it as a possible decompression bomb; the limit is {field}="
                   f"{max_pixels}); not decoded") from e
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
  if w * h > max_pixels:
    raise BadImage(f"{path}: {w}x{h} = {w * h:,} pixels by its header, more than {field}="
                   f"{max_pixels}; not decoded (raise {field} to read it)")
  return h, w


def read(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "--max_pixels", *,
         oriented: bool = True) -> Picture:
  """Reads an image file (any mode, EXIF orientation applied unless ``oriented=False``); one
  clear error otherwise.

  A file whose header claims more than ``max_pixels`` pixels is refused before decoding
  (ValueError naming the file and ``field``, the setting that raises the limit). Bit depth and
  grey / colour come from the file's mode, never from its values.
  """
  check_file(path)
  header_size(path, max_pixels, field)
  try:
    with _open_checked(path) as im:
      frames = int(getattr(im, "n_frames", 1) or 1)
      if _is_16bit_colour(im):
        pic = _read_16bit_colour(path, im, oriented)
      else:
        im.load()
        pic = _from_pil(ImageOps.exif_transpose(im) if oriented else im)
      pic.frames = frames
  except Exception as e:  # noqa: BLE001 - PIL / OpenCV raise many types for bad files
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
  if min(pic.size) == 0:
    raise ValueError(f"{path}: the image has zero size {pic.size}")
  return pic


def missing_file_reason(path: str) -> str | None:
  """Why ``path`` is not a readable file (a symlink loop, a dangling link, a folder, nothing
  there), or None when it is a file."""
  try:
    st = os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return "a loop of symbolic links (it never reaches a file)"
    if os.path.islink(path):
      return f"a symbolic link to {os.readlink(path)}, which does not exist"
    if e.errno == errno.ENOENT:
      return "no such file"
    return e.strerror or str(e)
  if os.path.isdir(path):
    return "a folder, not a file"
  return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def check_file(path: str, name: str | None = None) -> None:
  """FileNotFoundError naming ``name`` (default ``path``) and the reason when ``path`` is not a
  readable file."""
  reason = missing_file_reason(path)
  if reason is not None:
    raise FileNotFoundError(f"{path if name is None else name}: {reason}")


def from_array(image) -> Picture:
  """An in-memory image -> Picture.

  Accepts a PIL image, or an array ``[H, W]``, ``[H, W, 1]`` (grey), ``[H, W, 2]`` (grey +
  alpha), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA) of dtype uint8, uint16, or float in [0, 1].
  """
  if isinstance(image, Picture):
    return image
  if isinstance(image, Image.Image):
    image.load()
    return _from_pil(image)
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
    raise ValueError(f"image: expected HxW, HxWx1, HxWx2, HxWx3 or HxWx4, got shape {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"image: zero size {arr.shape[:2]}")
  if arr.dtype == np.uint8:
    x, bits = arr.astype(np.float32) / 255.0, 8
  elif arr.dtype == np.uint16:
    x, bits = arr.astype(np.float32) / 65535.0, 16
  elif np.issubdtype(arr.dtype, np.floating):
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
      raise ValueError("image: float images must be finite and in [0, 1]")
    x, bits = arr.astype(np.float32), 8
  else:
    raise ValueError(f"image: expected uint8, uint16 or float in [0, 1], got {arr.dtype}")
  c = x.shape[2]
  grey = c <= 2
  rgb = np.repeat(x[..., :1], 3, axis=-1) if grey else x[..., :3]
  alpha = x[..., -1] if c in (2, 4) else None
  return Picture(np.ascontiguousarray(rgb), alpha, grey, bits, f"array{c}:{arr.dtype}")


def upscale_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of an alpha channel in [0, 1] (alpha never goes through the model)."""
  im = Image.fromarray(np.asarray(alpha, np.float32), mode="F")
  return np.clip(np.asarray(im.resize((width, height), Image.Resampling.BICUBIC)), 0.0, 1.0)


def luma(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma (Pillow's ``L`` conversion) of float RGB."""
  return rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _quantise(x: np.ndarray, bits: int) -> np.ndarray:
  top = 65535.0 if bits == 16 else 255.0
  return np.round(np.clip(x, 0.0, 1.0) * top).astype(np.uint16 if bits == 16 else np.uint8)


def to_array(pic: Picture) -> np.ndarray:
  """Picture -> array in the input's layout: ``[H, W]`` / ``[H, W, 2]`` grey(+alpha) or
  ``[H, W, 3]`` / ``[H, W, 4]`` colour(+alpha), uint8 or uint16."""
  chans = [luma(pic.rgb)[..., None]] if pic.grey else [pic.rgb]
  if pic.alpha is not None:
    chans.append(pic.alpha[..., None])
  out = _quantise(np.concatenate(chans, axis=-1), pic.bits)
  return out[..., 0] if out.shape[-1] == 1 else out


def to_pil(pic: Picture) -> Image.Image:
  """Picture -> an 8-bit PIL image of the matching mode (for display)."""
  return Image.fromarray(to_array(dataclasses.replace(pic, bits=8)))


def write_png(path: str, pic: Picture) -> None:
  """Writes a PNG in the picture's kind (grey / colour, alpha, 8 / 16 bit)."""
  arr = to_array(pic)
  if pic.bits == 16 and arr.ndim == 2:
    Image.fromarray(arr).save(path, format="PNG")  # mode I;16
  elif pic.bits == 16:
    import cv2
    if arr.shape[2] == 2:  # PNG grey+alpha at 16 bits: written as RGBA (grey replicated)
      arr = np.concatenate([np.repeat(arr[..., :1], 3, -1), arr[..., 1:]], axis=-1)
    bgr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=-1)
    if not cv2.imwrite(path, np.ascontiguousarray(bgr)):
      raise OSError(f"{path}: OpenCV could not write the 16-bit PNG")
  else:
    Image.fromarray(arr).save(path, format="PNG")


def read_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               field: str = "config.data.max_image_pixels") -> np.ndarray:
  """Reads an image file as uint8 HxWx3 RGB (the training sources' reader).

  BadImage when it cannot be fully decoded, or when its header claims more than ``max_pixels``
  pixels (checked before decoding; ``field`` names the setting).
  """
  try:
    header_size(path, max_pixels, field)
  except BadImage as e:
    raise BadImage(str(e).removeprefix(f"{path}: ")) from e
  try:
    with _open_checked(path) as im:
      im.load()  # raises on truncated data (PIL never pads silently here)
      rgb = im.convert("RGB")
    return np.asarray(rgb, np.uint8)
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    raise BadImage(f"cannot decode image: {e}") from e
