"""A compiled train step saved to a file and loaded at the start of training to skip the
compile (at start and after each preemption on a slice whose compile takes minutes).

The file is jax's serialized executable (``jax.experimental.serialize_executable``) beside a
JSON key: the SHA-256 of the lowered program's text (so the config, shapes, shardings and jax
version all have to match), the device kind and count, the backend's platform version (libtpu)
and the payload's own SHA-256. Loading checks the key first; anything that differs is one logged
line and a normal compile. The payload is read with an unpickler that admits only the classes a
jax executable is made of; an executable is machine code all the same: load only files your own
``python -m mmsr_jax.aot`` wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from typing import Callable

KEY_SUFFIX = ".json"
# What a jax executable's pickle may name: classes of jax / jaxlib (shardings, meshes, avals,
# the unloaded executable), plain builtin and numpy types, and these reconstructor functions.
_NAMESPACES = ("jax", "jaxlib")
_RECONSTRUCTORS = {("jax._src.named_sharding", "_unpickle_named_sharding"),
                   ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("copyreg", "_reconstructor")}
_PLAIN_MODULES = ("builtins", "numpy", "collections", "ml_dtypes")


def program_fingerprint(lowered) -> str:
  """SHA-256 of a lowered program's text: equal only for the same computation, shapes,
  shardings and jax version."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _device_key(devices) -> dict:
  d = devices[0]
  return {"device_kind": d.device_kind, "platform": d.platform, "devices": len(devices),
          "platform_version": getattr(d.client, "platform_version", "")}


def save(path: str, compiled, lowered, devices, *, description: dict | None = None) -> dict:
  """Writes ``compiled`` to ``path`` and its key to ``path + '.json'`` (temporary names, then
  renamed, so a crash leaves no half file). Refuses to overwrite (the caller checks first)."""
  from jax.experimental import serialize_executable
  payload, _, _ = serialize_executable.serialize(compiled)
  key = {"fingerprint": program_fingerprint(lowered), **_device_key(devices),
         "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload),
         **(description or {})}
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  for target, data in ((path, payload), (path + KEY_SUFFIX,
                                         json.dumps(key, indent=1).encode())):
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, target)
  return key


def _unpickler(file, backend):
  """jax's executable unpickler (devices and the executable itself come through its persistent
  ids) admitting only the classes an executable is made of."""
  from jax.experimental import serialize_executable

  class Restricted(serialize_executable._JaxPjrtUnpickler):
    def find_class(self, module, name):
      if (module, name) in _RECONSTRUCTORS:
        return super().find_class(module, name)
      if module.split(".")[0] in _NAMESPACES or module in _PLAIN_MODULES:
        obj = super().find_class(module, name)
        if isinstance(obj, type) and obj is not type:  # a class, never a function to call
          return obj
      raise pickle.UnpicklingError(f"{module}.{name} is not part of a jax executable")

  # every device of the backend, as jax's own loader assumes (device ids in the file refer to
  # them, whatever the mesh order)
  return Restricted(file, backend, backend.devices())


def load(path: str, lowered, devices, log: Callable[[str], None]):
  """The compiled program saved at ``path`` if its key matches ``lowered`` on ``devices``, else
  None after one line through ``log`` saying why (the caller then compiles as usual)."""
  key_path = path + KEY_SUFFIX
  try:
    with open(key_path) as f:
      key = json.load(f)
    with open(path, "rb") as f:
      payload = f.read()
  except (OSError, ValueError) as e:
    log(f"compiled step {path}: not used ({e}); compiling")
    return None
  want = {"fingerprint": program_fingerprint(lowered), **_device_key(devices),
          "payload_sha256": hashlib.sha256(payload).hexdigest()}
  diff = [k for k, v in want.items() if key.get(k) != v]
  if diff == ["fingerprint"]:
    log(f"compiled step {path}: not used, it is another program (compile it with this run's "
        "config and the same --config overrides: python -m mmsr_jax.aot ... "
        "--save_executable); compiling")
    return None
  if diff:
    shown = ", ".join(f"{k} {str(key.get(k))[:24]!r} != {str(want[k])[:24]!r}" for k in diff)
    log(f"compiled step {path}: not used, it was compiled for another program or machine "
        f"({shown}); compiling")
    return None
  try:
    import jax
    unloaded, args_info_flat, no_kwargs = _unpickler(io.BytesIO(payload),
                                                     devices[0].client).load()
    args_info = lowered.in_tree.unflatten(args_info_flat)
    return jax.stages.Compiled(unloaded.load(), [], args_info, lowered.out_tree,
                               no_kwargs=no_kwargs)
  except Exception as e:  # another libtpu / jaxlib that cannot read it: compile as usual
    log(f"compiled step {path}: not used, loading failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}); compiling")
    return None
