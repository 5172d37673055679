"""Training at scale, on this machine's CPU: FSDP on 8 fake devices, two processes over gloo,
SIGTERM and restart, restore onto another mesh, non-finite and corrupt-checkpoint faults,
observability outputs, the FLOP count, the benchmark and the launch scripts."""

import glob
import importlib.util
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.schema import tasks
from mmsr_jax.runtime import checkpoint as ckpt_lib
from mmsr_jax.runtime import distributed, sharding
from mmsr_jax.training import flops, loop
from tests.conftest import small_config
from tests.scale_worker import Workers
from mmsr_jax.training import sr_task
from mmsr_jax.data import sr_examples
from mmsr_jax.models import build, layers
from mmsr_jax.data.captions import make_tokenizer
from mmsr_jax.system import dummy_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _worker_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  # No shared compilation cache unless a test asks for one: for two processes, a hit in one but
  # not the other can put them more than gloo's 30 s connection timeout apart.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(extra)
  return env


# --- Mesh and sharding --------------------------------------------------------------------------
def test_mesh_shape_from_config():
  c = small_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 4, 1
  assert sharding.mesh_shape(c, 8) == (2, 4, 1)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2
  assert sharding.mesh_shape(c, 8) == (1, 4, 2)
  c.mesh.data, c.mesh.fsdp = -1, -1
  with pytest.raises(ValueError, match="only one axis may be -1"):
    tasks.validate(c)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.mesh_shape(c, 8)
  c.mesh.data, c.mesh.fsdp, c.batch_size = 1, 8, 4
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 8 batch shards"):
    sharding.make_mesh(c, jax.devices())


def _boxed(**widths):
  """Abstract parameters with logical names: ``name=(shape, names)``."""
  import flax.linen as nn
  return {k: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
          for k, (shape, names) in widths.items()}


def test_fsdp_fill_takes_the_widest_axis_the_model_widths_divide():
  c = small_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  # DiT-XL's widths: 1152 divides by 128, not by 256.
  xl = _boxed(qkv=((1152, 3456), ("embed", "heads")), mlp=((1152, 4608), ("embed", "mlp")),
              bias=((1152,), ("embed_out",)))
  assert sharding.mesh_shape(c, 256) == (1, 256, 1)  # without the widths: -1 is the rest
  assert sharding.mesh_shape(c, 256, xl) == (2, 128, 1)
  assert sharding.mesh_shape(c, 16, xl) == (1, 16, 1)
  large = _boxed(mlp=((1024, 4096), ("embed", "mlp")), odd=((3, 5), ("embed", "mlp")))
  assert sharding.mesh_shape(c, 256, large) == (1, 256, 1)  # a tiny odd leaf does not decide
  c.mesh.data, c.mesh.fsdp = -1, 256  # an explicit FSDP axis is kept, and reported
  assert sharding.mesh_shape(c, 256, xl) == (1, 256, 1)
  per_chip = {d: sharding.param_bytes_per_chip(xl, {"data": 256 // d, "fsdp": d, "tensor": 1})
              for d in (128, 256)}
  assert per_chip[256] == 4 * (1152 * 3456 + 1152 * 4608 + 1152)  # nothing split
  assert per_chip[128] == 4 * (1152 * 3456 + 1152 * 4608) // 128 + 4 * 1152
  c.mesh.data, c.mesh.fsdp, c.batch_size = 1, 8, 8
  mesh = sharding.make_mesh(c, jax.devices())
  whole = sharding.unsharded_params(
      _boxed(a=((12, 16), ("embed", "mlp")), b=((16, 12), ("embed", "mlp"))), mesh)
  assert list(whole) == ["['a']"] and whole["['a']"].shape == (12, 16)


def test_every_parameter_has_logical_axes_and_fsdp_shards_it():
  c = small_config()
  c.mesh.data, c.mesh.fsdp = 1, 8
  model = build.mmsr(c)
  cond = build.conditioner(c)
  boxed = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(c, cond))["params"],
                         jax.random.key(0))
  mesh = sharding.make_mesh(c, jax.devices())
  shardings = sharding.param_shardings(boxed, mesh)  # raises on a parameter without names
  leaves = jax.tree_util.tree_leaves_with_path(nn_unbox(boxed))
  sharded = total = 0
  for (path, leaf), s in zip(leaves, jax.tree.leaves(shardings)):
    total += leaf.size
    if "fsdp" in jax.tree.leaves(tuple(s.spec)):
      sharded += leaf.size
      assert s.shard_shape(leaf.shape)[0] * 8 in (leaf.shape[0], leaf.shape[0] * 8)
  # Everything but the small bias vectors of the heads/mlp dimensions (tensor axis) is split.
  assert sharded / total > 0.99


def nn_unbox(tree):
  import flax.linen as nn
  return nn.unbox(tree)


def test_fsdp_step_on_8_devices_equals_the_single_device_step(config):
  """Pure FSDP (1 x 8 x 1) and all three axes (data 2 x fsdp 2 x tensor 2) against 1 device."""
  batch = next(iter(sr_examples.make_train_loader(config, make_tokenizer("byte"))))
  results = {}
  w = config.model.width
  for n, shape, shard in ((8, (1, 8, 1), (w // 8, 4 * w)), (8, (2, 2, 2), (w // 2, 2 * w)),
                          (1, (1, 1, 1), (w, 4 * w))):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    trainer = sr_task.SRTask(config, "/unused", devices=jax.devices()[:n])
    state = trainer.init_state()
    # Parameters, Adam moments and EMA are created split, never whole on one device.
    for tree in (state.params, state.opt_state[1][0].mu, state.ema_params):
      kernel = tree["dit"]["blocks"]["ff"]["fc1"]["kernel"]  # [depth, width, mlp]
      assert len(kernel.sharding.device_set) == n
      assert kernel.addressable_shards[0].data.shape == (config.model.depth, *shard)
    if n == 1:
      init = jax.device_get(state.params)
    for _ in range(2):
      state, metrics = trainer.train_step(state, trainer.frozen,
                                          sharding.global_batch(batch, trainer.mesh))
    results[shape] = (jax.device_get(state.params), jax.device_get(state.ema_params),
                      float(metrics["loss"]))
  ref = results[(1, 1, 1)]
  for shape in ((1, 8, 1), (2, 2, 2)):
    _close(results[shape][0], ref[0], atol=1e-5)
    _close(results[shape][1], ref[1], atol=1e-5)
    assert results[shape][2] == pytest.approx(ref[2], abs=1e-5)
  # The step really changed the parameters.
  changed = ref[0]["dit"]["proj_out"]["kernel"] - init["dit"]["proj_out"]["kernel"]
  assert np.abs(changed).max() > 1e-6


# --- Restore onto another mesh, observability ---------------------------------------------------
def _read_tensorboard(folder):
  """(tag -> [(step, value)], image tags) from tensorboardX event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  scalars, images = {}, set()
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField("image"):
          images.add(v.tag)
        else:
          scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars, images


def test_checkpoint_of_8_devices_restores_onto_2_and_observability(tmp_path):
  workdir = str(tmp_path / "run")
  c8 = small_config(num_train_steps=3, log_every=1, checkpoint_every=3, sample_every=3,
                    peak_flops=1e9)
  c8.mesh.data, c8.mesh.fsdp = 2, 4
  c8.profile.start_step, c8.profile.num_steps = 2, 1
  saved = sr_task.train(c8, workdir, devices=jax.devices(), write_report=False)
  saved_params = jax.device_get(saved.params)
  # The data position after 3 steps, as an uninterrupted loader would have it.
  it = iter(sr_examples.make_train_loader(c8, make_tokenizer("byte")))
  for _ in range(3):
    next(it)
  saved_data_state = it.get_state()

  # TensorBoard scalars (MFU = model FLOPs x steps/s / (devices x peak)), the sample grids, the
  # profiler trace, the resolved config beside the checkpoints.
  scalars, images = _read_tensorboard(os.path.join(workdir, "tensorboard"))
  for tag in ("loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "mfu", "data_wait_s"):
    assert [s for s, _ in scalars[f"train/{tag}"]] == [1, 2, 3], tag
  for (_, m), (_, sps) in zip(scalars["train/mfu"], scalars["train/steps_per_s"]):
    expected = flops.mmsr_train_flops_per_step(c8) * sps / (8 * 1e9)
    assert m == pytest.approx(expected, rel=1e-5)
  assert images == {"samples/chelsea", "samples/coffee"}
  assert sorted(os.listdir(os.path.join(workdir, "progress"))) == [
      "00000003_chelsea.png", "00000003_coffee.png"]
  assert glob.glob(os.path.join(workdir, "profile", "process_0", "**", "*.xplane.pb"),
                   recursive=True)
  assert ckpt_lib.load_config(workdir).mesh.fsdp == 4

  # The same checkpoint (state and data position) onto 2 devices, as FSDP (1 x 2 x 1) and as
  # tensor parallel (1 x 1 x 2).
  for fsdp, tensor in ((2, 1), (1, 2)):
    c2 = small_config()
    c2.mesh.data, c2.mesh.fsdp, c2.mesh.tensor = 1, fsdp, tensor
    trainer = sr_task.SRTask(c2, workdir, devices=jax.devices()[:2])
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    data_iter = iter(trainer.make_loader())
    restored = ckpt.restore(3, trainer.abstract_with_shardings(), data_iter)
    ckpt.close()
    _close(jax.device_get(restored.params), saved_params, atol=0)
    _close(jax.device_get(restored.ema_params), jax.device_get(saved.ema_params), atol=0)
    assert int(restored.step) == 3
    assert data_iter.get_state() == saved_data_state
    kernel = restored.params["dit"]["blocks"]["ff"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 2
    assert kernel.addressable_shards[0].data.shape == (c2.model.depth, c2.model.width // fsdp,
                                                       4 * c2.model.width // tensor)


# --- Faults ---------------------------------------------------------------------------------------
class _PoisonAt(sr_task.SRTask):
  """Feeds a NaN image at one step (counted from the start of this run)."""

  poison_step = 5

  def step(self, state, batch):
    self.calls = getattr(self, "calls", 0) + 1
    if self.calls == self.poison_step:
      batch = dict(batch, hr=batch["hr"] * jnp.nan)
    return super().step(state, batch)


def test_injected_nan_stops_the_run_and_a_corrupt_checkpoint_is_an_error(config, tmp_path):
  workdir = str(tmp_path)
  config.tensorboard = False  # 6 steps, log every 2, checkpoint every 3; NaN fed at step 5
  loop.check_workdir(config, workdir)
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient norm at step 5\b"):
    loop.run(_PoisonAt(config, workdir, jax.devices()[:1]), workdir, write_report=False)
  ckpt = ckpt_lib.Checkpointer(workdir, create=False)
  assert ckpt.manager.all_steps() == [3]  # the last good one is kept, nothing after it
  trainer = sr_task.SRTask(config, workdir, devices=jax.devices()[:1])
  good = ckpt.restore(3, trainer.abstract_with_shardings())
  ckpt.close()
  assert int(good.step) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(good.params)))

  # Truncate the largest file of the saved state: resuming is a one-line error naming the
  # checkpoint and the file (its checksum manifest says how long it was), and nothing is moved.
  files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", "3", "state", "**", "*"),
                                recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    sr_task.train(config, workdir, devices=jax.devices()[:1], write_report=False)
  msg = str(err.value)
  assert "every checkpoint in" in msg and "(3: state/" in msg and "bytes but" in msg, msg
  assert len(msg.splitlines()) == 1
  assert ckpt_lib.saved_steps(workdir) == [3]


class _PoisonStateAt(sr_task.SRTask):
  """Puts a NaN into the EMA weights at one step; loss and gradient norm stay finite."""

  poison_step = 4

  def step(self, state, batch):
    state, metrics = super().step(state, batch)
    self.calls = getattr(self, "calls", 0) + 1
    if self.calls == self.poison_step:
      ema = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.ema_params)
      state = state.replace(ema_params=ema)
    return state, metrics


def test_a_non_finite_state_is_never_saved(config, tmp_path):
  workdir = str(tmp_path)
  config.tensorboard = False  # checkpoint every 3; the EMA turns NaN at step 4, loss stays finite
  loop.check_workdir(config, workdir)
  with pytest.raises(FloatingPointError, match=r"ema_params\..* NaN or infinite values at step "
                     r"6; not saved: the last good checkpoint \(3\)"):
    loop.run(_PoisonStateAt(config, workdir, jax.devices()[:1]), workdir, write_report=False)
  assert ckpt_lib.saved_steps(workdir) == [3]


def test_sigterm_saves_exits_0_and_the_restart_matches_an_uninterrupted_run(tmp_path):
  steps = 12
  args = lambda name: ["slow", tmp_path / name, tmp_path / f"{name}.npz"]  # noqa: E731
  # The three runs compile the same step: a compilation cache shared by them saves two compiles.
  env = _worker_env(STEPS=str(steps), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  with Workers() as workers:
    straight = workers.start(args("straight"), env, **pipes)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    run = workers.start(args("preempted"), env, **pipes)
    out = []
    for line in run.stdout:
      out.append(line)
      if f"step 3/{steps}" in line:
        run.send_signal(signal.SIGTERM)
        break
    rest, _ = run.communicate(timeout=600)
    log = "".join(out) + rest
    assert run.returncode == 0, log
    assert "preempted: saved step" in log
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "preempted"), create=False)
    stopped = ckpt.latest_step()
    ckpt.close()
    assert 3 <= stopped < steps, log  # saved mid-run although checkpoint_every is 1000

    again = workers.start(args("preempted"), env, **pipes)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resuming from" in out and f"finished at step {steps}" in out
  a, b = np.load(tmp_path / "preempted.npz"), np.load(tmp_path / "straight.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_workers_end_when_the_test_process_is_killed(tmp_path):
  """A worker whose parent (here a stand-in for pytest) is killed with SIGKILL exits too."""
  parent = subprocess.Popen(
      [sys.executable, "-c",
       "import os, sys, time; from tests.scale_worker import Workers\n"
       "w = Workers(); p = w.start(['sleep', '-', '-'], dict(os.environ))\n"
       "print(p.pid, flush=True); time.sleep(600)"],
      cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
  child = None
  try:
    child = int(parent.stdout.readline())
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    for _ in range(100):
      if not _alive(child):
        break
      time.sleep(0.1)
    assert not _alive(child), "the worker outlived its killed parent"
  finally:
    for pid in (parent.pid, child):
      if pid is not None:
        try:
          os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass


def _alive(pid: int) -> bool:
  """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


# --- Several processes ----------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _per_process_batches(config, num_processes: int, steps: int):
  """The global batches of a ``num_processes`` run, built in this one process: each process's
  Grain loader (sharded by process index) yields its rows; the global batch is their
  concatenation in process order."""
  loaders = []
  real = jax.process_index, jax.process_count
  try:
    for i in range(num_processes):
      jax.process_index, jax.process_count = (lambda i=i: i), (lambda: num_processes)
      loaders.append(iter(sr_examples.make_train_loader(config, make_tokenizer("byte"))))
  finally:
    jax.process_index, jax.process_count = real
  return [jax.tree.map(lambda *xs: np.concatenate(xs), *[next(it) for it in loaders])
          for _ in range(steps)]


def _two_process_env(port: int, i: int, **extra):
  return _worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     MMSR_COORDINATOR=f"localhost:{port}", MMSR_NUM_PROCESSES="2",
                     MMSR_PROCESS_ID=str(i), **extra)


def _one_process_reference(steps: int):
  """The params of the two-process runs' 2x2 mesh after ``steps`` steps, computed here in one
  process on 4 devices from the same global batches."""
  config = small_config(num_train_steps=steps)
  config.mesh.data, config.mesh.fsdp = 2, 2
  trainer = sr_task.SRTask(config, "/unused", devices=jax.devices()[:4])
  state = trainer.init_state()
  for batch in _per_process_batches(config, 2, steps):
    state, _ = trainer.train_step(state, trainer.frozen, sharding.global_batch(batch, trainer.mesh))
  return jax.device_get(state.params)


def _assert_params_file_equals(path, ref) -> None:
  got = np.load(path)
  leaves = jax.tree_util.tree_leaves_with_path(ref)
  assert sorted(got.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
  for p, x in leaves:
    np.testing.assert_allclose(got[jax.tree_util.keystr(p)], x, atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(p))


# The default run covers this path with the SIGTERM test below: two processes over gloo train,
# save collectively, resume and end with the one-process reference's weights.
@pytest.mark.slow
def test_two_processes_over_gloo_equal_one_process(tmp_path):
  port = _free_port()
  with Workers() as workers:
    procs = [workers.start(["multiprocess", tmp_path / "run", tmp_path / "params.npz"],
                           _two_process_env(port, i), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(logs)
  # Both processes took part in one run: 4 global devices, checkpoints at steps 3 and 5.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), create=False)
  assert ckpt.manager.all_steps() == [3, 5]
  ckpt.close()
  # One process, 4 devices, the same mesh and the same global batches.
  _assert_params_file_equals(tmp_path / "params.npz", _one_process_reference(5))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_preemption_sync_point(tmp_path):
  """SIGTERM reaches process 1 only. The JAX distributed runtime (on CPU too) catches it and
  ``reached_preemption_sync_point`` turns true at the same step on both processes: both save
  that step and exit 0; rerunning both finishes the run with the weights of an uninterrupted
  one."""
  steps = 8
  args = ["slow_multiprocess", tmp_path / "run", tmp_path / "params.npz"]
  env = dict(STEPS=str(steps))  # no shared compilation cache (see _worker_env)
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  with Workers() as workers:
    port = _free_port()
    procs = [workers.start(args, _two_process_env(port, i, **env), stdout=open(logs[i], "w"),
                           stderr=subprocess.STDOUT) for i in range(2)]
    deadline = time.time() + 600
    while f"step 2/{steps}" not in logs[0].read_text():
      assert time.time() < deadline and procs[0].poll() is None, logs[0].read_text()
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=600)
    text = [f.read_text() for f in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(text)
    sync = re.search(r"preemption sync point of the JAX distributed runtime reached at step (\d+)",
                     text[0])
    assert sync, text[0]  # the runtime's notice, not the fallback flag, stopped the run
    stopped = int(sync.group(1))
    assert 2 <= stopped < steps and f"preempted: saved step {stopped}" in text[0], text[0]
    assert ckpt_lib.saved_steps(str(tmp_path / "run")) == [stopped]

    port = _free_port()
    logs = [tmp_path / f"process_{i}_rerun.log" for i in range(2)]
    procs = [workers.start(args, _two_process_env(port, i, **env), stdout=open(logs[i], "w"),
                           stderr=subprocess.STDOUT) for i in range(2)]
    for p in procs:
      p.wait(timeout=600)
    text = [f.read_text() for f in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(text)
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / str(stopped)}" in text[0], text[0]
    for t in text:
      assert f"finished at step {steps}" in t, t
  _assert_params_file_equals(tmp_path / "params.npz", _one_process_reference(steps))


def test_distributed_plan_from_environment():
  assert distributed.plan({}) is None
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "t1k-0"}) is None  # single-host TPU VM
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}) == {}  # pod: auto
  assert distributed.plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
  assert distributed.plan({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.plan({"MMSR_COORDINATOR": "10.0.0.1:1234", "MMSR_NUM_PROCESSES": "4",
                           "MMSR_PROCESS_ID": "3", "MMSR_LOCAL_DEVICE_IDS": "0,1"}) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
      "local_device_ids": [0, 1]}
  with pytest.raises(ValueError, match="MMSR_PROCESS_ID is not"):
    distributed.plan({"MMSR_COORDINATOR": "h:1", "MMSR_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"MMSR_PROCESS_ID=2 is not in \[0, MMSR_NUM_PROCESSES=2\)"):
    distributed.plan({"MMSR_COORDINATOR": "h:1", "MMSR_NUM_PROCESSES": "2",
                      "MMSR_PROCESS_ID": "2"})


# --- FLOPs and the benchmark ----------------------------------------------------------------------
def test_analytic_flops_match_xla_cost_analysis():
  """The config-derived forward count against XLA's count of the compiled forward pass (which
  also counts element-wise work, hence the tolerance)."""
  c = small_config(**{"model.width": 256, "model.num_heads": 4, "model.context_heads": 4,
                      "data.hr_size": 64, "model.context_latents": 32})
  model = build.mmsr(c)
  cond = build.conditioner(c)
  inputs = dummy_inputs(c, cond, batch=2)
  params = jax.eval_shape(lambda r: nn_unbox(model.init(r, *inputs)["params"]), jax.random.key(0))
  with layers.unrolled_scans():  # XLA's cost analysis counts a loop body once
    cost = jax.jit(lambda p, *x: model.apply({"params": p}, *x)).lower(params, *inputs).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = 2 * sum(flops.mmsr_forward_flops(c).values())
  assert analytic == pytest.approx(cost["flops"], rel=0.05)
  assert flops.mmsr_train_flops_per_step(c) == 3 * analytic / 2 * c.batch_size


def test_bench_train_reports_step_time_images_per_s_and_mfu():
  from mmsr_jax.benches import train_speed as bench_train
  c = small_config()
  c.mesh.data = 1
  c.mesh.fsdp = -1
  # (XLA's FLOP count of the step is tested through ``bench train --analyze`` in test_bench.)
  r = bench_train.measure(c, peak_flops=1e12, repeats=2, warmup=1, devices=jax.devices()[:2])
  assert flops.peak_flops_per_device() is None  # CPU: no MFU unless a peak is given
  assert r["step_time_s"] > 0
  assert r["images_per_s"] == pytest.approx(c.batch_size / r["step_time_s"])
  assert r["mfu"] == pytest.approx(
      flops.mmsr_train_flops_per_step(c) / r["step_time_s"] / (2 * 1e12))
  assert r["model_tflops_per_step"] > 0
  assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}


# --- Launch scripts -------------------------------------------------------------------------------
def _sh(*args, env=None):
  return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed "
                    "(pip install -r requirements-test.txt)")
def test_launch_scripts_pass_shellcheck():
  scripts = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
  assert len(scripts) >= 3
  r = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_vm_dry_runs_print_the_gcloud_commands():
  env = {"TPU_NAME": "mmsr-pod", "TPU_ZONE": "us-central2-b", "TPU_TYPE": "v4-32",
         "TPU_PROJECT": "my-proj", "TPU_RUNTIME": "tpu-ubuntu2204-base",
         "WORKDIR": "gs://bucket/runs/dit_l"}
  out = {}
  for cmd in ("create", "setup", "train", "logs", "delete"):
    r = _sh("launch/tpu_vm.sh", cmd, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    out[cmd] = r.stdout
  where = "--zone=us-central2-b --project=my-proj"
  check, create = out["create"].strip().splitlines()
  assert check == ("python3 -m mmsr_jax.aot --config=configs/dit_l.py --topology=v4-32 "
                   "--count_flops=model --require_fit")  # the fit check comes first
  assert create == (
      f"gcloud compute tpus tpu-vm create mmsr-pod {where} --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base")
  assert "gcloud compute tpus tpu-vm scp /tmp/mmsr-jax-" in out["setup"]
  assert f"mmsr-pod:mmsr-jax.tar.gz {where} --worker=all" in out["setup"]
  assert f"gcloud compute tpus tpu-vm ssh mmsr-pod {where} --worker=all --command=" in out["setup"]
  assert "pip install -q -r requirements-tpu.txt" in out["setup"]
  assert (f"gcloud compute tpus tpu-vm ssh mmsr-pod {where} --worker=all --command="
          in out["train"])
  assert ("python3 -m mmsr_jax.train --config=configs/dit_l.py "
          "--workdir=gs://bucket/runs/dit_l" in out["train"])
  assert "nohup" in out["train"]  # detached: survives the ssh session
  assert "--worker=0 --command=" in out["logs"] and "tail" in out["logs"]
  assert out["delete"].strip() == f"gcloud compute tpus tpu-vm delete mmsr-pod {where} --quiet"
  # Extra arguments go to the trainer; the spot/preemptible flag to create.
  r = _sh("launch/tpu_vm.sh", "train", "--dry-run", "--config.batch_size=512",
          env=dict(env, CONFIG="configs/dit_xl.py"))
  assert "--config=configs/dit_xl.py" in r.stdout and "--config.batch_size=512" in r.stdout
  # The table's remat for a config that needs 'full' on that slice, before the user's overrides.
  r = _sh("launch/tpu_vm.sh", "create", "--dry-run",
          env=dict(env, CONFIG="configs/dit_xl.py", TPU_TYPE="v6e-4"))
  assert r.stdout.startswith("python3 -m mmsr_jax.aot --config=configs/dit_xl.py --topology=v6e-4 "
                             "--count_flops=model --require_fit --config.model.remat=full\n")
  r = _sh("launch/tpu_vm.sh", "train", "--dry-run", "--config.model.remat=dots",
          env=dict(env, CONFIG="configs/dit_l.py", TPU_TYPE="v4-8"))
  assert "--config.model.remat=full --config.model.remat=dots" in r.stdout
  r = _sh("launch/tpu_vm.sh", "create", "--dry-run", env=dict(env, TPU_SPOT="1"))
  assert r.stdout.strip().endswith("--spot")
  r = _sh("launch/tpu_vm.sh", "create", "--dry-run", env=dict(env, AOT_CHECK="0"))
  assert r.stdout.startswith("gcloud compute tpus tpu-vm create")
  r = _sh("launch/tpu_vm.sh", "bogus", "--dry-run", env=env)
  assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_tpu_vm_create_refuses_a_config_that_does_not_fit(tmp_path):
  """The real fit check (an ahead-of-time compile for the slice) runs before gcloud; a config
  that does not fit is one error line and no VM."""
  calls = tmp_path / "gcloud_calls"
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "gcloud").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
  (fake / "gcloud").chmod(0o755)
  env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "TPU_PROJECT": "p",
         "TPU_TYPE": "v5litepod-4", "CONFIG": "configs/tiny.py", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  r = subprocess.run(["bash", "launch/tpu_vm.sh", "create", "--config.batch_size=32768"],
                     cwd=REPO, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, **env))
  assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
  assert "does not fit v5litepod-4" in r.stderr and "Traceback" not in r.stderr
  assert not calls.exists()  # no VM was created


def test_gpu_multinode_dry_run_prints_one_command_per_node():
  r = _sh("launch/train_gpu_multinode.sh", "--dry-run", "configs/dit_l.py", "/runs/x",
          env={"NODES": "node0,node1", "COORDINATOR_PORT": "8476"})
  assert r.returncode == 0, r.stderr
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ssh ")]
  assert len(lines) == 2
  for i, (node, line) in enumerate(zip(("node0", "node1"), lines)):
    assert line.startswith(f"ssh {node} ")
    assert (f"MMSR_COORDINATOR=node0:8476 MMSR_NUM_PROCESSES=2 MMSR_PROCESS_ID={i}" in line)
    assert "python3 -m mmsr_jax.train --config=configs/dit_l.py --workdir=/runs/x" in line
