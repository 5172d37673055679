"""The annotator end to end with tiny random-config Depth Anything, Mask2Former and BLIP models
built here (saved as safetensors, loaded back from folders), and the shards it writes read by the
training sr_examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from mmsr_jax.data import sources  # noqa: E402
from mmsr_jax.data.captions import make_tokenizer  # noqa: E402
from mmsr_jax.schema.sr import sr_config
from mmsr_jax.formats import records
from tests.conftest import apply_overrides
from mmsr_jax.formats.records import list_shards
from mmsr_jax.data import annotator
from mmsr_jax.data import sr_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from mmsr_jax.data.tiny_annotators import VOCAB, build_tiny_annotators as _build_models  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return _build_models(str(tmp_path_factory.mktemp("models")))


def _images(root, n: int) -> None:
  rng = np.random.default_rng(0)
  for i in range(n):
    sub = os.path.join(str(root), f"part{i % 2}")
    os.makedirs(sub, exist_ok=True)
    base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((64, 48), Image.BICUBIC)
    img.save(os.path.join(sub, f"img{i}.png"))


def test_annotate_one_interface(models):
  ann = annotator.Annotator(depth=models["depth"], seg=models["seg"], caption=models["caption"],
                           caption_kind="blip", device="cpu")
  assert ann.modalities == ("edge", "depth", "seg", "caption")
  img = np.random.default_rng(1).integers(0, 255, (20, 28, 3), np.uint8)
  out = ann.annotate_one(img)
  assert set(out) == {"edge", "depth", "seg", "caption"}
  assert out["edge"].shape == out["depth"].shape == out["seg"].shape == (20, 28)
  assert out["depth"].dtype == np.float32 and 0 <= out["depth"].min() <= out["depth"].max() <= 1
  assert out["depth"].max() == 1.0 and out["depth"].min() == 0.0  # normalised per image
  assert out["seg"].dtype == np.int32 and 0 <= out["seg"].min() and out["seg"].max() < 7
  assert set(np.unique(out["edge"])) <= {0.0, 1.0}
  assert isinstance(out["caption"], str) and out["caption"]
  assert set(out["caption"].split()) <= set(VOCAB[6:])
  # The same image twice in a batch gets the same annotations.
  a, b = ann.annotate_batch([img, img])
  np.testing.assert_allclose(a["depth"], b["depth"], atol=1e-5)
  assert a["caption"] == b["caption"]
  # Mixed sizes in one batch (different depth-model input shapes): each keeps its own size.
  tall = np.random.default_rng(2).integers(0, 255, (40, 16, 3), np.uint8)
  c, d = ann.annotate_batch([img, tall])
  assert c["depth"].shape == c["seg"].shape == (20, 28)
  assert d["depth"].shape == d["seg"].shape == d["edge"].shape == (40, 16)
  np.testing.assert_allclose(c["depth"], a["depth"], atol=1e-5)
  only_edges = annotator.Annotator()
  assert set(only_edges.annotate_one(img)) == {"edge"}
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    only_edges.annotate_one(img.astype(np.float32))
  with pytest.raises(FileNotFoundError, match="depth model folder"):
    annotator.Annotator(depth="./no/such/model")
  with pytest.raises(ValueError, match="caption_kind"):
    annotator.Annotator(caption_kind="gpt")


def test_record_roundtrip():
  img = np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8)
  depth = np.linspace(0, 1, 6 * 8, dtype=np.float32).reshape(6, 8)
  seg = np.arange(48, dtype=np.int32).reshape(6, 8) % 5
  rec = records.decode_record(records.encode_record(
      img, {"depth": depth, "seg": seg, "edge": (depth > 0.5).astype(np.float32),
            "caption": "a red cat"}, {"name": "x"}))
  np.testing.assert_array_equal(rec["image"], img)
  np.testing.assert_allclose(rec["depth"], depth, atol=1 / 65535)
  np.testing.assert_array_equal(rec["seg"], seg)
  assert rec["caption"] == "a red cat" and rec["meta"]["name"] == "x"
  bare = records.decode_record(records.encode_record(img, {}, {"name": "y"}))
  assert bare["depth"] is None and bare["seg"] is None and bare["caption"] is None


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "mmsr_jax.annotate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_annotate_end_to_end(models, tmp_path):
  _images(tmp_path / "imgs", 5)
  out = tmp_path / "ann"
  opts = annotator.AnnotateOptions(
      input=str(tmp_path / "imgs"), output=str(out), depth=models["depth"], seg=models["seg"],
      caption=models["caption"], shard_size=2, batch_size=2)
  res = annotator.run_annotation(opts)
  assert res == {"images": 5, "shards": 3, "already_done": 0, "written": 3, "skipped": 0}
  shards = list_shards(str(out), "shards")
  assert [os.path.basename(s) for s in shards] == [
      f"annotations-0000{i}-of-00003.array_record" for i in range(3)]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["num_images"] == 5 and manifest["num_shards"] == 3
  # Records: HR image, maps from the degraded LR (48x64 / 4), caption, metadata.
  src = sources.ArrayRecordSource(str(out))
  assert len(src) == 5
  from array_record.python import array_record_data_source as ards
  raw = ards.ArrayRecordDataSource(shards)
  for i in range(5):
    rec = records.decode_record(raw[i])
    assert rec["image"].shape == (48, 64, 3)
    assert rec["depth"].shape == rec["seg"].shape == rec["edge"].shape == (12, 16)
    assert rec["meta"]["maps_from"] == "lr" and rec["meta"]["maps_size"] == [12, 16]
    assert rec["meta"]["index"] == i and rec["meta"]["name"].endswith(".png")
    assert rec["caption"] and 0 <= rec["seg"].min() and rec["seg"].max() < 7
    rec2 = src[i]  # the training source puts the maps on the image grid
    assert rec2["depth"].shape == rec2["seg"].shape == (48, 64)
  # Resumable: a missing shard is redone, finished ones are kept untouched.
  mtimes = {s: os.path.getmtime(s) for s in shards}
  os.remove(shards[1])
  assert annotator.run_annotation(opts)["already_done"] == 2
  assert os.path.getmtime(shards[0]) == mtimes[shards[0]]
  assert os.path.exists(shards[1])
  assert annotator.run_annotation(opts)["written"] == 0
  # Other settings into the same folder: one clear error, nothing overwritten.
  with pytest.raises(FileExistsError, match="new --output"):
    annotator.run_annotation(annotator.AnnotateOptions(opts.input, opts.output, from_hr=True))
  # The training pipeline reads the shards: depth and seg present, edges from the LR.
  cfg = apply_overrides(sr_config(), {
      "seed": 0, "batch_size": 2, "data.source": "arrayrecord", "data.path": str(out),
      "data.hr_size": 32, "data.scale": 4, "data.map_size": 16, "data.num_workers": 0,
      "data.min_image_size": 16, "data.max_bad_fraction": 0.0, "data.degradation": "simple",
      "text.max_length": 16})
  batch = next(iter(sr_examples.make_train_loader(cfg, make_tokenizer("byte"))))
  assert batch["hr"].shape == (2, 32, 32, 3) and batch["lr"].shape == (2, 8, 8, 3)
  assert batch["present"].all()
  assert np.abs(batch["depth"]).sum() > 0 and np.abs(batch["seg"]).sum() > 0
  assert (batch["text_mask"].sum(-1) > 0).all()


def test_annotate_cli_from_hr_and_errors(tmp_path):
  """The command line: --from_hr with edges only (no models), and one-line errors."""
  _images(tmp_path / "imgs", 2)
  r = _run(f"--input={tmp_path / 'imgs'}", f"--output={tmp_path / 'ann'}", "--from_hr")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "2 images, 1 shards, 0 already done" in r.stdout
  (shard,) = list_shards(str(tmp_path / "ann"), "shards")
  rec = sources.ArrayRecordSource(shard)[0]
  assert rec["depth"] is None and rec["seg"] is None and rec["caption"] == ""
  from array_record.python import array_record_data_source as ards
  meta = records.decode_record(ards.ArrayRecordDataSource([shard])[0])["meta"]
  assert meta["maps_from"] == "hr" and meta["maps_size"] == [48, 64]
  r = _run("--input=/no/such/dir", f"--output={tmp_path / 'x'}")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "no such folder" in r.stderr


def _word_tokenizer(tr, words: list[str], **special):
  """A whole-word tokenizer over ``words`` (the `tokenizers` WordLevel model), built offline."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


F2_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + (
    "describe with a paragraph what is shown in the image . photo cat dog red sky".split())


def _build_florence2(path: str) -> None:
  """A tiny random Florence-2 (DaViT vision tower + BART) with its processor, as safetensors.

  64x64 inputs through the four stride-4/2/2/2 stages give 2x2 features, plus the pooled token:
  5 image tokens. The saved generation config asks for at least 3 new tokens and never the
  special ones, so random weights still give a non-empty caption (not only an end token).
  """
  import torch
  tr = annotator.import_transformers()
  torch.manual_seed(0)
  tok = _word_tokenizer(tr, F2_WORDS, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                        extra_special_tokens={"image_token": "<image>"})
  image_proc = tr.CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False,
                                     image_seq_length=5)
  tr.Florence2Processor(image_processor=image_proc, tokenizer=tok).save_pretrained(path)
  model = tr.Florence2ForConditionalGeneration(tr.Florence2Config(
      vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 16, 16], num_heads=[1, 1, 1, 1],
                         num_groups=[1, 1, 1, 1], window_size=2, projection_dim=32,
                         drop_path_rate=0.0),
      text_config=dict(model_type="bart", vocab_size=len(F2_WORDS), d_model=32, encoder_layers=1,
                       decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                       encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2),
      image_token_id=4))
  model.generation_config.min_new_tokens = 3
  model.generation_config.suppress_tokens = [0, 1, 3, 4]
  model.save_pretrained(path, safe_serialization=True)


def test_caption_florence2(tmp_path):
  """The Florence-2 caption path (task prompt -> processor -> generate -> decode) on a tiny
  random model loaded back from its folder: a caption of 3-4 vocabulary words, deterministic,
  and without the prompt (an encoder-decoder returns only the decoder's tokens)."""
  path = str(tmp_path / "florence2")
  _build_florence2(path)
  ann = annotator.Annotator(caption=path, caption_kind="florence2", max_new_tokens=4)
  assert ann.modalities == ("edge", "caption")
  rng = np.random.default_rng(3)
  img, other = rng.integers(0, 255, (20, 28, 3), np.uint8), rng.integers(0, 255, (30, 16, 3),
                                                                          np.uint8)
  cap = ann.annotate_one(img)["caption"]
  assert isinstance(cap, str) and 3 <= len(cap.split()) <= 4
  assert set(cap.split()) <= set(F2_WORDS[5:])
  a, b = ann.annotate_batch([img, other])
  assert a["caption"] == cap and isinstance(b["caption"], str) and b["caption"]
  assert annotator.Annotator(caption=path, caption_kind="florence2",
                            max_new_tokens=4).annotate_one(img)["caption"] == cap


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
QWEN_WORDS = QWEN_SPECIAL + (
    "describe this image in one sentence . user assistant photo cat dog red sky".split())
# Qwen's chat format (im_start/im_end turns, the image as vision_start + image_pad + vision_end).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _build_qwen2_5_vl(path: str) -> None:
  """A tiny random Qwen2.5-VL (2-block windowed ViT, 1-layer text model with M-RoPE) with its
  image processor (4-pixel patches, 2x2 merge) and a chat-template tokenizer, as safetensors.

  The processor object itself is not saved: transformers 5.x cannot build Qwen2_5_VLProcessor
  without torchvision (not installed here), and the annotator then builds the inputs from these
  two parts. Generation as for Florence-2: at least 3 new tokens, never special ones.
  """
  import torch
  tr = annotator.import_transformers()
  torch.manual_seed(0)
  tok = _word_tokenizer(tr, QWEN_WORDS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        additional_special_tokens=QWEN_SPECIAL[1:7])
  tok.chat_template = QWEN_TEMPLATE
  tok.save_pretrained(path)
  tr.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": 256, "longest_edge": 1024}).save_pretrained(path)
  ids = {w: i for i, w in enumerate(QWEN_WORDS)}
  model = tr.Qwen2_5_VLForConditionalGeneration(tr.Qwen2_5_VLConfig(
      vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                         patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                         window_size=16, out_hidden_size=32, fullatt_block_indexes=[1]),
      text_config=dict(vocab_size=len(QWEN_WORDS), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=256, bos_token_id=ids["<|im_start|>"],
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 3, 3]}),
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
  model.generation_config.min_new_tokens = 3
  model.generation_config.suppress_tokens = list(range(len(QWEN_SPECIAL)))
  model.save_pretrained(path, safe_serialization=True)


def test_caption_qwen2_5_vl(tmp_path):
  """The Qwen2.5-VL caption path (chat prompt -> image placeholders expanded to the merged
  patch count -> generate -> answer without the prompt) on a tiny random model: 3-4 vocabulary
  words, deterministic, and the same in a batch whose images give different prompt lengths
  (left padding) as alone."""
  path = str(tmp_path / "qwen2_5_vl")
  _build_qwen2_5_vl(path)
  ann = annotator.Annotator(caption=path, caption_kind="qwen2_5_vl", max_new_tokens=4)
  assert ann.modalities == ("edge", "caption")
  rng = np.random.default_rng(3)
  # 20x28 -> 24x32 pixels -> 12 image tokens; 40x16 -> 10 image tokens.
  img, tall = rng.integers(0, 255, (20, 28, 3), np.uint8), rng.integers(0, 255, (40, 16, 3),
                                                                         np.uint8)
  cap, cap_tall = ann.annotate_one(img)["caption"], ann.annotate_one(tall)["caption"]
  for c in (cap, cap_tall):
    assert isinstance(c, str) and 3 <= len(c.split()) <= 4
    assert set(c.split()) <= set(QWEN_WORDS[len(QWEN_SPECIAL):])
  assert [o["caption"] for o in ann.annotate_batch([img, tall])] == [cap, cap_tall]
  assert annotator.Annotator(caption=path, caption_kind="qwen2_5_vl",
                            max_new_tokens=4).annotate_one(img)["caption"] == cap
