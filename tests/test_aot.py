"""Ahead-of-time compiles for TPU slices on this CPU host (libtpu's compile-only client): the tiny
config's train step and sampler for v5e:2x2, a setting that does not fit reported as a result,
the flash kernel under shard_map equal to XLA's attention, the batch search, the collectives
count, and a saved train step that training loads instead of compiling."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import small_config
from mmsr_jax import programs
from mmsr_jax.models import layers
from mmsr_jax.runtime import compiled as compiled_lib
from mmsr_jax.runtime import sharding
from mmsr_jax.runtime import topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config at 128 px: 256 DiT tokens, so the flash kernel takes the self-attention.
TINY = ("--config=configs/tiny.py", "--config.data.hr_size=128")


def _libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


needs_libtpu = pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -r "
                                  "requirements-tpu.txt)")
needs_cuda_plugin = pytest.mark.skipif(
    topology._cuda_plugin() is None,
    reason="JAX's CUDA plugin not installed (pip install -r requirements-gpu.txt)")


def _aot(tmp_path, *args, name="report.json"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = str(tmp_path / name)
  r = subprocess.run([sys.executable, "-m", "mmsr_jax.aot", *args, f"--json={out}"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return json.load(open(out)), r.stdout


@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_2x2_with_flash_under_shard_map(tmp_path):
  rep, out = _aot(tmp_path, *TINY, "--topology=v5e:2x2", "--count_flops=model")
  assert rep["fits"] is True and rep["devices"] == 4 and rep["device_kind"] == "TPU v5 lite"
  assert rep["attention"] == "flash"  # auto, resolved for the slice, not for this CPU host
  assert rep["hbm_bytes"] == 16 * 2 ** 30
  for k in ("argument_bytes", "output_bytes", "temp_bytes", "code_bytes", "peak_bytes"):
    assert rep[k] > 0, k
  assert rep["alias_bytes"] > 0  # the state is donated
  assert rep["peak_bytes"] == (rep["argument_bytes"] + rep["output_bytes"] - rep["alias_bytes"]
                               + rep["temp_bytes"] + rep["code_bytes"])
  assert rep["per_chip_batch"] == 4 and rep["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert set(rep["collectives"]) == set(compiled_lib.COLLECTIVES)
  assert rep["collectives"]["all-reduce"]["count"] > 0  # data-parallel gradients
  assert 0 < rep["projected_mfu"] <= 1
  assert "not measured on the chip" in rep["projection"]
  assert "fits: True" in out


@needs_libtpu
def test_tiny_sampler_compiles_for_v5e_2x2_with_the_tiled_output(tmp_path):
  rep, _ = _aot(tmp_path, *TINY, "--topology=v5e:2x2", "--program=sample",
                "--sample_size=128", "--sample_steps=2", "--sample_large=512")
  assert rep["fits"] is True and rep["program"] == "sample" and rep["attention"] == "flash"
  assert rep["per_chip_batch"] == 1 and rep["output"] == "128x128"
  large = rep["large_output"]
  assert large["output"] == "512x512" and large["chips"] == 1 and large["fits"] is True
  assert large["peak_bytes"] > 0


@needs_libtpu
def test_a_setting_that_does_not_fit_is_a_result(tmp_path):
  rep, out = _aot(tmp_path, "--config=configs/tiny.py", "--topology=v5e:2x2",
                  "--count_flops=model", "--per_chip_batch=8192")
  assert rep["fits"] is False
  assert rep["wanted_bytes"] > rep["limit_bytes"] > 15 * 2 ** 30  # XLA's own numbers
  assert "remat" in rep["advice"] and "batch" in rep["advice"]
  assert "RESOURCE_EXHAUSTED" in rep["error"] and "Traceback" not in out


@needs_libtpu
def test_auto_attention_and_the_mesh_order_follow_the_target_devices():
  from mmsr_jax.runtime import topology
  from mmsr_jax.system import System
  c = small_config(**{"data.hr_size": 128, "batch_size": 16, "mesh.data": 1, "mesh.fsdp": -1})
  tpu = topology.devices("v5e:4x4")
  assert jax.default_backend() == "cpu"
  system = System.from_config(c, tpu)
  assert system.model.attention == "flash"
  assert System.from_config(c, jax.devices()[:1]).model.attention == "xla"
  from jax.experimental import mesh_utils
  physical = mesh_utils.create_device_mesh((1, 16, 1), tpu)
  assert [d.id for d in system.mesh.devices.flat] == [d.id for d in physical.flat]
  assert topology.cloud_accelerator_type("v5e:4x4") == "v5litepod-16"
  assert topology.cloud_accelerator_type("v4:2x2x1") == "v4-8"
  with pytest.raises(ValueError, match="GENERATION"):
    topology.parse("v9:2x2")


def test_gpu_names_describe_the_part_to_xla(monkeypatch):
  chip, dims = topology.parse("h100:8")
  assert chip.name == "h100" and chip.gpu and dims == (1, 8)
  assert topology.parse("h200:2x8")[1] == (2, 8)
  with pytest.raises(ValueError, match="GPU:"):
    topology.parse("h100:")
  target = topology.gpu_target_config(topology.GPUS["h100"])
  assert "core_count: 132 " in target and f"device_memory_size: {81559 * 2 ** 20} " in target
  assert "cuda_compute_capability { major: 9 minor: 0 }" in target
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in target

  class Gpu:
    device_kind, platform = "NVIDIA H200", "gpu"
  assert topology.chip_of([Gpu()]) is topology.GPUS["h200"].chip
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert topology.GPUS["h100"].chip.usable_bytes() == int(0.75 * 81559 * 2 ** 20)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert topology.GPUS["h100"].chip.usable_bytes() == int(0.9 * 81559 * 2 ** 20)
  assert topology.CHIPS["v5e"].usable_bytes() == 16 * 2 ** 30


@needs_cuda_plugin
def test_tiny_train_step_compiles_for_gpus_with_cudnn_attention_split_by_the_mesh(tmp_path):
  """Four H100s described to XLA's CUDA compiler without a GPU: ``auto`` attention is cuDNN's
  fused kernel, and under FSDP each GPU's kernel call takes its own quarter of the batch (XLA
  partitions the kernel; nothing gathers the batch around it)."""
  hlo = tmp_path / "step.hlo"
  rep, out = _aot(tmp_path, *TINY, "--topology=h100:4", "--count_flops=model",
                  "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                  "--config.compute_dtype=bfloat16", f"--hlo={hlo}")
  assert rep["device_kind"] == "NVIDIA H100 80GB HBM3" and rep["devices"] == 4
  assert rep["attention"] == "cudnn" and rep["fits"] is True
  assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and rep["per_chip_batch"] == 4
  assert rep["limit_bytes"] < rep["hbm_bytes"]  # JAX's allocator share of the GPU
  assert rep["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
  text = hlo.read_text()
  calls = re.findall(r"= \((\w+)\[(\d+),[^=]*?custom-call\([^\n]*__cudnn\$fmha", text)
  assert calls and {int(b) for _, b in calls} == {4}, calls  # 16 images, 4 per GPU
  assert "fits: True" in out


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (1, 2, 2)])
def test_flash_under_shard_map_equals_xla_attention(mesh_shape):
  """The TPU kernel run in Pallas' TPU interpret mode on 4 CPU devices: outputs and gradients
  of every input equal XLA's attention with the batch and heads split as the mesh says."""
  import ml_collections
  from jax.experimental.pallas import tpu as pltpu
  cfg = ml_collections.ConfigDict({"mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
                                   "batch_size": 4})
  mesh = sharding.make_mesh(cfg, jax.devices()[:4])
  rng = np.random.default_rng(0)
  q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((4, 256, 4, 32)), jnp.float32),
                            sharding.batch_sharding(mesh)) for _ in range(3))

  def loss(impl, q, k, v):
    with sharding.activation_rules(mesh):
      o = layers.attention(q, k, v, implementation=impl)
    return jnp.sum(o * jnp.cos(o)), o

  grad = lambda impl: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))
  with pltpu.force_tpu_interpret_mode():
    (_, out_flash), g_flash = grad("flash")(q, k, v)
    text = jax.jit(lambda *a: loss("flash", *a)[1]).lower(q, k, v).as_text()
  (_, out_xla), g_xla = grad("xla")(q, k, v)
  assert "manual_computation" in text or "shard_map" in text  # the kernel ran per device
  np.testing.assert_allclose(out_flash, out_xla, atol=2e-5)
  for a, b in zip(g_flash, g_xla):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_flash_takes_only_the_lengths_it_tiles():
  assert layers.flash_fits(256, 128) and layers.flash_fits(1024, 1024)
  assert not layers.flash_fits(64, 128) and not layers.flash_fits(1024, 77)


def test_batch_search_finds_the_largest_fitting_batch_in_few_compiles():
  limit = 15.75 * 2 ** 30

  def fake(fixed, per):
    calls = []

    def try_batch(b):
      calls.append(b)
      used = fixed + per * b
      r = {"per_chip_batch": b, "fits": used <= limit}
      r["peak_bytes" if r["fits"] else "wanted_bytes"] = used
      if not r["fits"]:
        r["limit_bytes"] = limit
      return r
    return try_batch, calls

  for fixed, per, start in ((2e9, 0.8e9, 16), (1e9, 0.31e9, 1), (3e9, 1.1e9, 64),
                            (20e9, 1e9, 4)):
    try_batch, calls = fake(fixed, per)
    best, tried = programs.search_batch(try_batch, start=start, limit=1024)
    want = max(0, int((limit - fixed) // per))
    assert best == want, (fixed, per, start)
    assert best == 0 or try_batch(best)["fits"] and not try_batch(best + 1)["fits"]
    assert len(set(calls)) <= 9, calls
    assert [r["per_chip_batch"] for r in tried] == sorted(r["per_chip_batch"] for r in tried)

  # A batch that the encode passes do not divide makes XLA move the batch between chips: with
  # `step` the search tries only multiples of it, so such a batch cannot stop it early.
  def passes(b):
    r = fake(1e9, 0.3e9)[0](b)
    return r if b % 4 == 0 else {"per_chip_batch": b, "fits": False, "wanted_bytes": 40e9,
                                 "limit_bytes": limit}
  best, tried = programs.search_batch(passes, start=16, limit=1024, step=4)
  assert best == int((limit - 1e9) // 0.3e9) // 4 * 4
  assert all(r["per_chip_batch"] % 4 == 0 for r in tried)
  assert programs.search_batch(passes, start=6, limit=1024, step=4)[0] == best
  assert programs.search_batch(passes, start=16, limit=1024)[0] < best


def test_collectives_in_a_loop_body_count_its_trip_count():
  hlo = """HloModule m, is_scheduled=true

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  %all-gather.1 = bf16[8,128]{1,0:T(8,128)} all-gather(%x), channel_id=1, dimensions={0}
  %all-reduce-start.2 = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-reduce-start(%y), to_apply=%add
  ROOT %t = (s32[], bf16[8,128]) tuple(%i, %all-gather.1)
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %c = s32[]{:T(128)} constant(24)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[8,128]) -> bf16[8,128] {
  %w = (s32[], bf16[8,128]) while(%init), condition=%cond, body=%body
  %reduce-scatter.3 = f32[2,4]{1,0} reduce-scatter(%z), dimensions={0}, to_apply=%add
  ROOT %r = bf16[8,128] get-tuple-element(%w), index=1
}
"""
  got = compiled_lib.collectives(hlo)
  assert got["all-gather"] == {"instructions": 1, "count": 24, "bytes": 24 * 8 * 128 * 2}
  assert got["all-reduce"] == {"instructions": 1, "count": 24, "bytes": 24 * 16 * 4}
  assert got["reduce-scatter"] == {"instructions": 1, "count": 1, "bytes": 8 * 4}
  assert got["all-to-all"]["count"] == got["collective-permute"]["count"] == 0
  # XLA:GPU keeps the bound in a fused compare and records the trip count on the loop instead.
  gpu = (hlo.replace("%c = s32[]{:T(128)} constant(24)", "%c = s32[] parameter(1)")
         .replace("condition=%cond, body=%body",
                  'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}'))
  got = compiled_lib.collectives(gpu)
  assert got["all-gather"]["count"] == got["all-reduce"]["count"] == 12


def test_out_of_memory_messages_give_the_bytes():
  e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                   "HLO temporaries (75.21G) exceeds available HBM (15.75G).")
  oom = compiled_lib.out_of_memory(e)
  assert oom["wanted_bytes"] == int(75.21 * 2 ** 30) and oom["limit_bytes"] == int(15.75 * 2 ** 30)
  assert compiled_lib.out_of_memory(ValueError("something else")) is None


def test_a_saved_train_step_is_loaded_by_training_and_a_stale_one_compiled(tmp_path):
  overrides = ["--config.num_train_steps=2", "--config.checkpoint_every=2",
               "--config.eval.sample_ablation=False", "--config.batch_size=4",
               "--config.data.hr_size=32", "--config.data.eval_size=32",
               "--config.data.map_size=16", "--config.model.width=64", "--config.model.depth=2",
               "--config.model.num_heads=4", "--config.model.context_latents=8",
               "--config.eval.steps=2", "--config.eval.val_batches=1"]
  exe = str(tmp_path / "step.exe")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, env=env,  # noqa: E731
                                  capture_output=True, text=True, timeout=600)
  r = run("mmsr_jax.aot", "--config=configs/tiny.py", "--topology=host", "--count_flops=model",
          f"--save_executable={exe}", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  key = json.load(open(exe + ".json"))
  assert key["platform"] == "cpu" and len(key["fingerprint"]) == 64
  again = run("mmsr_jax.aot", "--config=configs/tiny.py", "--topology=host", "--count_flops=model",
              f"--save_executable={exe}", *overrides)
  assert again.returncode == 2 and "--overwrite" in again.stderr  # never replaced silently

  losses = {}
  for name, extra in (("loaded", [f"--config.compiled_step={exe}"]), ("compiled", []),
                      ("stale", [f"--config.compiled_step={exe}", "--config.optimizer.lr=1e-3"])):
    r = run("mmsr_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / name}",
            *overrides, *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    losses[name] = [ln.split("loss ")[1].split()[0] for ln in r.stdout.splitlines()
                    if "step 2/2" in ln]
    if name == "loaded":
      assert "loaded, compile skipped" in r.stdout
    if name == "stale":
      assert "not used, it is another program" in r.stdout and "compile skipped" not in r.stdout
  assert losses["loaded"] == losses["compiled"] and losses["loaded"]


def test_a_tampered_executable_is_not_loaded(tmp_path):
  from mmsr_jax.runtime import executable
  c = small_config(**{"batch_size": 1})
  step, args, _, system = programs.train_program(c, jax.devices()[:1])
  lowered = step.lower(*args)
  path = str(tmp_path / "s.exe")
  executable.save(path, lowered.compile(), lowered, jax.devices()[:1])
  logged = []
  assert executable.load(path, lowered, jax.devices()[:1], logged.append) is not None
  with open(path, "r+b") as f:  # one byte changed: the payload no longer matches its key
    f.seek(100)
    b = f.read(1)
    f.seek(100)
    f.write(bytes([b[0] ^ 1]))
  assert executable.load(path, lowered, jax.devices()[:1], logged.append) is None
  assert "payload_sha256" in logged[-1]


def test_cpu_paths_never_import_libtpu():
  code = ("import sys, jax\n"
          "from tests.conftest import small_config\n"
          "from mmsr_jax.system import System\n"
          "from mmsr_jax import programs\n"
          "import mmsr_jax.train, mmsr_jax.sample, mmsr_jax.aot\n"
          "System.from_config(small_config(), jax.devices()[:1])\n"
          "assert 'libtpu' not in sys.modules, 'libtpu imported'\n"
          "print('ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [REPO, os.path.join(REPO, "tests")]))
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@needs_libtpu
@pytest.mark.skipif(topology._tpu_chip_attached(), reason="a TPU chip is attached to this host")
def test_a_command_on_a_cpu_host_does_not_load_libtpu():
  """With libtpu installed but no TPU, a command must not bring up JAX's TPU backend: libtpu
  would be loaded into the process and log its metadata-server warnings."""
  code = ("import sys\n"
          "from mmsr_jax import cli\n"
          "def main(argv):\n"
          "  import jax\n"
          "  print(jax.devices()[0].platform)\n"
          "  print('libtpu' in open('/proc/self/maps').read())\n"
          "cli.run(main)\n")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE",
                                                           "TPU_WORKER_HOSTNAMES")}
  env["PYTHONPATH"] = REPO
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["cpu", "False"], (r.stdout, r.stderr[-2000:])
  assert "TPU_ACCELERATOR_TYPE" not in r.stderr and "TPU_WORKER_HOSTNAMES" not in r.stderr
