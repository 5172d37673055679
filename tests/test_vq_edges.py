"""Edge-aware reconstruction weighting and the edge / pooled-PSNR report metrics of the VQ trainer
(hand-made examples with known answers)."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmsr_jax.training import vq_losses as L
from mmsr_jax.schema import vq as vq_schema


def _edge_map(lines):
  """A 1x4x4x3 map in [-1, 1] with line pixels at ``lines`` (list of (row, col))."""
  x = -np.ones((1, 4, 4, 3), np.float32)
  for r, c in lines:
    x[0, r, c] = 1.0
  return jnp.asarray(x)


def test_edge_pixel_weights_only_touch_line_pixels_of_edge_maps():
  edge = _edge_map([(0, 0), (1, 1)])
  other = edge  # the same picture, but flagged as a depth map
  x = jnp.concatenate([edge, other])
  pw = L.edge_pixel_weights(x, jnp.array([True, False]), 5.0)
  assert pw.shape == (2, 4, 4, 1)
  want = np.ones((4, 4), np.float32)
  want[0, 0] = want[1, 1] = 5.0
  np.testing.assert_array_equal(pw[0, ..., 0], want)
  np.testing.assert_array_equal(pw[1], 1.0)  # not an edge map: uniform


def test_weighted_reconstruction_on_a_hand_made_example():
  x = _edge_map([(0, 0), (1, 1)])  # 2 line pixels out of 16
  rec = -jnp.ones_like(x)  # the blank map: misses both lines by 2.0 each
  # Plain L1: 2 pixels x 3 channels x 2.0 over 48 values = 0.25.
  assert float(L.reconstruction(x, rec, "l1")) == pytest.approx(0.25)
  # Weight 7 on the 2 line pixels: (2 * 7 * 2.0) / (14 * 1 + 2 * 7) = 1.0.
  pw = L.edge_pixel_weights(x, jnp.array([True]), 7.0)
  assert float(L.reconstruction(x, rec, "l1", None, pw)) == pytest.approx(1.0)
  # L2 with the same weights: (2 * 7 * 4.0) / 28 = 2.0; uniform weights give the plain mean.
  assert float(L.reconstruction(x, rec, "l2", None, pw)) == pytest.approx(2.0)
  ones = jnp.ones(x.shape[:-1] + (1,))
  assert float(L.reconstruction(x, rec, "l2", None, ones)) == pytest.approx(
      float(L.reconstruction(x, rec, "l2")))
  # Example weights still apply on top: an absent example (w = 0) does not count.
  both = jnp.concatenate([x, x])
  rec2 = jnp.concatenate([rec, x])  # the second example is perfect
  pw2 = L.edge_pixel_weights(both, jnp.array([True, True]), 7.0)
  assert float(L.reconstruction(both, rec2, "l1", jnp.array([1.0, 1.0]), pw2)) == pytest.approx(0.5)
  assert float(L.reconstruction(both, rec2, "l1", jnp.array([0.0, 1.0]), pw2)) == pytest.approx(0.0)


def test_edge_f1_on_a_hand_made_example():
  gt = _edge_map([(0, 0), (0, 1), (2, 2)])
  pred = _edge_map([(0, 0), (1, 1), (3, 0)])
  s = L.edge_f1(gt, pred, tolerance=0)
  # Exact: 1 of 3 predicted pixels is a line pixel, 1 of 3 line pixels is found.
  assert float(s["precision"]) == pytest.approx(1 / 3)
  assert float(s["recall"]) == pytest.approx(1 / 3)
  assert float(s["f1"]) == pytest.approx(1 / 3)
  s1 = L.edge_f1(gt, pred, tolerance=1)
  # Within 1 pixel: (0,0) and (1,1) are near a line, (3,0) is not -> precision 2/3; every line
  # pixel has a prediction within 1 pixel -> recall 1.
  assert float(s1["precision"]) == pytest.approx(2 / 3)
  assert float(s1["recall"]) == pytest.approx(1.0)
  assert float(s1["f1"]) == pytest.approx(0.8)
  blank = L.edge_f1(gt, -jnp.ones_like(gt))
  assert float(blank["f1"]) == 0.0


def test_pooled_psnr_is_the_psnr_of_the_pooled_error():
  x = jnp.zeros((2, 4, 4, 3))
  rec = jnp.concatenate([x[:1], x[1:] + 0.2])  # errors 0 and 0.1 (in [0, 1])
  # Pooled MSE = (0 + 0.01) / 2 = 0.005 -> 23.0103 dB; the mean of per-map PSNRs would be
  # dominated by the perfect map's 100 dB.
  assert float(L.pooled_psnr(x, rec)) == pytest.approx(23.0103, abs=1e-3)
  assert float(np.mean(L.psnr(x, rec))) > 50


def test_edge_weight_below_one_is_a_clear_error():
  from configs import vq_tiny
  config = vq_tiny.get_config()
  config.vq_train.edge_weight = 0.5
  with pytest.raises(ValueError, match=r"config.vq_train.edge_weight=0.5: expected a number >= 1"):
    vq_schema.validate(config)
