"""The built-in demo photos (scikit-image's and matplotlib's sample images, read at run time,
never copied here) with their captions; the stereo motorcycle brings a real depth map.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

VAL_NAMES: tuple[str, ...] = ("chelsea", "coffee")
TRAIN_NAMES: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
    "grace_hopper",
)
SPLITS: tuple[str, ...] = ("train", "val")

CAPTIONS: dict[str, str] = {
    "astronaut": "an astronaut in a white spacesuit in front of an american flag",
    "coffee": "a cup of coffee with latte art on a saucer with a spoon on a red table",
    "chelsea": "a close-up of a tabby cat with green eyes and long white whiskers",
    "rocket": "a rocket on a launch pad under a blue sky next to a metal tower",
    "hubble_deep_field": "a deep space photograph full of distant colourful galaxies on black",
    "immunohistochemistry": "a microscope image of stained tissue with brown and blue cells",
    "stereo_motorcycle": "a red and grey motorcycle parked indoors in front of a wall",
    "grace_hopper": "a portrait of a smiling woman in a navy uniform with medals",
}


def _skimage_rgb(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top

  return np.asarray(getattr(skimage.data, name)())


def _grace_hopper() -> np.ndarray:
  import matplotlib.cbook  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    return np.asarray(Image.open(f).convert("RGB"))


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
  """Turns a stereo disparity map into a depth map in [0, 1] (nearer = brighter).

  Non-finite disparities are invalid; they are filled with the smallest valid disparity (i.e.
  treated as far away). Larger disparity means nearer, so the normalised disparity is already
  "nearer = brighter".

  Args:
    disparity: float HxW disparity, possibly holding inf / nan.

  Returns:
    float32 HxW in [0, 1], finite everywhere.
  """
  disp = np.asarray(disparity, np.float64)
  valid = np.isfinite(disp)
  if not valid.any():
    raise ValueError("disparity map has no finite value")
  lo = disp[valid].min()
  hi = disp[valid].max()
  disp = np.where(valid, disp, lo)
  if hi <= lo:
    return np.zeros(disp.shape, np.float32)
  return np.clip((disp - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _stereo_motorcycle() -> tuple[np.ndarray, np.ndarray]:
  import skimage.data  # pylint: disable=g-import-not-at-top

  left, _, disparity = skimage.data.stereo_motorcycle()
  return np.asarray(left), disparity_to_depth(disparity)


_LOADERS: dict[str, Callable[[], Any]] = {
    "grace_hopper": _grace_hopper,
    "stereo_motorcycle": _stereo_motorcycle,
}


def _readonly(x: np.ndarray | None) -> np.ndarray | None:
  if x is not None:
    x.setflags(write=False)
  return x


@functools.lru_cache(maxsize=None)
def _load_record(name: str) -> dict[str, Any]:
  """Loads (once per process) one demo record; its arrays are read-only."""
  loaded = _LOADERS.get(name, functools.partial(_skimage_rgb, name))()
  image, depth = loaded if isinstance(loaded, tuple) else (loaded, None)
  image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
  if image.ndim != 3:
    raise ValueError(f"demo image {name!r} is not HxWx3: shape {image.shape}")
  if depth is not None and depth.shape != image.shape[:2]:
    raise ValueError(f"demo depth {name!r} shape {depth.shape} != image {image.shape[:2]}")
  return {
      "name": name,
      "image": _readonly(image),
      "depth": _readonly(depth),
      "seg": None,
      "caption": CAPTIONS[name],
  }


def split_names(split: str) -> tuple[str, ...]:
  """Names of the demo images in ``split`` ('train' or 'val')."""
  if split == "train":
    return TRAIN_NAMES
  if split == "val":
    return VAL_NAMES
  raise ValueError(f"demo split={split!r}: expected one of {SPLITS}")


def load_demo_records(split: str) -> list[dict[str, Any]]:
  """Returns the demo records of a split.

  Args:
    split: 'train' (6 images) or 'val' (the held-out 'chelsea' and 'coffee').

  Returns:
    A list of dicts ``{'name': str, 'image': uint8 HxWx3, 'depth': float32 HxW in [0, 1] or None,
    'seg': None, 'caption': str}``. Arrays are cached in-process and read-only; copy before
    modifying.
  """
  return [dict(_load_record(n)) for n in split_names(split)]
