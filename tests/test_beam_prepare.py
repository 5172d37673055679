"""annotate and precompute as Apache Beam pipelines (``mmsr_jax.data.beam_prepare``) on the
local runner: the same records as the single-process loops, bad elements in the rejected output,
a killed run finished by a rerun with every shard once, a train step from Beam-written shards,
and the Dataflow launch script's dry run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("apache_beam")

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter  # noqa: E402

from mmsr_jax.data import annotator, beam_prepare  # noqa: E402
from mmsr_jax.training import encoder_pass_beam  # noqa: E402
from mmsr_jax.formats.records import list_shards  # noqa: E402
from mmsr_jax.training import precompute  # noqa: E402
from tests.test_annotate import _build_models, _images  # noqa: E402
from tests.test_precompute import _config, _step  # noqa: E402
from tests.test_vq_train import _write_annotated_shards  # noqa: E402

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
  _write_annotated_shards(str(root / "ann"))
  cfg = _config(str(root / "ann"))
  precompute.precompute_shards(cfg, str(root / "ann"), str(root / "loop"), crops=4,
                               dtype="float32", log=lambda _: None)
  opts = encoder_pass_beam.PrecomputeOptions(str(root / "ann"), str(root / "beam"), crops=4,
                                             dtype="float32")
  summary = encoder_pass_beam.precompute(cfg, opts, TWO_WORKERS, log=lambda _: None)
  return {"root": root, "cfg": cfg, "opts": opts, "summary": summary}


def test_precompute_pipeline_writes_the_loops_records(pre):
  root = pre["root"]
  a, b = list_shards(str(root / "loop"), "loop"), list_shards(str(root / "beam"), "beam")
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
