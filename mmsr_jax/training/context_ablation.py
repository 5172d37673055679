"""The context experiment's evaluation (``python -m mmsr_jax.context_study``): trained runs that
differ in where their maps come from (``config.data.maps_from``: 'hr', the oracle, or 'lr') and
in their seed, each scored on the held-out crops of its config under every condition setting
(everything, each group nulled, no context), with two samplers; then mean and spread over seeds,
a Markdown table, a JSON file and the figure ``bicubic | no context | LR maps | oracle maps |
HR``.

The held-out examples are the 2x2 tiles of side ``config.data.hr_size`` (the training crop) of
every held-out photo's centre (:func:`heldout_tiles`), each degraded and given its maps as a
training crop is; the outputs are stitched back per photo, so the scored images are twice the
training crop (NIQE needs 96-pixel blocks). Per run and setting: the x0 error at t = T - 1
(``sr_report.val_losses``: what the LR and the conditions alone say about the target) on every
tile; on an evenly spaced subset of the photos, samples (``sr_report.super_resolve``, the same
sampler seed for every run) scored by PSNR / SSIM on Y, edge F1 of the output's Canny edges
against the HR's, and a pooled NIQE of the set.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsr_jax.data import sources
from mmsr_jax.data.sr_examples import build_example
from mmsr_jax.data.modalities import canny
from mmsr_jax.data.simple_degradation import bicubic_upsample
from mmsr_jax.diffusion import sampler
from mmsr_jax.evaluation import metrics, niqe
from mmsr_jax.formats.records import MODALITIES
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.models.mmsr import MMSR
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.training import sr_report

# The held-out condition settings compared (``none``, every modality null with the caption kept,
# is left out: on captionless held-out photos it is ``no_context``).
SETTINGS = ("all", "no_text", "no_depth", "no_seg", "no_edge", "no_context")
METRICS = ("x0_mse_tmax", "psnr", "ssim", "edge_f1", "niqe_pooled")
EDGE_TOLERANCE = 1  # pixels: a line drawn one pixel off is not a lost edge


class LoadedRun:
  """A trained run's EMA weights and frozen encoders, with what ``sr_report`` reads from a
  trainer (``system``, ``eval_frozen``)."""

  def __init__(self, workdir: str, devices=None, step: int | None = None):
    sr = SuperResolver.from_workdir(workdir, step=step, devices=devices or jax.devices()[:1],
                                    text_device="accelerator")
    self.workdir, self.step, self.config = workdir, sr.step, sr.config
    self.params, self.system, self._frozen = sr.params, sr.system, sr.frozen

  def eval_frozen(self) -> dict:
    return self._frozen


TILE_SEED = 97531
GRID = 2  # tiles per side of each held-out photo's centre region


def heldout_tiles(config, tokenizer) -> list[list[dict[str, Any]]]:
  """Per photo of ``config.data.eval_path``, the ``GRID x GRID`` tiles (row-major) of side
  ``config.data.hr_size`` of its centre region, each degraded with a seed of the photo's name and
  the tile (independent of ``config.seed``) and given maps and caption as in training."""
  side, path = int(config.data.hr_size), config.data.get("eval_path", "")
  if not path:
    raise ValueError("config.data.eval_path is empty: the study needs a folder of held-out photos")
  folder = sources.FolderSource(path, caption_from_name=config.data.get("caption_from_name", ""))
  photos = []
  for i, file in enumerate(folder.files):
    rec = folder[i]
    name = os.path.relpath(file, path)
    h, w = rec["image"].shape[:2]
    if min(h, w) < GRID * side:
      raise ValueError(f"held-out photo {file} ({w}x{h}) is smaller than {GRID * side} pixels")
    top0, left0 = (h - GRID * side) // 2, (w - GRID * side) // 2
    tiles = []
    for t in range(GRID * GRID):
      top, left = top0 + (t // GRID) * side, left0 + (t % GRID) * side
      image = np.ascontiguousarray(rec["image"][top:top + side, left:left + side])
      rng = np.random.default_rng([TILE_SEED, zlib.crc32(name.encode("utf-8")), t])
      ex = build_example(image, {}, rec["caption"], rng, scale=int(config.data.scale),
                         map_size=int(config.data.map_size),
                         text_len=int(config.text.max_length), tokenizer=tokenizer,
                         degradation=config.data.degradation,
                         maps_from=config.data.get("maps_from", "record"))
      tiles.append(dict(ex, name=f"{name}#{t}", caption=rec["caption"]))
    photos.append(tiles)
  return photos


def stitch(tiles: np.ndarray) -> np.ndarray:
  """``[N * GRID * GRID, s, s, 3]`` tiles (row-major per photo) -> ``[N, GRID s, GRID s, 3]``."""
  n, s = len(tiles) // (GRID * GRID), tiles.shape[1]
  x = tiles.reshape(n, GRID, GRID, s, s, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, GRID * s, GRID * s, 3)


def subset(n_total: int, n: int) -> list[int]:
  """``n`` evenly spaced indices of ``n_total`` (all of them when ``n`` >= ``n_total``)."""
  if n >= n_total:
    return list(range(n_total))
  return sorted({int(i * n_total / n) for i in range(n)})


def output_scores(srs: np.ndarray, hrs: np.ndarray) -> dict[str, float]:
  """PSNR / SSIM (Y, means), pooled edge F1 of Canny edges within :data:`EDGE_TOLERANCE`
  pixels, and the pooled NIQE of uint8 outputs ``[N, H, W, 3]`` against their HR crops."""
  psnr, ssim = metrics.psnr_ssim_batch(srs, hrs)
  f1 = metrics.edge_f1(np.stack([canny(x) for x in srs]), np.stack([canny(x) for x in hrs]),
                       tolerance=EDGE_TOLERANCE)
  blocks = len(srs) * (srs.shape[1] // niqe.BLOCK) * (srs.shape[2] // niqe.BLOCK)
  return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
          "edge_f1": float(f1["f1"]), "edge_precision": float(f1["precision"]),
          "edge_recall": float(f1["recall"]),
          # NaN when the set holds fewer than the two NIQE blocks a Gaussian fit needs.
          "niqe_pooled": niqe.pooled_niqe(srs) if blocks >= 2 else float("nan")}


def samplers(config, paper_steps: int) -> dict[str, dict[str, Any]]:
  """The two samplers: the paper's (pure noise, ``paper_steps`` DDIM steps) and the run's
  fidelity-first one (``config.sampling.strength`` on its ``steps`` grid)."""
  return {"paper": {"strength": 1.0, "steps": int(paper_steps)},
          "fidelity": {"strength": float(config.sampling.strength),
                       "steps": int(config.sampling.steps)}}


def evaluate_run(run: LoadedRun, *, images: int, paper_steps: int, noise_draws: int = 2,
                 sample_seed: int = 0, log=print) -> dict[str, Any]:
  """Every metric of one run under every setting; the samples of the subset are returned under
  ``'samples'`` (not written to the JSON)."""
  config = run.config
  config.unlock()
  config.eval.val_batches = int(noise_draws)
  photos = heldout_tiles(config, run.system.tokenizer)
  examples = [ex for tiles in photos for ex in tiles]
  t_max = run.system.schedule.num_timesteps - 1
  t0 = time.time()
  x0 = sr_report.val_losses(config, run, run.params, examples, settings=SETTINGS, t=t_max,
                            x0_error=True)
  log(f"{run.workdir}: x0 error at t={t_max} on {len(examples)} tiles ({time.time() - t0:.0f} s)")
  picked = [ex for i in subset(len(photos), images) for ex in photos[i]]
  hrs = stitch(np.stack([sr_report.to_uint8(ex["hr"]) for ex in picked]))
  bicubic = stitch(np.stack([bicubic_upsample(sr_report.to_uint8(ex["lr"]), ex["hr"].shape[:2])
                             for ex in picked]))
  out = {"workdir": run.workdir, "step": run.step,
         "maps_from": config.data.get("maps_from", "record"), "seed": int(config.seed),
         "heldout_tiles": len(examples), "heldout_photos": len(photos),
         "sampled_photos": [ex["name"].split("#")[0] for ex in picked[::GRID * GRID]],
         "x0_mse_tmax": x0, "bicubic": output_scores(bicubic, hrs), "samplers": {},
         "samples": {}, "captions_present": int(sum(bool(ex["caption"]) for ex in examples))}
  for name, s in samplers(config, paper_steps).items():
    t0 = time.time()
    srs = sr_report.super_resolve(config, run, run.params, picked, steps=s["steps"], scale=0.0,
                                  guidance="none", strength=s["strength"], seed=sample_seed,
                                  settings=SETTINGS)
    srs = {k: stitch(v) for k, v in srs.items()}
    out["samplers"][name] = {"strength": s["strength"], "steps": s["steps"],
                             "scores": {k: output_scores(v, hrs) for k, v in srs.items()}}
    out["samples"][name] = srs
    log(f"{run.workdir}: sampler {name} ({s['steps']} steps, strength {s['strength']:g}), "
        f"{len(SETTINGS)} settings x {len(picked)} tiles ({time.time() - t0:.0f} s)")
  out["hr"], out["bicubic_images"] = hrs, bicubic
  return out


def _mean_std(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v)), "values": [float(x) for x in v]}


def aggregate(results: list[dict]) -> dict[str, Any]:
  """Mean and sample std over seeds: ``{maps_from: {sampler: {setting: {metric: stats}}}}``,
  the x0 error under sampler ``'x0'`` (it does not sample)."""
  out: dict[str, Any] = {}
  for src in sorted({r["maps_from"] for r in results}):
    runs = [r for r in results if r["maps_from"] == src]
    table: dict[str, Any] = {"x0": {s: {"x0_mse_tmax": _mean_std([r["x0_mse_tmax"][s]
                                                                  for r in runs])}
                                    for s in SETTINGS}}
    for name in runs[0]["samplers"]:
      table[name] = {s: {m: _mean_std([r["samplers"][name]["scores"][s][m] for r in runs])
                         for m in runs[0]["samplers"][name]["scores"][s]} for s in SETTINGS}
    table["bicubic"] = {m: _mean_std([r["bicubic"][m] for r in runs])
                        for m in runs[0]["bicubic"]}
    table["seeds"] = sorted(r["seed"] for r in runs)
    table["steps"] = sorted({r["step"] for r in runs})
    out[src] = table
  return out


def _fmt(stats: dict, digits: int) -> str:
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def gaps(agg: dict[str, Any]) -> dict[str, Any]:
  """All-context against no-context per map source: the difference of the seed means (signed so
  that positive = context helps), the larger of the two seed spreads and their ratio (the goal
  is a ratio above 3)."""
  out: dict[str, Any] = {}
  for src, t in agg.items():
    rows = {"x0_mse_tmax": (t["x0"], -1.0)}
    for name in ("paper", "fidelity"):
      if name in t:
        rows[f"edge_f1_{name}"] = (t[name], 1.0)
    out[src] = {}
    for key, (table, sign) in rows.items():
      metric = "x0_mse_tmax" if key == "x0_mse_tmax" else "edge_f1"
      a, b = table["all"][metric], table["no_context"][metric]
      diff = sign * (a["mean"] - b["mean"])
      spread = max(a["std"], b["std"])
      out[src][key] = {"gain": diff, "spread": spread,
                       "ratio": diff / spread if spread > 0 else None}
  return out


def markdown(agg: dict[str, Any]) -> str:
  """The table: one row per (map source, setting); x0 error and, per sampler, PSNR / SSIM /
  edge F1 / pooled NIQE, each mean ± std over seeds."""
  names = [n for n in ("paper", "fidelity") if any(n in t for t in agg.values())]
  head = ["maps", "setting", "x0 error T-1"]
  for n in names:
    head += [f"PSNR {n}", f"SSIM {n}", f"edge F1 {n}", f"NIQE* {n}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for src, t in agg.items():
    for s in SETTINGS:
      row = [src, s, _fmt(t["x0"][s]["x0_mse_tmax"], 4)]
      for n in names:
        sc = t[n][s]
        row += [_fmt(sc["psnr"], 2), _fmt(sc["ssim"], 3), _fmt(sc["edge_f1"], 3),
                _fmt(sc["niqe_pooled"], 2)]
      lines.append("| " + " | ".join(row) + " |")
    b = t["bicubic"]
    row = [src, "bicubic", ""]
    for _ in names:
      row += [_fmt(b["psnr"], 2), _fmt(b["ssim"], 3), _fmt(b["edge_f1"], 3),
              _fmt(b["niqe_pooled"], 2)]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def figure(results: list[dict], path: str, *, sampler: str = "paper", rows: int = 3) -> None:
  """``bicubic | no context | LR maps | oracle maps | HR`` of ``rows`` held-out photos, from the
  lowest-seed run of each map source (no context: the oracle run with every condition null),
  written as a 256-colour PNG to keep it small."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  first = {}
  for r in sorted(results, key=lambda r: r["seed"]):
    first.setdefault(r["maps_from"], r)
  if not {"hr", "lr"} <= set(first):
    raise ValueError("the figure needs runs with maps from 'hr' and from 'lr'")
  hr_run, lr_run = first["hr"], first["lr"]
  picks = subset(len(hr_run["hr"]), rows)
  gap = 4
  cols = [hr_run["bicubic_images"], hr_run["samples"][sampler]["no_context"],
          lr_run["samples"][sampler]["all"], hr_run["samples"][sampler]["all"], hr_run["hr"]]
  blocks = []
  for i in picks:
    cells = []
    for c in cols:
      cells += [c[i], np.full((c[i].shape[0], gap, 3), 255, np.uint8)]
    blocks += [np.concatenate(cells[:-1], axis=1),
               np.full((gap, sum(x.shape[1] for x in cells[:-1]), 3), 255, np.uint8)]
  img = np.concatenate(blocks[:-1], axis=0)
  Image.fromarray(img).quantize(colors=256).save(path, optimize=True)


ARRAYS = ("hr", "bicubic_images")


def _cache_path(output: str, workdir: str, images: int, paper_steps: int) -> str:
  """Where one run's evaluation is kept (``.json`` + ``.npz``), so that runs finished early
  are evaluated while others train and a later call over all runs reads them back."""
  name = os.path.basename(os.path.normpath(workdir))
  return os.path.join(output, "runs", f"{name}-images{images}-steps{paper_steps}")


def _save_cached(path: str, result: dict) -> None:
  arrays = {k: result[k] for k in ARRAYS}
  arrays.update({f"samples/{s}/{k}": v for s, d in result["samples"].items()
                 for k, v in d.items()})
  np.savez_compressed(path + ".npz", **arrays)
  with open(path + ".json", "w") as f:
    json.dump({k: v for k, v in result.items() if k not in ARRAYS + ("samples",)}, f)


def _load_cached(path: str, workdir: str) -> dict | None:
  """The kept evaluation of ``workdir`` when it is of the run's newest checkpoint, else None."""
  if not (os.path.isfile(path + ".json") and os.path.isfile(path + ".npz")):
    return None
  with open(path + ".json") as f:
    result = json.load(f)
  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  newest = ckpt.latest_step()
  ckpt.close()
  if result.get("step") != newest or os.path.realpath(result["workdir"]) != os.path.realpath(
      workdir):
    return None
  with np.load(path + ".npz") as z:
    for k in ARRAYS:
      result[k] = z[k]
    result["samples"] = {}
    for key in z.files:
      if key.startswith("samples/"):
        _, sampler, setting = key.split("/")
        result["samples"].setdefault(sampler, {})[setting] = z[key]
  return result


def run_study(workdirs: list[str], output: str, *, images: int = 24, paper_steps: int = 20,
              figure_path: str | None = None, overwrite: bool = False, log=print) -> dict:
  """Evaluates every run, writes ``output/context_study.json`` and ``output/table.md`` (and the
  figure), never over existing files unless ``overwrite``. A run's evaluation is kept under
  ``output/runs/`` and read back by a later call while it is of the run's newest checkpoint (at
  the same ``images`` and ``paper_steps``; the evaluation is deterministic). Returns the report."""
  if not workdirs:
    raise ValueError("no runs given")
  paths = [os.path.join(output, "context_study.json"), os.path.join(output, "table.md")]
  paths += [figure_path] if figure_path else []
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise ValueError(f"{existing[0]} exists; pass --overwrite to replace it")
  seen = {}
  for w in workdirs:
    if not os.path.isfile(os.path.join(w, "config.json")):
      raise ValueError(f"{w}: not a training run (no config.json)")
    c = ckpt_lib.load_config(w)
    key = (c.data.get("maps_from", "record"), int(c.seed))
    if key in seen:
      raise ValueError(f"{w} and {seen[key]} both have maps_from={key[0]!r}, seed {key[1]}: "
                       "one run per map source and seed")
    seen[key] = w
  os.makedirs(os.path.join(output, "runs"), exist_ok=True)
  results = []
  for w in workdirs:
    cached = _cache_path(output, w, images, paper_steps)
    result = _load_cached(cached, w)
    if result is None:
      result = evaluate_run(LoadedRun(w), images=images, paper_steps=paper_steps, log=log)
      _save_cached(cached, result)
    else:
      log(f"{w}: evaluation of step {result['step']} read from {cached}.*")
    results.append(result)
  agg = aggregate(results)
  plain = [{k: v for k, v in r.items() if k not in ARRAYS + ("samples",)} for r in results]
  report = {"runs": plain, "aggregate": agg, "gaps": gaps(agg),
            "settings": list(SETTINGS), "edge_tolerance": EDGE_TOLERANCE,
            "niqe": "pooled over the sampled crops' 96x96 blocks (niqe.pooled_niqe)",
            "images": images, "paper_steps": paper_steps}
  table = markdown(agg)
  with open(paths[0], "w") as f:
    json.dump(report, f, indent=2)
  with open(paths[1], "w") as f:
    f.write(table)
  if figure_path:
    figure(results, figure_path)
  log(table)
  return report


def x0_by_step(workdirs: list[str], output: str, *, overwrite: bool = False,
               noise_draws: int = 2, log=print) -> dict[str, Any]:
  """The x0 error at t = T - 1 with all context and with none, at every checkpoint each run
  keeps: whether the gap (no context - all) grows with training. Writes
  ``output/x0_by_step.json`` and ``output/x0_by_step.png`` (gap against step, one line per run,
  coloured by map source); each checkpoint's row is kept under ``output/x0_rows/`` and read back
  by a later call."""
  json_path = os.path.join(output, "x0_by_step.json")
  png_path = os.path.join(output, "x0_by_step.png")
  for p in (json_path, png_path):
    if os.path.exists(p) and not overwrite:
      raise ValueError(f"{p} exists; pass --overwrite to replace it")
  os.makedirs(output, exist_ok=True)
  rows = []
  for w in workdirs:
    ckpt = ckpt_lib.Checkpointer(w, create=False)
    steps = ckpt.all_steps()
    ckpt.close()
    photos = None
    for step in steps:
      kept = os.path.join(output, "x0_rows", f"{os.path.basename(os.path.normpath(w))}-{step}.json")
      if os.path.isfile(kept):  # computed by an earlier call (checkpoints do not change)
        with open(kept) as f:
          rows.append(json.load(f))
        continue
      run = LoadedRun(w, step=step)
      run.config.unlock()
      run.config.eval.val_batches = int(noise_draws)
      if photos is None:
        photos = [ex for tiles in heldout_tiles(run.config, run.system.tokenizer) for ex in tiles]
      x0 = sr_report.val_losses(run.config, run, run.params, photos,
                                settings=("all", "no_context"),
                                t=run.system.schedule.num_timesteps - 1, x0_error=True)
      rows.append({"workdir": w, "maps_from": run.config.data.get("maps_from", "record"),
                   "seed": int(run.config.seed), "step": int(step), **x0,
                   "gap": x0["no_context"] - x0["all"]})
      os.makedirs(os.path.dirname(kept), exist_ok=True)
      with open(kept, "w") as f:
        json.dump(rows[-1], f)
      log(f"{w} step {step}: x0 error all {x0['all']:.5f}, no context {x0['no_context']:.5f}")
  with open(json_path, "w") as f:
    json.dump(rows, f, indent=2)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  colours = {"hr": "tab:red", "lr": "tab:blue"}
  for w in dict.fromkeys(r["workdir"] for r in rows):
    pts = sorted((r["step"], r["gap"], r["maps_from"]) for r in rows if r["workdir"] == w)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
            color=colours.get(pts[0][2], "grey"), label=f"maps from {pts[0][2]}")
  handles, labels = ax.get_legend_handles_labels()
  keep = dict(zip(labels, handles))
  ax.legend(keep.values(), keep.keys())
  ax.axhline(0.0, color="black", lw=0.5)
  ax.set_xlabel("training step")
  ax.set_ylabel("x0 error at T-1: no context - all")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=90)
  plt.close(fig)
  return {"rows": rows}


def context_sensitivity(workdirs: list[str], output: str, *, overwrite: bool = False,
                        photos: int = 16, log=print) -> list[dict[str, Any]]:
  """How much each run's newest checkpoint depends on its context, on the tiles of ``photos``
  evenly spaced held-out photos: the relative change (``|a - b| / |b|``) of the context array and
  of the denoiser's output at t = T - 1, T / 2 and T / 10 (one noise draw) when every condition
  is nulled, and when each tile gets another tile's maps; beside it the x0 error at T - 1 with all
  context and none, and the mean square of the target, the x0 error of predicting 0. Writes
  ``output/sensitivity.json``."""
  path = os.path.join(output, "sensitivity.json")
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"{path} exists; pass --overwrite to replace it")
  os.makedirs(output, exist_ok=True)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
  rows = []
  for w in workdirs:
    run = LoadedRun(w)
    cfg, s = run.config, run.system
    held = heldout_tiles(cfg, s.tokenizer)
    examples = [ex for i in subset(len(held), photos) for ex in held[i]]
    inputs = {name: sampler.make_inputs(examples, s.tokenizer, cfg,
                                        enabled=sr_report.setting_switches(name))
              for name in ("all", "no_context")}
    first, frozen = inputs["all"], run.eval_frozen()
    c = s.conditioner(frozen, {"lr": first["lr"], "text_ids": first["text_ids"],
                               "text_mask": first["text_mask"],
                               **{m: first["maps"][:, i] for i, m in enumerate(MODALITIES)}})
    other = jnp.roll(c["ids"], 1, axis=0)  # each tile with its neighbour's maps

    def context(name, ids):
      return s.model.apply({"params": run.params}, c["text_states"], c["text_mask"], ids,
                           inputs[name]["present"], method=MMSR.encode_context)
    ctx, null, swapped = context("all", c["ids"]), context("no_context", c["ids"]), context(
        "all", other)
    z = jax.random.normal(jax.random.key(0), c["lr_latent"].shape)
    t_max = s.schedule.num_timesteps - 1
    row = {"workdir": w, "step": run.step, "maps_from": cfg.data.get("maps_from", "record"),
           "seed": int(cfg.seed), "tiles": len(examples),
           "context_change_nulled": rel(null, ctx), "context_change_swapped": rel(swapped, ctx),
           "output_change": {}}
    for t in (t_max, t_max // 2, t_max // 10):
      tt = jnp.full((len(examples),), t, jnp.int32)

      def denoise(cc, tt=tt):
        return s.model.apply({"params": run.params}, z, tt, c["lr_latent"], cc,
                             method=MMSR.denoise)
      ref = denoise(ctx)
      row["output_change"][str(t)] = {"nulled": rel(denoise(null), ref),
                                      "swapped": rel(denoise(swapped), ref)}
    hr = jnp.asarray(np.stack([ex["hr"] for ex in examples]))
    target = s.conditioner.diffusion_target(frozen, hr, c["lr_latent"])
    row["x0_zero_predictor"] = float(jnp.mean(jnp.square(target)))
    cfg.unlock()
    cfg.eval.val_batches = 2
    row["x0_mse_tmax"] = sr_report.val_losses(cfg, run, run.params, examples,
                                              settings=("all", "no_context"), t=t_max,
                                              x0_error=True)
    log(f"{w} step {run.step}: context array changes {row['context_change_nulled']:.3g} "
        f"nulled; denoiser output at t={t_max} {row['output_change'][str(t_max)]['nulled']:.3g}; "
        f"x0 error {row['x0_mse_tmax']['all']:.5f} (predicting 0: {row['x0_zero_predictor']:.5f})")
    rows.append(row)
  with open(path, "w") as f:
    json.dump(rows, f, indent=2)
  return rows
