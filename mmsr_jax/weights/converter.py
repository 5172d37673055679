"""Converts public PyTorch weights (diffusers / transformers safetensors: a model folder, a
pipeline folder, one file with its config, or a hub id on an online machine) into a folder holding
our Flax tree (``params.safetensors``) and ``config.json`` (source, architecture, the matching
config overrides). Pickle checkpoints are refused; an existing destination is never replaced."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np

from mmsr_jax.models import t5 as t5_lib
from mmsr_jax.models import vae as vae_lib
from mmsr_jax.models import vqgan as vqgan_lib
from mmsr_jax.weights import importers, params_io, pixart

KINDS = ("vae", "t5", "vqgan", "pixart")
# Component subfolder inside a diffusers pipeline folder (one with model_index.json).
PIPELINE_SUBFOLDER = {"vae": "vae", "t5": "text_encoder", "vqgan": "vqvae", "pixart": "transformer"}
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
PARAMS_FILE = params_io.PARAMS_FILE
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------------------------
# Finding the weights.
# ---------------------------------------------------------------------------------------------
def _refuse_pickle(path: str) -> None:
  raise ValueError(
      f"--src={path}: pickle checkpoints are never loaded by this project. Convert it to "
      "safetensors first on a machine you trust, e.g. in Python: "
      "sd = torch.load(path, map_location='cpu', weights_only=True); "
      "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors') "
      "(keep its config.json beside it), then run this converter on the result.")


def _download(hub_id: str, kind: str) -> str:
  """Fetches the json and safetensors files of a hub repository (online machines only)."""
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:  # pragma: no cover - transformers installs it
    raise ValueError(f"--src={hub_id}: not a local path, and huggingface_hub is missing") from e
  sub = PIPELINE_SUBFOLDER[kind]
  patterns = ["*.json", "*.safetensors", *TOKENIZER_FILES,
              f"{sub}/*.json", f"{sub}/*.safetensors", "tokenizer/*", "scheduler/*.json"]
  try:
    return snapshot_download(hub_id, allow_patterns=patterns)
  except Exception as e:  # noqa: BLE001 - network / auth / missing repo
    raise ValueError(f"--src={hub_id}: not a local path, and downloading it from the hub failed "
                     f"({type(e).__name__}: {e}). Download the model folder elsewhere and pass "
                     "its local path.") from e


def _weight_files(folder: str) -> list[str]:
  """The safetensors files of one model folder (all shards), or a clear error."""
  indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
  if indexes:
    with open(indexes[0]) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(folder, s) for s in shards]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{indexes[0]} lists shards that are missing: {missing[:3]}")
    return files
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if files:
    return files
  pickles = [p for p in os.listdir(folder) if p.endswith(params_io.PICKLE_SUFFIXES)]
  if pickles:
    _refuse_pickle(os.path.join(folder, pickles[0]))
  raise FileNotFoundError(f"{folder}: no *.safetensors weights found")


def resolve_source(src: str, kind: str, src_config: str = "") -> tuple[list[str], dict, str]:
  """``--src`` -> (safetensors files, the model's config.json as a dict, the model folder)."""
  if src.endswith(params_io.PICKLE_SUFFIXES):
    _refuse_pickle(src)
  if not os.path.exists(src):
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
      src = _download(src, kind)
    else:
      raise FileNotFoundError(f"--src={src}: no such file or folder")
  if os.path.isfile(src):
    if not src.endswith(".safetensors"):
      raise ValueError(f"--src={src}: expected a .safetensors file or a model folder")
    folder, files = os.path.dirname(os.path.abspath(src)), [src]
  else:
    folder = src
    if os.path.isfile(os.path.join(folder, "model_index.json")):
      folder = os.path.join(folder, PIPELINE_SUBFOLDER[kind])
      if not os.path.isdir(folder):
        raise FileNotFoundError(f"--src={src} is a pipeline folder without the "
                                f"'{PIPELINE_SUBFOLDER[kind]}' component that --kind={kind} needs")
    files = _weight_files(folder)
  cfg_path = src_config or os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: the model's config.json is needed to know its "
                            "architecture; put it beside the weights or pass --src_config")
  with open(cfg_path) as f:
    return files, json.load(f), folder


def find_scheduler_config(src: str, folder: str) -> tuple[dict | None, str]:
  """The diffusers ``scheduler/scheduler_config.json`` of the pipeline a model comes from (the
  ``--src`` pipeline folder, or the pipeline around a component folder), with its path;
  ``(None, "")`` when there is none."""
  here = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  for path in (os.path.join(here, "scheduler", "scheduler_config.json"),
               os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler",
                            "scheduler_config.json"),
               os.path.join(folder, "scheduler_config.json")):
    if os.path.isfile(path):
      try:
        with open(path) as f:
          return json.load(f), path
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
  return None, ""


def read_state_dict(files: list[str]) -> dict[str, np.ndarray]:
  sd = {}
  for path in files:
    sd.update(params_io.read_safetensors(path))
  return sd


# ---------------------------------------------------------------------------------------------
# Architectures: the source config.json -> our config dataclasses (and the config overrides).
# ---------------------------------------------------------------------------------------------
def _require(cfg: dict, keys, kind: str) -> None:
  missing = [k for k in keys if k not in cfg]
  if missing:
    raise ValueError(f"--kind={kind}: the source config.json lacks {missing}; is it the right "
                     "kind of model?")


def _conv_autoencoder_arch(cfg: dict, kind: str) -> dict:
  _require(cfg, ("block_out_channels", "latent_channels"), kind)
  for field in ("down_block_types", "up_block_types"):
    bad = [t for t in cfg.get(field, []) if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
    if bad:
      raise ValueError(f"--kind={kind}: {field} {bad} are not supported (only the plain "
                       "DownEncoderBlock2D / UpDecoderBlock2D of the SD / taming autoencoders)")
  if cfg.get("norm_type", "group") != "group":
    raise ValueError(f"--kind={kind}: norm_type={cfg['norm_type']!r} is not supported (group)")
  return dict(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
              block_out_channels=list(cfg["block_out_channels"]),
              layers_per_block=cfg.get("layers_per_block", 2),
              latent_channels=cfg["latent_channels"],
              norm_num_groups=cfg.get("norm_num_groups", 32),
              mid_block_attention=bool(cfg.get("mid_block_add_attention", True)))


def _arch_fields(arch: dict) -> dict:
  """The config's ``arch`` fields (``mid_block_attention`` only when it is off)."""
  return {k: v for k, v in arch.items() if k != "mid_block_attention" or not v}


def convert(kind: str, sd: dict[str, np.ndarray], cfg: dict,
            scheduler: dict | None = None) -> tuple[dict, dict, dict]:
  """(params tree, architecture, config overrides) for one kind of model. ``scheduler``: for
  pixart, the source pipeline's scheduler config (the training noise schedule; None = PixArt's
  default), recorded as ``arch['training_schedule']`` and turned into ``diffusion.*``
  overrides."""
  if kind == "vae":
    arch = _conv_autoencoder_arch(cfg, kind)
    shift = cfg.get("shift_factor")
    scaling = cfg.get("scaling_factor", 0.18215)
    params = importers.vae_params_from_torch_state_dict(sd, vae_lib.VAEConfig(**arch))["params"]
    factor = 2 ** (len(arch["block_out_channels"]) - 1)
    overrides = {"autoencoder.kind": "vae", "autoencoder.factor": factor,
                 "autoencoder.scaling_factor": scaling,
                 "autoencoder.shift_factor": 0.0 if shift is None else shift,
                 "autoencoder.arch": _arch_fields(arch)}
    return params, dict(arch, scaling_factor=scaling, shift_factor=shift), overrides
  if kind == "vqgan":
    arch = _conv_autoencoder_arch(cfg, kind)
    _require(cfg, ("num_vq_embeddings",), kind)
    arch.update(num_vq_embeddings=cfg["num_vq_embeddings"],
                vq_embed_dim=cfg.get("vq_embed_dim") or cfg["latent_channels"])
    params = importers.vqgan_params_from_torch_state_dict(
        sd, vqgan_lib.VQGANConfig(**arch))["params"]
    return params, arch, {"vq.arch": _arch_fields(arch)}
  if kind == "t5":
    keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    _require(cfg, keys, kind)
    arch = {k: cfg[k] for k in keys}
    arch.update(relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
                relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
                layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
                feed_forward_proj=cfg.get("feed_forward_proj", "relu"))
    params = importers.t5_params_from_torch_state_dict(sd, t5_lib.T5Config(**arch))["params"]
    return params, arch, {"text.encoder": arch}
  if kind == "pixart":
    _require(cfg, ("num_layers", "num_attention_heads", "attention_head_dim"), kind)
    sample = cfg.get("sample_size", 128)
    extra = cfg.get("use_additional_conditions")
    if extra is None:
      extra = sample == 128  # diffusers' default: the 1024px PixArt-alpha uses them
    if extra:
      raise ValueError(
          "--kind=pixart: this checkpoint uses additional (resolution / aspect-ratio) "
          "conditions (use_additional_conditions), which MMSR's DiT does not have; use a "
          "checkpoint without them (PixArt-alpha 256/512px, PixArt-Sigma)")
    if cfg.get("norm_type", "ada_norm_single") != "ada_norm_single":
      raise ValueError(f"--kind=pixart: norm_type={cfg['norm_type']!r}; expected ada_norm_single")
    dit, cap = pixart.pixart_params_from_torch_state_dict(sd, depth=cfg["num_layers"])
    params = {"dit": dit["params"]}
    if cap is not None:
      params["context"] = cap["params"]
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    width = heads * head_dim
    hidden = dit["params"]["blocks"]["ff"]["fc1"]["kernel"].shape[-1] if cfg["num_layers"] else 0
    arch = dict(width=width, depth=cfg["num_layers"], num_heads=heads,
                patch_size=cfg.get("patch_size", 2), mlp_ratio=hidden / width if hidden else 4.0,
                in_channels=cfg.get("in_channels", 4),
                out_channels=cfg.get("out_channels") or cfg.get("in_channels", 4),
                sample_size=sample, caption_channels=cfg.get("caption_channels"),
                interpolation_scale=pixart.interpolation_scale(cfg))
    overrides = {f"model.{k}": arch[k] for k in ("width", "depth", "num_heads", "patch_size",
                                                 "mlp_ratio")}
    overrides["model.pos_interpolation_scale"] = arch["interpolation_scale"]
    schedule = pixart.training_schedule(scheduler, "scheduler_config.json")
    arch["training_schedule"] = schedule
    overrides.update({f"diffusion.{k}": schedule[k] for k in pixart.SCHEDULE_FIELDS
                      + ("prediction",)})
    return params, arch, overrides
  raise ValueError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# Reading a converted folder back (configs point here).
# ---------------------------------------------------------------------------------------------
def converted_info(path: str) -> dict:
  """The ``config.json`` written beside converted params ({} when there is none)."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  cfg_path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    info = json.load(f)
  return info if "kind" in info and "arch" in info else {}


def check_destination(dst: str) -> None:
  """The converter writes only into a new or empty folder: anything in ``dst`` (a training run's
  config.json, an earlier conversion, other files) is the user's and is never replaced."""
  if not os.path.exists(dst):
    return
  if not os.path.isdir(dst):
    raise FileExistsError(f"--dst={dst} is a file; choose a new folder")
  names = sorted(os.listdir(dst))
  if not names:
    return
  if os.path.isdir(os.path.join(dst, "checkpoints")) or "metrics.jsonl" in names:
    what = "a training run"
  elif converted_info(dst):
    what = "an earlier conversion ({kind} of {source})".format(**converted_info(dst))
  else:
    what = "files: " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
  raise FileExistsError(f"--dst={dst} is not empty (it holds {what}); the converter writes "
                        "only into a new or empty folder")


def convert_to_folder(kind: str, src: str, dst: str, *, src_config: str = "") -> dict:
  """The whole conversion; returns the written ``config.json`` content."""
  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")
  check_destination(dst)
  files, cfg, folder = resolve_source(src, kind, src_config)
  scheduler, scheduler_path = (find_scheduler_config(src, folder) if kind == "pixart"
                               else (None, ""))
  params, arch, overrides = convert(kind, read_state_dict(files), cfg, scheduler)
  schedule = arch.pop("training_schedule", None)
  if schedule is not None and scheduler_path:
    schedule["source"] = scheduler_path
  os.makedirs(dst, exist_ok=True)
  params_io.save_params(os.path.join(dst, PARAMS_FILE), params)
  info = {"kind": kind, "source": src, "source_files": [os.path.basename(p) for p in files],
          "arch": arch, "config_overrides": overrides,
          **({"training_schedule": schedule} if schedule is not None else {}),
          "num_params": int(sum(np.size(v) for v in params_io.flatten(params).values()))}
  if kind == "t5":
    found = []
    for where in (folder, os.path.join(os.path.dirname(folder.rstrip("/")), "tokenizer")):
      for name in TOKENIZER_FILES:
        p = os.path.join(where, name)
        if os.path.isfile(p) and name not in found:
          shutil.copy(p, os.path.join(dst, name))
          found.append(name)
    info["tokenizer_files"] = found
  with open(os.path.join(dst, CONFIG_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info


def override_flags(kind: str, dst: str, info: dict) -> list[str]:
  """The command-line overrides that make a config use the converted weights."""
  field = {"vae": "autoencoder.params", "t5": "text.params", "vqgan": "vq.params",
           "pixart": "model.init_from"}[kind]
  out = [f"--config.{field}={dst}"]
  if kind == "t5" and info.get("tokenizer_files"):
    out.append(f"--config.text.tokenizer={dst}")
  for k, v in info["config_overrides"].items():
    if isinstance(v, dict):
      out += [f"--config.{k}.{kk}={_flag_value(vv)}" for kk, vv in v.items()]
    else:
      out.append(f"--config.{k}={_flag_value(v)}")
  return out


def _flag_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "'(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")'"
  return str(v)


