"""Caption tokenizers: ``byte`` (ByT5's byte rule, no vocabulary file, for the tiny config and tests)
or a transformers tokenizer from a folder / hub id (T5 for the research configs); both give
fixed-length int32 ids and a mask.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


class ByteTokenizer:
  """ByT5-style byte tokenizer: id = byte + 3, terminated by EOS, right-padded with PAD."""

  vocab_size = BYTE_VOCAB_SIZE

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")][: length - 1] + [EOS_ID]
    out = np.full((length,), PAD_ID, np.int32)
    out[: len(ids)] = ids
    mask = (np.arange(length) < len(ids)).astype(np.int32)
    return out, mask


class HFTokenizer:
  """Wraps a `transformers` tokenizer loaded from a local folder or a hub id."""

  def __init__(self, name_or_path: str):
    from transformers import AutoTokenizer  # imported lazily: only the dit_* configs need it

    try:
      self._tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - re-raised with the field that names the path
      raise ValueError(
          f"config.text.tokenizer={name_or_path!r}: could not load a tokenizer from it ({e}). "
          "Give a local folder holding tokenizer files (e.g. a T5 checkpoint) or 'byte'."
      ) from e
    self.vocab_size = len(self._tok)

  def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = self._tok(text, max_length=length, padding="max_length", truncation=True,
                    return_tensors="np")
    return enc["input_ids"][0].astype(np.int32), enc["attention_mask"][0].astype(np.int32)


def make_tokenizer(kind: str):
  """Returns the tokenizer named by ``config.text.tokenizer``."""
  if kind == "byte":
    return ByteTokenizer()
  return HFTokenizer(kind)
