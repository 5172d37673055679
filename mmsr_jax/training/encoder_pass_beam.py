"""``precompute`` as an Apache Beam pipeline (``python -m mmsr_jax.precompute``): annotated shards
-> shards with the frozen encoders' outputs, one output shard per input shard of the same name,
the encoders built once per worker. The runner, paths, rejected lists, metrics and resumability
are those of ``mmsr_jax/data/beam_prepare.py``; what runs per record is
``mmsr_jax/training/encoder_pass.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import ml_collections

from mmsr_jax.data import beam_prepare as bp
from mmsr_jax.data.beam_prepare import beam
from mmsr_jax.formats.records import MANIFEST, NULL_TEXT_FILE, SHARD_SUFFIX, list_shards
from mmsr_jax.training import encoder_pass as pre

@dataclasses.dataclass(frozen=True)
class PrecomputeOptions:
  """What ``precompute`` does; the CLI flags carry the same names."""
  input: str
  output: str
  features: tuple[str, ...] = ("vq", "text", "latents", "crops")
  batch_size: int = 64
  crop_size: int | None = None
  crops: int = 16
  dtype: str = "bfloat16"
  crop_encoding: str = "png"
  overwrite: bool = False


class PrecomputeShards(beam.DoFn):
  """(input shard, its first record's index, whether to write the empty caption's states) ->
  the precomputed shard."""

  def __init__(self, config_json, opts, features, crop_size, parts, threads):
    super().__init__()
    self.config_json, self.opts, self.features = config_json, opts, features
    self.crop_size, self.parts, self.threads = crop_size, parts, threads

  def setup(self):
    bp.set_threads(self.threads)
    self.config = ml_collections.ConfigDict(json.loads(self.config_json))
    self.encoders = pre.Encoders(self.config, self.parts)  # once per worker
    self.workdir = tempfile.mkdtemp(prefix="mmsr_precompute_")
    self.seconds: dict[str, float] = {}
    self.last: dict[str, float] = {}

  def teardown(self):
    shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)

  def _run(self, recs, first_index, on_reject):
    o = self.opts
    return list(pre.precompute_records(
        self.config, self.encoders, recs, features=self.features, batch_size=o.batch_size,
        crop_size=self.crop_size, crops=o.crops, first_index=first_index, dtype=o.dtype,
        crop_encoding=o.crop_encoding, on_reject=on_reject, seconds=self.seconds))

  def process(self, element):
    src, first_index, null_text = element
    if null_text:
      local = bp.staging_path(bp.join(self.opts.output, NULL_TEXT_FILE), self.workdir)
      pre.write_null_text(self.config, self.encoders, local, self.opts.dtype)
      bp.publish(local, bp.join(self.opts.output, NULL_TEXT_FILE))
    local = bp.fetch(src, self.workdir)
    try:
      recs = pre.read_shard(local)
    finally:
      if local != src:
        os.remove(local)
    rejected: list[dict[str, Any]] = []
    reject = lambda j, why: rejected.append(  # noqa: E731
        {"path": src, "index": int(j), "reason": why})
    try:
      out = self._run(recs, first_index, reject)
    except Exception:  # pylint: disable=broad-except
      # An encoder failed on a batch: one record at a time, to keep all but the bad ones.
      rejected.clear()
      out = []
      for j, rec in enumerate(recs):
        try:
          out += self._run([rec], first_index + j, lambda _, why, j=j: reject(j, why))
        except Exception as e:  # pylint: disable=broad-except
          reject(j, f"encoder failed: {type(e).__name__}: {e}")
    final = bp.join(self.opts.output, os.path.basename(src))
    bp.write_shard_outputs(final, out, rejected, self.opts.output, self.workdir, pre.write_shard,
                           len(recs))
    bp.report_seconds(self.seconds, self.last)
    yield final


def _input_shards(pattern: str, workdir: str) -> tuple[list[str], list[int]]:
  """The input shards (sorted) and their record counts."""
  if bp.is_local(pattern):
    files = list_shards(pattern, "--input")
    return files, pre.record_counts(files)
  glob = pattern if any(c in pattern for c in "*?[") else bp.join(pattern, "*" + SHARD_SUFFIX)
  files = [f for f in bp.list_files(glob) if f.endswith(SHARD_SUFFIX)]
  if not files:
    raise FileNotFoundError(f"--input={pattern!r}: no {SHARD_SUFFIX} shards found")
  counts = []
  for f in files:  # reads each shard's footer through a local copy
    local = bp.fetch(f, workdir)
    counts += pre.record_counts([local])
    os.remove(local)
  return files, counts


def precompute(config, opts: PrecomputeOptions, beam_args: Sequence[str] = (), log=print,
               progress_every: float = 10.0) -> dict[str, Any]:
  """Precomputes the frozen encoders' outputs of the shards ``opts.input`` into ``opts.output``
  as a Beam pipeline (resumable: see ``data/beam_prepare.py``). Returns the summary, which is also
  ``precompute.json`` beside the shards: settings and encoder fingerprints (a rerun with others
  is refused), counts and metrics."""
  features, crop_size, parts = pre.check_options(
      config, opts.features, opts.batch_size, opts.crop_size, opts.crops, opts.dtype,
      opts.crop_encoding)
  options = bp.pipeline_options(beam_args)
  with tempfile.TemporaryDirectory() as tmpdir:
    files, counts = _input_shards(opts.input, tmpdir)
  in_dir = os.path.dirname(files[0])
  finals = [bp.join(opts.output, os.path.basename(f)) for f in files]
  for src, dst in zip(files, finals):
    if bp.is_local(src) and bp.is_local(dst) and os.path.abspath(src) == os.path.abspath(dst):
      raise ValueError(f"--output={opts.output!r} is the input folder: choose another folder")
  settings = dict(pre.settings_of(config, features, crop_size, opts.crops, opts.dtype,
                                  opts.crop_encoding, parts),
                  inputs={os.path.basename(f): c for f, c in zip(files, counts)})
  spath = bp.join(opts.output, pre.SUMMARY_FILE)
  old = bp.read_text(spath)
  if old is not None and not opts.overwrite:
    old_settings = {k: v for k, v in json.loads(old).items() if k in settings}
    if old_settings != json.loads(json.dumps(settings)):
      diff = sorted(k for k in settings if old_settings.get(k) != json.loads(json.dumps(
          settings[k])))
      raise FileExistsError(
          f"{spath} was written for other inputs, settings or encoders (differing: "
          f"{', '.join(diff)}); use a new --output folder or --overwrite")
  bp.makedirs(opts.output)
  if opts.overwrite or old is None:
    bp.write_text(spath, json.dumps(settings, indent=2))  # binds reruns before any shard exists
  todo = [i for i, f in enumerate(finals) if opts.overwrite or not bp.exists(f)]
  log(f"{sum(counts)} records, {len(files)} shards, {len(files) - len(todo)} already done")
  firsts = pre.first_indices(counts)
  # The empty caption's states come from the worker that takes the first shard: the driver
  # never loads an encoder (T5-XXL alone is tens of GB).
  null_text = "text" in features and (
      opts.overwrite or not bp.exists(bp.join(opts.output, NULL_TEXT_FILE)))
  config_json = json.dumps(config.to_dict())
  names = [os.path.basename(f) for f in finals]
  run = bp.write_shards(
      options, opts.output, "Precompute",
      [(files[i], firsts[i], null_text and i == todo[0]) for i in todo],
      lambda threads: PrecomputeShards(config_json, opts, features, crop_size, parts, threads),
      [finals[i] for i in todo], [counts[i] for i in todo], names, log, progress_every,
      "records")
  manifest = bp.read_text(bp.join(in_dir, MANIFEST))
  if manifest is not None and (opts.overwrite or not bp.exists(bp.join(opts.output, MANIFEST))):
    bp.write_text(bp.join(opts.output, MANIFEST), manifest)
  summary = dict(settings, shards=names,
                 summary={"records": sum(counts), "already_done": len(files) - len(todo),
                          "written": len(todo), **run})
  bp.write_text(spath, json.dumps(summary, indent=2))
  return summary
