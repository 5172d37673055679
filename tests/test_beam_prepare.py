"""annotate and precompute as Apache Beam pipelines (``mmsr_jax.data.beam_prepare``) on the
local runner: the same records as the single-process loops, bad elements in the rejected output,
a killed run finished by a rerun with every shard once, a train step from Beam-written shards,
both pipelines with input and output on a remote (stand-in) filesystem, the Dataflow launch
script's dry run and its worker container's Dockerfile against the repository."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("apache_beam")

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata  # noqa: E402
from apache_beam.io.localfilesystem import LocalFileSystem  # noqa: E402
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter  # noqa: E402

from mmsr_jax.data import annotator, beam_prepare  # noqa: E402
from mmsr_jax.training import encoder_pass_beam  # noqa: E402
from mmsr_jax.formats.records import list_shards  # noqa: E402
from tests.test_annotate import _build_models, _images  # noqa: E402
from tests.test_precompute import _config, _step, annotated_and_precomputed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_WORKERS = ["--direct_num_workers=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return _build_models(str(tmp_path_factory.mktemp("models")))


def _records(path: str) -> list[bytes]:
  r = ArrayRecordReader(path)
  out = [r.read([i])[0] for i in range(r.num_records())]
  r.close()
  return out


def _folder_with_bad_files(root) -> str:
  """5 good 64x48 images, a truncated PNG and a 100x100 one (over --max_pixels=5000)."""
  _images(root, 5)
  with open(os.path.join(str(root), "part0", "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\nnot an image")
  Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(os.path.join(str(root), "part1",
                                                                       "big.png"))
  return str(root)


def test_annotate_pipeline_writes_the_loops_records_and_rejects_bad_files(models, tmp_path):
  imgs = _folder_with_bad_files(tmp_path / "imgs")
  opts = dict(input=imgs, depth=models["depth"], seg=models["seg"], caption=models["caption"],
              shard_size=2, batch_size=2, max_pixels=5000)
  loop = annotator.AnnotateOptions(output=str(tmp_path / "loop"), **opts)
  assert annotator.run_annotation(loop)["skipped"] == 2
  beam_opts = annotator.AnnotateOptions(output=str(tmp_path / "beam"), **opts)
  summary = beam_prepare.annotate(beam_opts, TWO_WORKERS, log=lambda _: None)
  a, b = list_shards(loop.output, "loop"), list_shards(beam_opts.output, "beam")
  assert [os.path.basename(x) for x in a] == [os.path.basename(x) for x in b]
  assert len(b) == 4  # 7 files, 2 per shard
  for x, y in zip(a, b):
    assert _records(x) == _records(y)  # same arrays, captions and metadata, byte for byte
  assert sum(len(_records(y)) for y in b) == 5
  rejected = []
  for name in sorted(os.listdir(os.path.join(beam_opts.output, "rejected"))):
    with open(os.path.join(beam_opts.output, "rejected", name)) as f:
      rejected += [json.loads(line) for line in f]
  assert sorted(os.path.basename(r["path"]) for r in rejected) == ["big.png", "corrupt.png"]
  assert any("max_pixels" in r["reason"] for r in rejected)
  assert summary["rejected"] == 2 and summary["workers"] == 2
  m = summary["metrics"]
  assert (m["images_read"], m["images_written"], m["images_rejected"]) == (7, 5, 2)
  assert {"ms_depth", "ms_seg", "ms_caption"} <= set(m)
  with open(os.path.join(beam_opts.output, beam_prepare.ANNOTATE_SUMMARY)) as f:
    assert json.load(f)["metrics"] == m
  # A rerun has nothing to do; other settings into the same folder are refused.
  assert beam_prepare.annotate(beam_opts, TWO_WORKERS, log=lambda _: None)["written"] == 0
  with pytest.raises(FileExistsError, match="new --output"):
    beam_prepare.annotate(annotator.AnnotateOptions(imgs, beam_opts.output, from_hr=True),
                          log=lambda _: None)


def _annotate_cli(*args):
  return subprocess.Popen(
      [sys.executable, "-m", "mmsr_jax.annotate", *args], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True,
      env=dict(os.environ, PYTHONPATH=REPO))


def test_a_killed_run_is_finished_by_a_rerun_with_every_shard_once(models, tmp_path):
  _images(tmp_path / "imgs", 8)
  common = [f"--input={tmp_path / 'imgs'}", f"--depth={models['depth']}",
            f"--seg={models['seg']}", f"--caption={models['caption']}", "--shard_size=1",
            "--direct_num_workers=1"]
  out = tmp_path / "killed"
  p = _annotate_cli(*common, f"--output={out}")
  try:
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(out.glob("*.array_record")):
      time.sleep(0.02)
  finally:
    os.killpg(p.pid, signal.SIGKILL)  # the whole run, as a preempted machine ends it
    p.communicate()
  done = list(out.glob("*.array_record"))
  assert 1 <= len(done) < 8, "the run was not stopped part-way"
  r = _annotate_cli(*common, f"--output={out}")
  stdout, stderr = r.communicate(timeout=600)
  assert r.returncode == 0, stderr[-3000:]
  assert f"8 images, 8 shards, {len(done)} already done" in stdout
  clean = tmp_path / "clean"
  r = _annotate_cli(*common, f"--output={clean}")
  stdout, stderr = r.communicate(timeout=600)
  assert r.returncode == 0, stderr[-3000:]
  names = sorted(os.listdir(out))
  assert [n for n in names if n.endswith(".array_record")] == [
      f"annotations-{i:05d}-of-00008.array_record" for i in range(8)]
  assert not [n for n in names if ".tmp" in n]
  for i in range(8):
    name = f"annotations-{i:05d}-of-00008.array_record"
    assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_annotate_cli_refuses_what_is_neither_its_flag_nor_a_beam_option(tmp_path):
  _images(tmp_path / "imgs", 1)
  r = _annotate_cli(f"--input={tmp_path / 'imgs'}", f"--output={tmp_path / 'o'}",
                    "--shard_sise=3")
  _, stderr = r.communicate(timeout=300)
  assert r.returncode == 2
  assert stderr.strip().splitlines()[-1] == (
      "error: --shard_sise=3: neither a flag of this command nor an Apache Beam pipeline option")


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
  root = tmp_path_factory.mktemp("pre")
  cfg = annotated_and_precomputed(root)["cfg"]  # the loop's output in root/pre
  opts = encoder_pass_beam.PrecomputeOptions(str(root / "ann"), str(root / "beam"), crops=4,
                                             dtype="float32")
  summary = encoder_pass_beam.precompute(cfg, opts, TWO_WORKERS, log=lambda _: None)
  return {"root": root, "cfg": cfg, "opts": opts, "summary": summary}


def test_precompute_pipeline_writes_the_loops_records(pre):
  root = pre["root"]
  a, b = list_shards(str(root / "pre"), "loop"), list_shards(str(root / "beam"), "beam")
  assert [os.path.basename(x) for x in a] == [os.path.basename(x) for x in b]
  for x, y in zip(a, b):
    ra, rb = _records(x), _records(y)
    assert len(ra) == len(rb) == 3
    assert ra == rb  # ids, crop banks, latents, caption states: byte for byte
  m = pre["summary"]["summary"]["metrics"]
  assert (m["images_read"], m["images_written"], m["images_rejected"]) == (6, 6, 0)
  assert {"ms_vq", "ms_latents", "ms_text", "ms_host"} <= set(m)
  assert (root / "beam" / "null_text.npz").is_file()
  # A rerun with a stale encoder is refused; the same settings find nothing to do.
  stale = _config(str(root / "ann"), seed=1)
  with pytest.raises(FileExistsError, match="other inputs, settings or encoders"):
    encoder_pass_beam.precompute(stale, pre["opts"], log=lambda _: None)
  again = encoder_pass_beam.precompute(pre["cfg"], pre["opts"], ["--direct_num_workers=1"],
                                       log=lambda _: None)
  assert again["summary"]["written"] == 0


def test_a_train_step_from_beam_written_features(pre):
  """The loader reads the Beam-written shards and a step trains from the stored features."""
  path = str(pre["root"] / "beam")
  _, batch, params, loss = _step(_config(path, **{"text.states_from": "shards",
                                                  "autoencoder.hr_latents_from": "shards"}))
  assert "text_states" in batch and "hr_latent" in batch
  assert np.isfinite(loss)


def test_a_bad_record_is_rejected_and_the_rest_written(pre, tmp_path):
  src = tmp_path / "ann"
  os.makedirs(src)
  good = _records(list_shards(str(pre["root"] / "ann"), "ann")[0])
  w = ArrayRecordWriter(str(src / "annotations-00000-of-00001.array_record"), "group_size:1")
  for rec in (good[0], b"not an npz archive", good[2]):
    w.write(rec)
  w.close()
  opts = encoder_pass_beam.PrecomputeOptions(str(src), str(tmp_path / "out"), crops=4,
                                             dtype="float32", features=("vq",))
  summary = encoder_pass_beam.precompute(pre["cfg"], opts, ["--direct_num_workers=1"],
                                         log=lambda _: None)["summary"]
  assert summary["rejected"] == 1 and summary["rejected_examples"][0]["index"] == 1
  (shard,) = list_shards(str(tmp_path / "out"), "out")
  assert len(_records(shard)) == 2


# --- Remote paths ---------------------------------------------------------------------------
# Inputs and outputs on a filesystem that is not the local disk take the other branch of every
# path helper in beam_prepare (FileSystems: match, open, create, rename, exists, delete). GCS
# cannot be reached from the tests, so a Beam FileSystem of its own scheme stands in for it:
# ``fakegs://bucket/key`` is the file ``ROOT/bucket/key``, with an object store's rules where
# they differ from a disk's (no folders: only objects exist, a write needs no parent, listing is
# by key prefix). The pipelines run in this process (one worker, in_memory), where the class is
# registered.

class _BucketFileSystem(LocalFileSystem):
  ROOT: str | None = None
  CALLS: list[tuple[str, str]] = []  # (method, path): which writes went where

  @classmethod
  def scheme(cls):
    return "fakegs"

  @classmethod
  def _disk(cls, path: str) -> str:
    assert path.startswith("fakegs://") and cls.ROOT, path
    return os.path.join(cls.ROOT, path[len("fakegs://"):])

  @classmethod
  def _url(cls, disk: str) -> str:
    return "fakegs://" + os.path.relpath(disk, cls.ROOT)

  def join(self, basepath, *paths):
    return "/".join([basepath.rstrip("/"), *paths])

  def split(self, path):
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail

  def has_dirs(self):
    return False

  def mkdirs(self, path):
    pass

  def _list(self, dir_or_prefix):
    for dirpath, _, names in os.walk(self.ROOT):
      for n in names:
        url = self._url(os.path.join(dirpath, n))
        if url.startswith(dir_or_prefix):
          yield self.metadata(url)

  def create(self, path, mime_type="application/octet-stream",
             compression_type=CompressionTypes.AUTO):
    self.CALLS.append(("create", path))
    return super().create(self._disk(path), mime_type, compression_type)

  def open(self, path, mime_type="application/octet-stream",
           compression_type=CompressionTypes.AUTO):
    self.CALLS.append(("open", path))
    return super().open(self._disk(path), mime_type, compression_type)

  def _onto(self, name, disk_op, sources, destinations):
    """``disk_op`` (the local copy or rename) onto objects that need no parent folder."""
    self.CALLS += [(name, d) for d in destinations]
    for d in destinations:
      os.makedirs(os.path.dirname(self._disk(d)), exist_ok=True)
    disk_op([self._disk(p) for p in sources], [self._disk(p) for p in destinations])

  def copy(self, source_file_names, destination_file_names):
    self._onto("copy", super().copy, source_file_names, destination_file_names)

  def rename(self, source_file_names, destination_file_names):
    self._onto("rename", super().rename, source_file_names, destination_file_names)

  def exists(self, path):
    return os.path.isfile(self._disk(path))  # a "folder" is no object

  def size(self, path):
    return os.path.getsize(self._disk(path))

  def last_updated(self, path):
    return os.path.getmtime(self._disk(path))

  def checksum(self, path):
    return str(self.size(path))

  def metadata(self, path):
    if not self.exists(path):
      raise BeamIOError(f"no object {path}")
    return FileMetadata(path, self.size(path), self.last_updated(path))

  def delete(self, paths):
    self.CALLS += [("delete", p) for p in paths]
    for p in paths:
      if not self.exists(p):
        raise BeamIOError(f"no object {p}")
      os.remove(self._disk(p))


ONE_WORKER = ["--direct_num_workers=1"]  # in_memory: the pipeline runs in this process


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """``fakegs://b/`` over ``tmp_path/gcs/b``; its calls start empty."""
  monkeypatch.setattr(_BucketFileSystem, "ROOT", str(tmp_path / "gcs"))
  monkeypatch.setattr(_BucketFileSystem, "CALLS", [])
  os.makedirs(tmp_path / "gcs" / "b")
  return tmp_path / "gcs" / "b"


def _entries(rec: bytes, name_map=lambda n: n) -> dict:
  """A record's entries (bytes), its meta decoded and its source name mapped."""
  with np.load(io.BytesIO(rec), allow_pickle=False) as z:
    out = {k: z[k].tobytes() for k in z.files}
  meta = json.loads(out.pop("meta"))
  return dict(out, meta=dict(meta, name=name_map(meta["name"])))


def _objects(root) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, _, names in os.walk(root) for n in names)


def _writes_are_atomic(calls) -> None:
  """Every object was written under a temporary name and renamed onto its own."""
  assert calls
  assert all(".tmp-" in p for m, p in calls if m == "create"), calls
  assert all(".tmp-" not in p for m, p in calls if m == "rename"), calls


def test_annotate_with_input_and_output_on_a_remote_filesystem(models, tmp_path, bucket):
  imgs = _folder_with_bad_files(tmp_path / "imgs")  # 5 good, 2 rejected
  with open(os.path.join(imgs, "part0", "img0.txt"), "w") as f:
    f.write("a  sidecar\ncaption")  # read through FileSystems on the remote side
  # macOS's resource-fork files, which the folder reader skips (not images)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(imgs, "part1", "._img1.png"))
  shutil.copytree(imgs, bucket / "imgs")
  # No caption model: the records carry the sidecar captions.
  opts = dict(depth=models["depth"], seg=models["seg"], shard_size=2, batch_size=2,
              max_pixels=5000)
  quiet = lambda _: None  # noqa: E731
  local = beam_prepare.annotate(
      annotator.AnnotateOptions(input=imgs, output=str(tmp_path / "local"), **opts), ONE_WORKER,
      log=quiet)
  ropts = annotator.AnnotateOptions(input="fakegs://b/imgs/", output="fakegs://b/ann", **opts)
  remote = beam_prepare.annotate(ropts, ONE_WORKER, log=quiet)
  _writes_are_atomic(_BucketFileSystem.CALLS)
  for k in ("images", "shards", "written", "rejected"):
    assert remote[k] == local[k], k
  assert local["written"] == 4 and local["rejected"] == 2
  # The same shards, record for record; the records name their remote source.
  to_local = lambda n: n.replace("fakegs://b/imgs", imgs)  # noqa: E731
  names = sorted(n for n in os.listdir(tmp_path / "local") if n.endswith(".array_record"))
  objects = _objects(bucket / "ann")
  assert [n for n in objects if n.endswith(".array_record")] == names
  for n in names:
    want = [_entries(r) for r in _records(str(tmp_path / "local" / n))]
    got = [_entries(r, to_local) for r in _records(str(bucket / "ann" / n))]
    assert got == want, n
  assert any(e.get("caption") == b"a sidecar caption" for n in names
             for e in map(_entries, _records(str(bucket / "ann" / n))))
  for n in sorted(os.listdir(tmp_path / "local" / "rejected")):
    want = (tmp_path / "local" / "rejected" / n).read_text()
    assert (bucket / "ann" / "rejected" / n).read_text() == want.replace(imgs, "fakegs://b/imgs")
  assert not [n for n in objects if ".tmp-" in n]
  assert {"manifest.json", "annotate.json"} <= set(objects)
  # A rerun writes only the missing shard, and clears what a killed attempt left behind.
  os.remove(bucket / "ann" / names[1])
  stale = bucket / "ann" / (names[1] + ".tmp-0123456789ab")
  stale.write_bytes(b"half a shard")
  _BucketFileSystem.CALLS.clear()
  again = beam_prepare.annotate(ropts, ONE_WORKER, log=quiet)
  assert (again["already_done"], again["written"]) == (3, 1)
  shard_writes = [p for m, p in _BucketFileSystem.CALLS if m == "rename" and
                  p.endswith(".array_record")]
  assert shard_writes == ["fakegs://b/ann/" + names[1]]
  assert not stale.exists()
  assert not [n for n in _objects(bucket / "ann") if ".tmp-" in n]
  got = [_entries(r, to_local) for r in _records(str(bucket / "ann" / names[1]))]
  assert got == [_entries(r) for r in _records(str(tmp_path / "local" / names[1]))]


def test_precompute_with_input_and_output_on_a_remote_filesystem(tmp_path, bucket):
  ref = annotated_and_precomputed(tmp_path)
  shutil.copytree(ref["ann"], bucket / "ann")
  opts = encoder_pass_beam.PrecomputeOptions("fakegs://b/ann", "fakegs://b/pre", crops=4,
                                             dtype="float32")
  summary = encoder_pass_beam.precompute(ref["cfg"], opts, ONE_WORKER, log=lambda _: None)
  assert summary["summary"]["written"] == 2
  _writes_are_atomic(_BucketFileSystem.CALLS)
  objects = _objects(bucket / "pre")
  assert not [n for n in objects if ".tmp-" in n]
  names = sorted(n for n in os.listdir(ref["pre"]) if n.endswith(".array_record"))
  assert [n for n in objects if n.endswith(".array_record")] == names
  for n in names:  # the single-process pass's records, byte for byte
    assert _records(str(bucket / "pre" / n)) == _records(os.path.join(ref["pre"], n))
  assert {"null_text.npz", "precompute.json"} <= set(objects)
  again = encoder_pass_beam.precompute(ref["cfg"], opts, ONE_WORKER, log=lambda _: None)
  assert again["summary"]["written"] == 0


def test_dataflow_launch_dry_run_prints_a_valid_command():
  env = dict(os.environ, DATAFLOW_PROJECT="my-proj", DATAFLOW_REGION="us-central1",
             DATAFLOW_BUCKET="gs://my-bucket", DATAFLOW_IMAGE="us-docker.pkg.dev/p/r/mmsr:1")
  r = subprocess.run(["bash", "launch/prepare_dataflow.sh", "annotate", "--dry-run",
                      "--input=gs://my-bucket/photos", "--output=gs://my-bucket/ann",
                      "--depth=depth-anything/Depth-Anything-V2-Small-hf"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  (line,) = [ln for ln in r.stdout.splitlines() if "mmsr_jax.annotate" in ln]
  argv = shlex.split(line)
  assert argv[:3] == ["python", "-m", "mmsr_jax.annotate"]
  args = dict(a[2:].split("=", 1) for a in argv[3:])
  assert args["runner"] == "DataflowRunner" and args["project"] == "my-proj"
  assert args["temp_location"].startswith("gs://my-bucket/")
  assert args["sdk_container_image"] == "us-docker.pkg.dev/p/r/mmsr:1"
  assert "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver" in \
      args["dataflow_service_options"]
  assert args["device"] == "cuda" and args["input"] == "gs://my-bucket/photos"
  # Every option the script adds is one the command accepts (its flag or Beam's).
  own = {"input", "output", "depth", "device", "batch_size"}
  beam_prepare.check_beam_args([a for a in argv[3:] if a[2:].split("=")[0] not in own])
  r = subprocess.run(["bash", "launch/prepare_dataflow.sh", "annotate", "--dry-run"],
                     cwd=REPO, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 2 and "DATAFLOW_PROJECT" in r.stderr


def test_dataflow_worker_image_matches_the_repository():
  """launch/Dockerfile.dataflow is not built here (no Docker daemon, no network); what could
  drift from the repository is checked instead: its Beam version is requirements-prepare.txt's
  pin, its Python requirements.txt's, every file it copies or installs from exists and is in
  its build context, and the launch script and the docs name it."""
  def read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
      return f.read()
  text = read("launch", "Dockerfile.dataflow").replace("\\\n", " ")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
  pin = re.search(r"^apache-beam==(\S+)$", read("requirements-prepare.txt"), re.M).group(1)
  assert f"ARG BEAM_VERSION={pin}" in lines
  (base,) = [ln for ln in lines if ln.startswith("FROM ")]
  py = re.fullmatch(r"FROM apache/beam_python(\d+\.\d+)_sdk:\$\{BEAM_VERSION\}", base).group(1)
  assert f"(Python {py})" in read("requirements.txt").splitlines()[0]
  copied = [p for ln in lines if ln.startswith("COPY ") for p in ln.split()[1:-1]]
  assert {"requirements-prepare.txt", "mmsr_jax"} <= set(copied)
  for p in copied:
    assert os.path.exists(os.path.join(REPO, p)), p
  for ln in lines:
    for req in re.findall(r"requirements[\w-]*\.txt", ln):
      assert req in copied, ln
  kept = {ln[1:] for ln in read("launch", "Dockerfile.dataflow.dockerignore").splitlines()
          if ln.startswith("!")}
  assert set(copied) <= kept
  for doc in (("launch", "prepare_dataflow.sh"), ("docs", "training.md")):
    assert "docker build -f launch/Dockerfile.dataflow" in read(*doc), doc


def test_without_a_runner_flag_the_local_runner_uses_every_core():
  opts = beam_prepare.pipeline_options([])
  assert beam_prepare.local_workers(opts) == (os.cpu_count() or 1)
  assert opts.get_all_options()["runner"] == "DirectRunner"
  one = beam_prepare.pipeline_options(["--direct_num_workers=1"])
  assert beam_prepare.local_workers(one) == 1
  assert one.get_all_options()["direct_running_mode"] == "in_memory"  # no worker process
  two = beam_prepare.pipeline_options(["--direct_num_workers=2"])
  assert two.get_all_options()["direct_running_mode"] == "multi_processing"
  flink = beam_prepare.pipeline_options(["--runner=FlinkRunner", "--flink_master=h:8081"])
  assert beam_prepare.local_workers(flink) is None
