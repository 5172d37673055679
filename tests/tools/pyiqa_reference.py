r"""Writes the pyiqa reference values of tests/test_published_metrics.py (not a test; run by hand).

pyiqa 0.1.16 wrote OSEDiff's published RealSR log. Its full install pulls another torch and hub
downloads, so this loads only its PSNR / SSIM / NIQE archs from the unpacked wheel:

  pip download --no-deps pyiqa==0.1.16 -d /tmp/pyiqa && unzip -q /tmp/pyiqa/*.whl -d /tmp/pyiqa
  python tests/tools/pyiqa_reference.py --pyiqa=/tmp/pyiqa/pyiqa [--realsr=DIR]

NIQE's pristine model (``niqe_modelparameters.mat``, a download in pyiqa) is written from BasicSR's
``niqe_pris_params.npz`` bundled in mmsr_jax/assets (the same MATLAB numbers). With ``--realsr``
it also prints pyiqa's scores of OSEDiff's RealSR outputs against the published log.
"""

import argparse
import importlib
import os
import re
import sys
import tempfile
import types

import numpy as np
import scipy.io
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def load_pyiqa(root: str):
  """(psnr, ssim, niqe) modules of pyiqa as the papers configure them (Y channel)."""
  def package(name, path):
    m = types.ModuleType(name)
    m.__path__ = [path]
    sys.modules[name] = m
  package("pyiqa", root)
  package("pyiqa.archs", os.path.join(root, "archs"))
  package("pyiqa.utils", os.path.join(root, "utils"))
  arch_util = types.ModuleType("pyiqa.archs.arch_util")  # needs torchvision; one name is used
  arch_util.get_url_from_name = lambda name, **_: name
  sys.modules["pyiqa.archs.arch_util"] = arch_util
  pris = np.load(os.path.join(REPO, "mmsr_jax", "assets", "niqe_pris_params.npz"))
  mat = os.path.join(tempfile.mkdtemp(), "niqe_modelparameters.mat")
  scipy.io.savemat(mat, {"mu_prisparam": pris["mu_pris_param"],
                         "cov_prisparam": pris["cov_pris_param"]})
  download = types.ModuleType("pyiqa.utils.download_util")
  download.load_file_from_url = lambda *_, **__: mat
  sys.modules["pyiqa.utils.download_util"] = download
  archs = {n: importlib.import_module(f"pyiqa.archs.{n}_arch") for n in ("psnr", "ssim", "niqe")}
  return (archs["psnr"].PSNR(test_y_channel=True, color_space="ycbcr"),
          archs["ssim"].SSIM(test_y_channel=True, color_space="ycbcr"),
          archs["niqe"].NIQE(test_y_channel=True, color_space="yiq"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pyiqa", required=True, help="the unpacked wheel's pyiqa/ folder")
  ap.add_argument("--realsr", default="", help="folder with test_HR/ and results_osediff/")
  args = ap.parse_args()
  psnr, ssim, niqe = load_pyiqa(args.pyiqa)

  def scores(pred, gt):  # pyiqa's imread2tensor: uint8 RGB -> [1, 3, H, W] in [0, 1]
    t = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
      return float(psnr(t(pred), t(gt))), float(ssim(t(pred), t(gt))), float(niqe(t(pred)))

  sys.path.insert(0, REPO)
  from skimage import data as skdata
  from tests.test_published_metrics import PYIQA_SKIMAGE, box3
  for name in PYIQA_SKIMAGE:
    gt = getattr(skdata, name)()
    print(f'    "{name}": ({", ".join(f"{v:.6f}" for v in scores(box3(gt), gt))}),')
  if args.realsr:
    log = open(os.path.join(args.realsr, "results_osediff", "metrics",
                            "test_METRICS_241023-172854.log")).read()
    rows = re.findall(r"results_osediff/(\S+)\.png \| PSNR: ([\d.]+); SSIM: ([\d.]+);.*?NIQE: "
                      r"([\d.]+)", log)
    diffs = []
    for name, *pub in rows:
      rgb = lambda sub: np.asarray(Image.open(os.path.join(
          args.realsr, sub, name + ".png")).convert("RGB"))
      diffs.append(np.subtract(scores(rgb("results_osediff"), rgb("test_HR")), np.float64(pub)))
    print("pyiqa here minus the published log, largest |difference| (PSNR, SSIM, NIQE):",
          np.abs(diffs).max(0))


if __name__ == "__main__":
  main()
