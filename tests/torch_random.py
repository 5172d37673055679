"""Random weights for the PyTorch reference models of the parity tests.

A parity test is only as strong as its weights: with torch's default init every GroupNorm /
LayerNorm / RMSNorm weight is 1 and every bias 0, so an importer that swaps two norms (or drops a
bias) still matches. :func:`randomise_` gives every parameter and every saved floating buffer
(norm weights and biases, codebooks, embeddings, tables) values of its own; :func:`swapped`
makes the wrong mapping that a test must be able to see.
"""

from __future__ import annotations

import numpy as np


def randomise_(module, seed: int = 0, keep: tuple[str, ...] = ()) -> dict[str, str]:
  """Overwrites every floating parameter and saved buffer of a torch ``module`` in place.

  A tensor initialised to one constant (a norm's weight of ones, a bias of zeros) becomes that
  constant plus noise of half its size (at least 0.1): norm weights land around 1 +- 0.5, biases
  around 0 +- 0.1, so signals keep their scale through deep stacks. Any other tensor (a conv
  kernel, an embedding, a codebook) is redrawn from a normal distribution of its own mean and
  standard deviation. ``keep``: name fragments of tensors left alone (e.g. a fixed sin-cos
  table both sides compute), each to be named in the test with a reason.

  Returns ``{name: "constant" | "random"}`` of the tensors changed, so a test can check that
  the kinds it cares about (norms, biases) were among them.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  saved = set(module.state_dict().keys())  # persistent buffers only, tied weights once
  tensors = dict(module.named_parameters())
  tensors.update({n: b for n, b in module.named_buffers() if n in saved})
  changed = {}
  with torch.no_grad():
    for name, t in sorted(tensors.items()):
      if not t.is_floating_point() or t.numel() == 0 or any(k in name for k in keep):
        continue
      noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
      flat = t.detach().float().reshape(-1)
      if bool((flat == flat[0]).all()):
        c = float(flat[0])
        t.copy_(c + max(0.5 * abs(c), 0.1) * noise)
        changed[name] = "constant"
      else:
        t.copy_(flat.mean() + flat.std() * noise)
        changed[name] = "random"
  return changed


def state_dict_numpy(module) -> dict[str, np.ndarray]:
  """The module's ``state_dict()`` as float32 / integer NumPy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def swapped(sd: dict[str, np.ndarray], a: str, b: str) -> dict[str, np.ndarray]:
  """A copy of a state dict with the tensors of every key ending in ``a`` and the matching key
  ending in ``b`` exchanged where their shapes agree (e.g. ``norm1.weight`` / ``norm2.weight``
  of each resnet): the mistake an importer that mixes up two names would make."""
  out = dict(sd)
  pairs = [(k, k[: -len(a)] + b) for k in sd if k.endswith(a)]
  pairs = [(ka, kb) for ka, kb in pairs if kb in sd and sd[ka].shape == sd[kb].shape]
  assert pairs, f"no pair of keys ending in {a!r} / {b!r} with one shape"
  for ka, kb in pairs:
    out[ka], out[kb] = sd[kb], sd[ka]
  return out
