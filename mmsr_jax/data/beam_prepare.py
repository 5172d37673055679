"""Data preparation as Apache Beam pipelines: ``annotate`` (images -> annotated shards) here, and
the shared machinery of ``precompute`` (annotated shards -> shards with the frozen encoders'
outputs), whose pipeline is in ``mmsr_jax/training/encoder_pass_beam.py`` (it runs the encoders
the system builds, a floor above the data).

The same pipeline runs on one machine (Beam's local runner, one worker process per core: the
default) and on a cluster (``--runner=DataflowRunner`` / ``FlinkRunner`` / ``SparkRunner`` and
their options, passed through). The unit of work is one output shard: the driver decides which
records go to which shard before anything runs (annotate: images ``s*size .. (s+1)*size-1`` of
the sorted input; precompute: the input shard of the same name), so every attempt at a shard
writes the same file. A shard is written under a temporary name and renamed when complete; a
rerun skips the shards that exist, so after a crash or a lost worker it writes the missing ones
and never a duplicate. Each model is loaded once per worker (``DoFn.setup``).

A bad element (an unreadable or oversized image, a record that cannot be decoded, a model error
on one image) never fails the job: it is left out of its shard and listed, with its path and
reason, in ``OUTPUT/rejected/<shard name>.jsonl`` (written before the shard, so a finished shard
always has its list). Beam metrics count the images read, written and rejected and the time per
model; the driver prints them at the end and writes them to the summary JSON.

Paths may be local or any filesystem Beam knows (``gs://...``): remote inputs are copied to the
worker's local disk before reading, and outputs are written locally and then copied.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Sequence

# Importing Beam logs a warning about optional Google Cloud clients that no pipeline here needs;
# a command's stderr stays for its own messages (one ``error:`` line on bad input).
py_logging.disable(py_logging.WARNING)
try:
  import apache_beam as beam  # noqa: E402
  from apache_beam.io.filesystems import FileSystems  # noqa: E402
  from apache_beam.metrics.metric import Metrics, MetricsFilter  # noqa: E402
  from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
finally:
  py_logging.disable(py_logging.NOTSET)

from mmsr_jax.data import annotator as ann_lib
from mmsr_jax.data import images, sources
from mmsr_jax.formats.records import MANIFEST, SHARD_PATTERN, SHARD_SUFFIX

METRICS_NAMESPACE = "mmsr"
REJECTED_DIR = "rejected"
ANNOTATE_SUMMARY = "annotate.json"
LOCAL_RUNNERS = ("DirectRunner", "direct")


# ---------------------------------------------------------------------------------------------
# Paths: local files through os, anything else (gs://...) through Beam's FileSystems.

def is_local(path: str) -> bool:
  return "://" not in path


def join(base: str, *names: str) -> str:
  if is_local(base):
    return os.path.join(base, *names)
  return "/".join([base.rstrip("/"), *names])


def exists(path: str) -> bool:
  if is_local(path):
    return os.path.exists(path)
  return FileSystems.exists(path)


def makedirs(path: str) -> None:
  if is_local(path):
    os.makedirs(path, exist_ok=True)  # object stores have no folders to make


def read_text(path: str) -> str | None:
  """The file's text, or None when it does not exist."""
  if not exists(path):
    return None
  if is_local(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  with FileSystems.open(path) as f:
    return f.read().decode("utf-8")


def publish(local: str, final: str) -> None:
  """Moves the complete local file ``local`` to ``final`` in one rename, so a reader (or a
  rerun) sees the whole file or none."""
  if is_local(final):
    os.replace(local, final)
    return
  tmp = f"{final}.tmp-{uuid.uuid4().hex}"
  with open(local, "rb") as src, FileSystems.create(tmp) as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  FileSystems.rename([tmp], [final])
  os.remove(local)


def staging_path(final: str, workdir: str) -> str:
  """Where to write ``final`` before ``publish``: beside it (same filesystem, so the rename is
  atomic) for a local path, in ``workdir`` for a remote one. Unique per attempt, so two attempts
  at one shard (a retried or speculative task) never write the same file."""
  name = f"{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:12]}"
  return f"{final}.tmp-{uuid.uuid4().hex[:12]}" if is_local(final) else os.path.join(workdir, name)


def write_text(path: str, text: str, workdir: str | None = None) -> None:
  """Writes ``text`` to ``path`` atomically."""
  with tempfile.TemporaryDirectory() as tmpdir:
    local = staging_path(path, workdir or tmpdir)
    with open(local, "w", encoding="utf-8") as f:
      f.write(text)
    publish(local, path)


def fetch(path: str, workdir: str) -> str:
  """A local file with the contents of ``path`` (``path`` itself when it is local)."""
  if is_local(path):
    return path
  local = os.path.join(workdir, uuid.uuid4().hex + "-" + os.path.basename(path))
  with FileSystems.open(path) as src, open(local, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  return local


def list_files(pattern: str) -> list[str]:
  """The sorted paths a remote glob matches."""
  found = FileSystems.match([pattern])[0].metadata_list
  return sorted(m.path for m in found)


def remove_stale_attempts(folder: str) -> None:
  """Deletes the temporary files that killed attempts left in an output folder (one run per
  folder, so none is a live attempt's): on a local disk the staged shards, on a remote
  filesystem the uploads that were never renamed."""
  subs = (folder, join(folder, REJECTED_DIR))
  if not is_local(folder):
    stale = [p for sub in subs for p in list_files(join(sub, "*.tmp-*"))]
    if stale:
      FileSystems.delete(stale)
    return
  for sub in subs:
    if os.path.isdir(sub):
      for name in os.listdir(sub):
        if ".tmp-" in name:
          os.remove(os.path.join(sub, name))


def is_image_file(path: str) -> bool:
  """Whether a listed file is an input image, by the rule of ``sources.FolderSource`` (so that
  a folder gives the same shards on a disk and in a bucket): an image's extension, and not
  hidden (macOS leaves ``._name.jpg`` resource forks beside copied photos)."""
  name = path.rstrip("/").rsplit("/", 1)[-1]
  return name.lower().endswith(sources.IMAGE_EXTENSIONS) and not name.startswith(".")


# ---------------------------------------------------------------------------------------------
# Pipeline options: this command's flags are parsed by absl, the rest go to Beam.

def check_beam_args(args: Sequence[str]) -> list[str]:
  """``args`` left over by the command's own flags: each must be a Beam pipeline option
  (``--runner=...``, ``--project=...``, ...); anything else is a ValueError naming it."""
  known = set(PipelineOptions([]).get_all_options(retain_unknown_options=False))
  out = []
  for a in args:
    name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
    if not name or name.replace("-", "_") not in known:
      raise ValueError(f"{a}: neither a flag of this command nor an Apache Beam pipeline option")
    out.append(a)
  return out


def pipeline_options(beam_args: Sequence[str]):
  """Beam's options for ``beam_args``; with no ``--runner``, the local runner with one worker
  process per core (``--direct_num_workers=N`` sets how many; one worker runs in this
  process, which saves starting one)."""
  args = list(beam_args)
  given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
  if "runner" not in given:
    args.append("--runner=DirectRunner")
  opts = PipelineOptions(args)
  all_opts = opts.get_all_options()
  if all_opts["runner"] in LOCAL_RUNNERS:
    # Beam's own default is one worker; this command's is every core (0 means that too).
    workers = int(all_opts["direct_num_workers"]) if "direct_num_workers" in given else 0
    workers = workers or os.cpu_count() or 1
    args = [a for a in args if not a.startswith("--direct_num_workers")]
    args.append(f"--direct_num_workers={workers}")
    if "default_sdk_harness_log_level" not in given:
      args.append("--default_sdk_harness_log_level=WARNING")  # worker start / stop chatter
    if "direct_running_mode" not in given:
      args.append("--direct_running_mode=" + ("in_memory" if workers == 1 else
                                               "multi_processing"))
    opts = PipelineOptions(args)
  return opts


def local_workers(opts) -> int | None:
  """The worker processes of the local runner (None for a cluster runner)."""
  o = opts.get_all_options()
  if o["runner"] not in LOCAL_RUNNERS:
    return None
  return int(o.get("direct_num_workers") or os.cpu_count() or 1)


class WorkerThreads:
  """While the local runner starts its worker processes: when they are as many as the cores,
  XLA in each runs on one thread (by default every process would use every core, and the
  processes would contend for them). Torch's threads are set in ``DoFn.setup``."""

  def __init__(self, workers: int | None):
    self.one = bool(workers) and workers > 1 and workers >= (os.cpu_count() or 1)
    self.old = None

  def __enter__(self):
    if self.one:
      self.old = os.environ.get("XLA_FLAGS")
      os.environ["XLA_FLAGS"] = ((self.old or "") + " --xla_cpu_multi_thread_eigen=false "
                                 "intra_op_parallelism_threads=1").strip()
    return self

  def __exit__(self, *exc):
    if self.one:
      if self.old is None:
        os.environ.pop("XLA_FLAGS", None)
      else:
        os.environ["XLA_FLAGS"] = self.old


def quiet_beam() -> None:
  # Beam logs every worker start and bundle at INFO; the progress line says what matters.
  py_logging.getLogger("apache_beam").setLevel(py_logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Metrics.

def counter(name: str):
  return Metrics.counter(METRICS_NAMESPACE, name)


def report_seconds(seconds: dict[str, float], last: dict[str, float]) -> None:
  """Adds the per-model seconds spent since ``last`` to the ``ms_<model>`` counters."""
  for k, v in seconds.items():
    ms = int(round((v - last.get(k, 0.0)) * 1000))
    if ms:
      counter(f"ms_{k}").inc(ms)
    last[k] = v


def query_metrics(result) -> dict[str, int]:
  """The pipeline's ``mmsr`` counters (committed values where the runner has them)."""
  out: dict[str, int] = {}
  res = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
  for c in res["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
  return out


def metrics_lines(metrics: dict[str, int], images_label: str = "images") -> list[str]:
  read, written, rejected = (metrics.get(k, 0) for k in
                             ("images_read", "images_written", "images_rejected"))
  lines = [f"{images_label}: {read} read, {written} written, {rejected} rejected"]
  models = {k[3:]: v / 1000 for k, v in sorted(metrics.items()) if k.startswith("ms_")}
  if models:
    per = ", ".join(f"{k} {v:.1f} s" for k, v in models.items())
    lines.append(f"time per model (summed over workers): {per}")
  return lines


class Progress:
  """Prints a progress line while the local runner works, from the shards that have appeared
  in the (local) output folder: Beam's local runner reports its metrics only at the end."""

  def __init__(self, finals: list[str], images_of: list[int], every: float = 10.0, log=print,
               unit: str = "images"):
    self.finals, self.images_of, self.every, self.log = finals, images_of, every, log
    self.unit = unit
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self.start = time.perf_counter()

  def __enter__(self):
    if self.finals and all(is_local(f) for f in self.finals):
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def _run(self):
    shown = -1
    while not self._stop.wait(self.every):
      done = [n for f, n in zip(self.finals, self.images_of) if os.path.exists(f)]
      if len(done) != shown:
        shown = len(done)
        rate = sum(done) / max(time.perf_counter() - self.start, 1e-9)
        self.log(f"progress: {len(done)}/{len(self.finals)} shards, {sum(done)} of "
                 f"{sum(self.images_of)} {self.unit}, {rate:.2f} {self.unit}/s")


def write_shard_outputs(final: str, recs: list[bytes], rejected: list[dict[str, Any]],
                        output: str, workdir: str, write, read: int) -> None:
  """The shard's rejected list, then the shard itself, each atomically; then the counters of
  the ``read`` inputs it came from."""
  rej = join(output, REJECTED_DIR, os.path.basename(final)[:-len(SHARD_SUFFIX)] + ".jsonl")
  write_text(rej, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected), workdir)
  local = staging_path(final, workdir)
  write(local, recs)
  publish(local, final)
  counter("images_read").inc(read)
  counter("images_written").inc(len(recs))
  counter("images_rejected").inc(len(rejected))
  counter("shards_written").inc()


def count_rejected(output: str, names: Sequence[str]) -> tuple[int, list[dict[str, Any]]]:
  """The rejected elements listed for the shards ``names`` (all of them, also from earlier
  runs) and the first few."""
  total, first = 0, []
  for name in names:
    text = read_text(join(output, REJECTED_DIR, name[:-len(SHARD_SUFFIX)] + ".jsonl")) or ""
    rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    total += len(rows)
    first += rows[:max(0, 3 - len(first))]
  return total, first


def set_threads(threads: int | None) -> None:
  """Splits the cores between the local runner's workers (torch would take them all in each)."""
  if threads:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads)
    except ImportError:
      pass


def write_shards(options, output: str, label: str, elements: list, make_dofn,
                 finals: Sequence[str], sizes: Sequence[int], names: Sequence[str], log=print,
                 progress_every: float = 10.0, unit: str = "images") -> dict[str, Any]:
  """Writes the shards ``finals`` (``sizes`` images or records each) into ``output`` as one
  pipeline: ``make_dofn(threads)`` (``threads``: torch threads per worker, None on a cluster)
  takes each of ``elements``, one a shard. The temporary files of killed attempts go first.
  Nothing runs when ``elements`` is empty. Logs the metrics; returns what the summaries of
  annotate and precompute share, with the rejected elements of all the shards ``names``."""
  workers = local_workers(options)
  start = time.perf_counter()
  metrics: dict[str, int] = {}
  if elements:
    remove_stale_attempts(output)
    makedirs(join(output, REJECTED_DIR))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers else None
    quiet_beam()
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "Shards" >> beam.Create(elements)
         | "Spread" >> beam.Reshuffle()  # one shard per worker at a time, not all on the first
         | label >> beam.ParDo(make_dofn(threads)))
    with Progress(list(finals), list(sizes), progress_every, log, unit), WorkerThreads(workers):
      result = pipeline.run()
      result.wait_until_finish()
    metrics = query_metrics(result)
    for line in metrics_lines(metrics, unit):
      log(line)
  seconds = time.perf_counter() - start
  rejected, examples = count_rejected(output, names)
  log(f"wrote {len(elements)} shards to {output} ({rejected} {unit} rejected in all, listed "
      f"under {join(output, REJECTED_DIR)})")
  return {"rejected": rejected, "rejected_examples": examples, "metrics": metrics,
          "seconds": round(seconds, 3), "workers": workers,
          "runner": options.get_all_options()["runner"]}


# ---------------------------------------------------------------------------------------------
# annotate

class _Files:
  """The images of one shard, by their index in the sorted input (the key of their LR
  degradation); remote files are copied to ``workdir`` first."""

  def __init__(self, files: dict[int, str], max_pixels: int, workdir: str):
    self.files, self.max_pixels, self.workdir = files, max_pixels, workdir

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.files[index]
    local = fetch(path, self.workdir)
    try:
      caption = ""
      txt = os.path.splitext(path)[0] + ".txt"
      if is_local(path):
        caption = sources._caption_for(path)  # pylint: disable=protected-access
      elif exists(txt):
        caption = " ".join((read_text(txt) or "").split())
      try:
        image = images.read_image(local, self.max_pixels, "--max_pixels")
      except images.BadImage as e:  # its reason names the input, not the deleted local copy
        raise images.BadImage(str(e).replace(local, path)) from e
      return {"name": path, "image": image, "depth": None, "seg": None, "caption": caption}
    finally:
      if local != path:
        os.remove(local)


class AnnotateShards(beam.DoFn):
  """Shard number -> that shard's file (and its rejected list)."""

  def __init__(self, opts, num_shards, num_images, max_pixels, threads):
    super().__init__()
    self.opts, self.num_shards, self.num_images = opts, num_shards, num_images
    self.max_pixels, self.threads = max_pixels, threads

  def setup(self):
    set_threads(self.threads)
    self.annotator = ann_lib.annotator_of(self.opts)  # once per worker
    self.tfds = None
    if self.opts.input.startswith("tfds:"):
      self.tfds = ann_lib._Input(self.opts.input).open(  # pylint: disable=protected-access
          self.opts.tfds_data_dir, self.max_pixels)
    self.workdir = tempfile.mkdtemp(prefix="mmsr_annotate_")
    self.last: dict[str, float] = {}

  def teardown(self):
    shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)

  def process(self, element):
    shard, files = element  # files: {index: path} of the shard's images (None for TFDS)
    o = self.opts
    indices = list(range(shard * o.shard_size, min(self.num_images, (shard + 1) * o.shard_size)))
    source = self.tfds if files is None else _Files(files, self.max_pixels, self.workdir)
    recs, rejected = ann_lib.annotate_indices(self.annotator, source, indices, o,
                                              self.max_pixels)
    final = join(o.output, SHARD_PATTERN.format(shard, self.num_shards))
    write_shard_outputs(final, recs, rejected, o.output, self.workdir, ann_lib.write_shard,
                        len(indices))
    report_seconds(self.annotator.seconds, self.last)
    yield shard


def _shard_files(files: list[str] | None, shard: int, size: int) -> dict[int, str] | None:
  if files is None:
    return None
  return {i: files[i] for i in range(shard * size, min(len(files), (shard + 1) * size))}


def annotate(opts: ann_lib.AnnotateOptions, beam_args: Sequence[str] = (), log=print,
             progress_every: float = 10.0) -> dict[str, Any]:
  """Annotates ``opts.input`` into shards under ``opts.output`` as a Beam pipeline (resumable;
  see the module docstring). Returns the summary (also written to ``annotate.json``)."""
  max_pixels = ann_lib.check_options(opts)
  options = pipeline_options(beam_args)
  files = None
  if opts.input.startswith("tfds:") or is_local(opts.input):
    source = ann_lib._Input(opts.input).open(opts.tfds_data_dir, max_pixels)  # pylint: disable=protected-access
    if isinstance(source, sources.FolderSource):
      ann_lib._check_headers(source, opts.input)  # pylint: disable=protected-access
      files = source.files
    n = len(source)
  else:
    files = [f for f in list_files(join(opts.input, "**")) if is_image_file(f)]
    if not files:
      raise FileNotFoundError(f"--input={opts.input!r}: no image files found under it")
    n = len(files)
  manifest = ann_lib._manifest(n, opts.shard_size, ann_lib.settings_of(opts))  # pylint: disable=protected-access
  makedirs(opts.output)
  mpath = join(opts.output, MANIFEST)
  old = read_text(mpath)
  ann_lib.check_manifest(mpath, manifest, None if old is None else json.loads(old))
  if old is None:
    write_text(mpath, json.dumps(manifest, indent=2, sort_keys=True))
  num = manifest["num_shards"]
  names = [SHARD_PATTERN.format(s, num) for s in range(num)]
  todo = [s for s in range(num) if not exists(join(opts.output, names[s]))]
  log(f"{n} images, {num} shards, {num - len(todo)} already done")
  size = opts.shard_size
  run = write_shards(
      options, opts.output, "Annotate",
      [(s, _shard_files(files, s, size)) for s in todo],
      lambda threads: AnnotateShards(opts, num, n, max_pixels, threads),
      [join(opts.output, names[s]) for s in todo], [min(size, n - s * size) for s in todo],
      names, log, progress_every)
  summary = {"images": n, "shards": num, "already_done": num - len(todo), "written": len(todo),
             **run}
  write_text(join(opts.output, ANNOTATE_SUMMARY), json.dumps(summary, indent=2, sort_keys=True))
  return summary
