"""Tiny random-weight annotator models (Depth Anything, Mask2Former, BLIP) saved as model folders
the annotator loads: for tests and for the data-preparation benchmark on CPU, where a real model
would measure the model, not the pipeline around it."""

from __future__ import annotations

import os

from mmsr_jax.data import annotator

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + (
    "a an the photo of cat dog red sky".split() + list("abcdefghijklmnopqrstuvwxyz"))


def build_tiny_annotators(root: str) -> dict[str, str]:
  """Tiny random Depth Anything (Dinov2 backbone), Mask2Former (Swin) and BLIP, with their
  processors, saved with save_pretrained(safe_serialization=True)."""
  import torch
  tr = annotator.import_transformers()
  torch.manual_seed(0)
  paths = {k: os.path.join(root, k) for k in ("depth", "seg", "caption")}
  backbone = tr.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=56, patch_size=14,
                             out_features=["stage1", "stage2"], reshape_hidden_states=False)
  depth = tr.DepthAnythingForDepthEstimation(tr.DepthAnythingConfig(
      backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
      neck_hidden_sizes=[16, 32], fusion_hidden_size=16, head_hidden_size=8,
      reassemble_factors=[4, 2]))
  depth.save_pretrained(paths["depth"], safe_serialization=True)
  # As the released Depth Anything processors: aspect ratio kept, sides multiples of 14.
  tr.DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                       ensure_multiple_of=14).save_pretrained(paths["depth"])
  seg = tr.Mask2FormerForUniversalSegmentation(tr.Mask2FormerConfig(
      backbone_config=tr.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1],
                                    num_heads=[1, 1, 2, 2], window_size=4,
                                    out_features=["stage1", "stage2", "stage3", "stage4"]),
      feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
      dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
      num_queries=5, num_labels=7, common_stride=4, use_pretrained_backbone=False,
      use_timm_backbone=False))
  seg.save_pretrained(paths["seg"], safe_serialization=True)
  tr.Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(paths["seg"])
  os.makedirs(paths["caption"])
  vocab = os.path.join(paths["caption"], "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  tok = tr.BertTokenizer(vocab, bos_token="[DEC]")
  proc = tr.BlipProcessor(image_processor=tr.BlipImageProcessor(size={"height": 32, "width": 32}),
                          tokenizer=tok)
  blip = tr.BlipForConditionalGeneration(tr.BlipConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=8),
      text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
                       max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                       sep_token_id=3),
      projection_dim=32))
  blip.save_pretrained(paths["caption"], safe_serialization=True)
  proc.save_pretrained(paths["caption"])
  return paths
