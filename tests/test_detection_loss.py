"""vit_jax.detection: box ops, the two matchers against scipy, the set criterion and the
post-processing against HF transformers' (values and gradients), and bad input."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment as scipy_lsa

from vit_jax import detection
from vit_jax.train.step import mean_terms

try:  # the installed torchvision's C ops do not load; transformers imports once these exist
  _TORCHVISION = torch.library.Library("torchvision", "DEF")
  _TORCHVISION.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _TORCHVISION.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined (tests.timm_helpers) or a working torchvision
  pass
from transformers.loss import loss_for_object_detection as hf_loss  # noqa: E402
from transformers.models.detr.image_processing_detr import DetrImageProcessor  # noqa: E402

NUM_CLASSES, QUERIES, MAX_BOXES = 5, 12, 7
COEFS = detection.SetLossConfig()
TERMS_FINAL = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]


def random_outputs(rng, batch, layers=1):
  """Model outputs as the detectors give them; ``layers > 1`` adds aux_logits/aux_boxes."""
  logits = (2 * rng.normal(size=(layers, batch, QUERIES, NUM_CLASSES + 1))).astype(np.float32)
  boxes = (1 / (1 + np.exp(-rng.normal(size=(layers, batch, QUERIES, 4))))).astype(np.float32)
  out = {"logits": logits[-1], "boxes": boxes[-1]}
  if layers > 1:
    out.update(aux_logits=logits[:-1], aux_boxes=boxes[:-1])
  return out


def random_targets(rng, counts):
  """Padded targets with ``counts[b]`` boxes in image b; the padding holds garbage."""
  mask = np.arange(MAX_BOXES) < np.asarray(counts)[:, None]
  shape = mask.shape
  labels = np.where(mask, rng.integers(0, NUM_CLASSES, shape), 1000).astype(np.int32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, shape + (2,)), rng.uniform(0.05, 0.4, shape + (2,))],
                         axis=-1).astype(np.float32)
  boxes = np.where(mask[..., None], boxes, np.nan).astype(np.float32)
  return {"labels": labels, "boxes": boxes, "box_mask": mask}


def objective_value(outputs, targets, config):
  """The trainer's objective: sum of coef * sum / weight over the objective's terms."""
  terms = detection.set_loss(outputs, targets, config)
  num_aux = outputs["aux_logits"].shape[0] if "aux_logits" in outputs else 0
  means = mean_terms(terms)
  return sum(c * means[k] for k, c in detection.objective(config, num_aux).items()), terms


@functools.partial(jax.jit, static_argnames="config")
def objective_and_grads(outputs, targets, config):
  # One compilation per (shapes, shardings, config), shared by the tests below.
  return jax.value_and_grad(objective_value, has_aux=True)(outputs, targets, config)


def value_and_grads(outputs, targets, config=COEFS):
  """Each term's mean and the objective's gradients w.r.t. the outputs."""
  (_, terms), grads = objective_and_grads(outputs, targets, config)
  return {k: float(v) for k, v in mean_terms(terms).items()}, grads


def hf_reference(outputs, targets):
  """HF's ForObjectDetectionLoss: its loss_dict and the gradients of its total loss."""
  t = {k: torch.tensor(v, requires_grad=True) for k, v in outputs.items()}
  aux = "aux_logits" in outputs
  config = types.SimpleNamespace(
      class_cost=COEFS.class_cost, bbox_cost=COEFS.bbox_cost, giou_cost=COEFS.giou_cost,
      num_labels=NUM_CLASSES, eos_coefficient=COEFS.eos_coef, auxiliary_loss=aux,
      bbox_loss_coefficient=COEFS.bbox_loss_coef, giou_loss_coefficient=COEFS.giou_loss_coef,
      decoder_layers=len(outputs["aux_logits"]) + 1 if aux else 1)
  labels = [{"class_labels": torch.tensor(targets["labels"][b][m], dtype=torch.int64),
             "boxes": torch.tensor(targets["boxes"][b][m])}
            for b, m in enumerate(targets["box_mask"])]
  stacked = {}
  if aux:
    stacked = dict(outputs_class=torch.cat([t["aux_logits"], t["logits"][None]]),
                   outputs_coord=torch.cat([t["aux_boxes"], t["boxes"][None]]))
  loss, loss_dict, _ = hf_loss.ForObjectDetectionLoss(t["logits"], labels, "cpu", t["boxes"],
                                                      config, **stacked)
  loss.backward()
  return ({k: float(v.detach()) for k, v in loss_dict.items()},
          {k: v.grad.numpy() for k, v in t.items()})


# ---- box ops ---------------------------------------------------------------------------------

@jax.jit
def box_ops(a, b):
  a_xyxy, b_xyxy = detection.cxcywh_to_xyxy(a), detection.cxcywh_to_xyxy(b)
  return {"a_xyxy": a_xyxy, "b_xyxy": b_xyxy, "a_back": detection.xyxy_to_cxcywh(a_xyxy),
          "iou": detection.box_iou(a_xyxy, b_xyxy),
          "giou": detection.generalized_box_iou(a_xyxy, b_xyxy),
          "paired": detection.paired_generalized_box_iou(a_xyxy[:b.shape[0]], b_xyxy),
          "self_giou": detection.generalized_box_iou(a_xyxy, a_xyxy),
          "area": detection.box_area(a_xyxy)}


def test_box_ops_match_hf():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0, 1, (9, 2)), rng.uniform(0.01, 0.5, (9, 2))], -1).astype(np.float32)
  b = np.concatenate([rng.uniform(0, 1, (6, 2)), rng.uniform(0.01, 0.5, (6, 2))], -1).astype(np.float32)
  got = box_ops(a, b)
  np.testing.assert_allclose(got["a_back"], a, atol=1e-6)
  ta, tb = torch.tensor(np.asarray(got["a_xyxy"])), torch.tensor(np.asarray(got["b_xyxy"]))
  np.testing.assert_allclose(got["a_xyxy"], hf_loss.center_to_corners_format(torch.tensor(a)))
  np.testing.assert_allclose(got["iou"], hf_loss.box_iou(ta, tb)[0], atol=1e-6)
  np.testing.assert_allclose(got["giou"], hf_loss.generalized_box_iou(ta, tb), atol=1e-6)
  np.testing.assert_allclose(got["paired"], np.diag(np.asarray(got["giou"])[:6]), atol=1e-6)
  np.testing.assert_allclose(np.diag(got["self_giou"]), 1.0, atol=1e-6)
  np.testing.assert_allclose(got["area"], a[:, 2] * a[:, 3], rtol=1e-5)


def test_box_ops_stay_finite_on_degenerate_and_nan_boxes():
  boxes = np.array([[0.2, 0.2, 0.2, 0.6],     # zero width
                    [0.5, 0.5, 0.5, 0.5],     # a point
                    [0.7, 0.3, 0.4, 0.6],     # inverted (negative width)
                    [np.nan, 0.1, 0.3, 0.4],  # NaN
                    [0.0, 0.0, np.inf, 1.0],  # infinite
                    [0.1, 0.1, 0.6, 0.6]], np.float32)  # a proper box, xyxy
  with pytest.raises(ValueError):  # the original refuses them
    hf_loss.generalized_box_iou(torch.tensor(boxes), torch.tensor(boxes))
  def overlaps(b):
    giou, iou = detection.generalized_box_iou(b, b[::-1] + 0.01), detection.box_iou(b, b)
    return jnp.sum(giou) + jnp.sum(iou), (giou, iou, detection.box_area(b))
  grads, (giou, iou, area) = jax.jit(jax.grad(overlaps, has_aux=True))(boxes)
  assert np.all(np.isfinite(giou)) and np.all(np.isfinite(iou)) and np.all(np.isfinite(grads))
  assert np.all(giou >= -1) and np.all(giou <= 1) and np.all(iou >= 0) and np.all(iou <= 1)
  assert float(area[2]) == 0.0 and float(area[0]) == 0.0


# ---- matchers --------------------------------------------------------------------------------

# (padded queries, padded targets, how many matrices, queries from, targets from): 300 matrices
# from 1x1 to 100x100 padded into 3 compiled shapes. Padded query rows cost PAD_QUERY_COST (never
# worth taking), padded target columns are marked invalid.
BUCKETS = [(16, 16, 100, 1, 0), (100, 20, 100, 17, 0), (100, 100, 100, 21, 21)]
PAD_QUERY_COST = 1e3


def bucket_problems(rng, queries, targets, count, min_q, min_m):
  """``count`` random [q, m] costs (q in [min_q, queries], m <= min(q, targets)) padded into one
  [count, queries, targets] batch; the first are the extremes (1x1 or full size, no targets)."""
  shapes = [(min_q, min(min_q, targets)) if min_q == 1 else (queries, min(queries, targets)),
            (queries, 0 if min_m == 0 else min_m)]
  while len(shapes) < count:
    q = int(rng.integers(min_q, queries + 1))
    shapes.append((q, int(rng.integers(min_m, min(q, targets) + 1))))
  padded = np.zeros((count, queries, targets), np.float32)
  valid = np.zeros((count, targets), bool)
  costs = []
  for i, (q, m) in enumerate(shapes):
    cost = rng.uniform(-1, 1, (q, m)).astype(np.float32)
    costs.append(cost)
    padded[i] = rng.uniform(-1, 1, (queries, targets))  # garbage in the padded columns
    padded[i, :q, :m] = cost
    padded[i, q:, :] = PAD_QUERY_COST
    valid[i, :m] = True
  return costs, padded, valid


@pytest.fixture(scope="module")
def matcher_problems():
  rng = np.random.default_rng(1)
  return [bucket_problems(rng, *bucket) for bucket in BUCKETS]


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_matchers_reach_scipys_optimum(method, matcher_problems):
  solve = jax.jit(lambda c, v: detection.match(c, v, method))
  shapes = set()
  for costs, padded, valid in matcher_problems:
    query_of_target = np.asarray(solve(padded, valid))
    for cost, found, mask in zip(costs, query_of_target, valid):
      q, m = cost.shape
      shapes.add((q, m))
      assert np.all(found[~mask] == -1)
      found = found[mask]
      assert len(set(found.tolist())) == m and np.all((found >= 0) & (found < q))
      rows, cols = scipy_lsa(cost.astype(np.float64))
      best = cost.astype(np.float64)[rows, cols].sum()
      assert abs(cost.astype(np.float64)[found, np.arange(m)].sum() - best) < 1e-5, (q, m)
  assert len(shapes) > 150 and (1, 1) in shapes and (100, 100) in shapes and (100, 20) in shapes
  assert any(m == 0 for _, m in shapes)


def test_jax_linear_sum_assignment_any_shape():
  rng = np.random.default_rng(2)
  wide, tall = rng.normal(size=(5, 3, 8)).astype(np.float32), rng.normal(size=(5, 8, 3)).astype(np.float32)
  solve = jax.jit(lambda *costs: [jax.vmap(detection.linear_sum_assignment)(c) for c in costs])
  for cost, (rows, cols) in zip([wide, tall], solve(wide, tall)):
    for c, r, k in zip(cost, np.asarray(rows), np.asarray(cols)):
      sr, sc = scipy_lsa(c)
      np.testing.assert_array_equal(r, sr)  # rows ascending, as scipy's
      assert abs(c[r, k].sum() - c[sr, sc].sum()) < 1e-5


def test_matching_cost_matches_hf_and_replaces_nan():
  rng = np.random.default_rng(11)
  outputs = random_outputs(rng, batch=1)
  targets = random_targets(rng, counts=[5])
  outputs["logits"][0, 3] = np.nan  # a query the matcher must avoid
  cost_fn = jax.jit(lambda o, t: detection.matching_cost(
      o["logits"], o["boxes"], t["labels"], t["boxes"], t["box_mask"]))
  cost = np.asarray(cost_fn(outputs, targets))[0]
  valid = targets["box_mask"][0]
  t_boxes, t_targets = torch.tensor(outputs["boxes"][0]), torch.tensor(targets["boxes"][0][valid])
  ref = (COEFS.bbox_cost * torch.cdist(t_boxes, t_targets, p=1)
         - COEFS.class_cost * torch.tensor(outputs["logits"][0]).softmax(-1)[:, targets["labels"][0][valid]]
         - COEFS.giou_cost * hf_loss.generalized_box_iou(hf_loss.center_to_corners_format(t_boxes),
                                                         hf_loss.center_to_corners_format(t_targets)))
  keep = np.arange(QUERIES) != 3
  np.testing.assert_allclose(cost[keep][:, valid], ref.numpy()[keep], atol=1e-5)
  assert np.all(cost[3, valid] == detection.matching.INVALID_COST) and np.all(cost[:, ~valid] == 0)
  for method in ["jax", "scipy"]:
    found = np.asarray(jax.jit(detection.match, static_argnums=2)(cost[None], valid[None], method))[0]
    assert 3 not in found and np.all(found[~valid] == -1)


def test_matchers_under_vmap():
  rng = np.random.default_rng(3)
  cost = rng.normal(size=(2, 3, 9, 4)).astype(np.float32)
  valid = np.array([[True, True, False, True], [False] * 4, [True] * 4])
  by_jax = jax.jit(jax.vmap(lambda c: detection.match(c, valid, "jax")))(cost)
  by_scipy = jax.jit(jax.vmap(lambda c: detection.match(c, valid, "scipy")))(cost)
  np.testing.assert_array_equal(by_jax, by_scipy)
  assert np.all(np.asarray(by_jax)[:, 1] == -1)


def test_match_rejects_more_targets_than_queries():
  with pytest.raises(ValueError, match="5 targets per image .* only 3 queries"):
    detection.match(jnp.zeros((1, 3, 5)), jnp.ones((1, 5), bool))
  with pytest.raises(ValueError, match="not one of"):
    detection.SetLossConfig(matcher="greedy")


# ---- the set criterion -----------------------------------------------------------------------
# Every loss test uses 4 images and 1 or 3 decoder layers, so the compilations are shared.

@pytest.fixture(scope="module")
def with_aux_case():
  """Outputs with two aux layers, targets with an image without boxes, HF's terms and grads."""
  rng = np.random.default_rng(4)
  outputs = random_outputs(rng, batch=4, layers=3)
  targets = random_targets(rng, counts=[3, 0, 7, 1])
  return outputs, targets, value_and_grads(outputs, targets), hf_reference(outputs, targets)


def assert_like_hf(ours, hf):
  (terms, grads), (ref_terms, ref_grads) = ours, hf
  assert set(terms) == set(ref_terms)
  for k in ref_terms:
    assert abs(terms[k] - ref_terms[k]) < 1e-5, (k, terms[k], ref_terms[k])
  for k in ref_grads:
    np.testing.assert_allclose(grads[k], ref_grads[k], atol=1e-5, err_msg=k)


def test_loss_and_gradients_match_hf_with_aux(with_aux_case):
  outputs, targets, ours, hf = with_aux_case
  assert_like_hf(ours, hf)
  assert len(ours[0]) == 12 and "loss_giou_1" in ours[0]
  # The scipy matcher finds the same pairs (continuous random inputs: no ties).
  assert_like_hf(value_and_grads(outputs, targets, detection.SetLossConfig(matcher="scipy")), hf)


def test_loss_and_gradients_match_hf_final_layer_only():
  rng = np.random.default_rng(5)
  outputs = random_outputs(rng, batch=4)
  targets = random_targets(rng, counts=[2, 6, 0, 4])
  ours = value_and_grads(outputs, targets)
  assert set(ours[0]) == set(TERMS_FINAL)
  assert_like_hf(ours, hf_reference(outputs, targets))
  # A batch without any box: box terms are 0/0 -> 0, as HF's clamp of the count to 1 gives.
  targets = random_targets(rng, counts=[0, 0, 0, 0])
  ours = value_and_grads(outputs, targets)
  assert ours[0]["loss_bbox"] == 0.0 and ours[0]["loss_giou"] == 0.0
  assert np.all(np.asarray(ours[1]["boxes"]) == 0)
  assert_like_hf(ours, hf_reference(outputs, targets))


def test_sharded_loss_equals_unsharded(with_aux_case):
  outputs, targets, (terms, _), _ = with_aux_case
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  def shard(x, axis):
    return jax.device_put(x, NamedSharding(mesh, P(*([None] * axis + ["data"]))))
  sharded = jax.jit(detection.set_loss)(
      {k: shard(v, 1 if k.startswith("aux") else 0) for k, v in outputs.items()},
      {k: shard(v, 0) for k, v in targets.items()})
  for k, v in mean_terms(sharded).items():
    assert abs(float(v) - terms[k]) < 1e-6, k


def test_objective_names_the_loss_terms(with_aux_case):
  outputs, targets, (terms, _), _ = with_aux_case
  objective = detection.objective(COEFS, num_aux_layers=2)
  assert set(objective) == {k for k in terms if k.startswith("loss_")}
  assert objective["loss_bbox_1"] == 5.0 and objective["loss_giou"] == 2.0
  no_aux = detection.SetLossConfig(aux_loss=False)
  assert set(detection.objective(no_aux, 2)) == {"loss_ce", "loss_bbox", "loss_giou"}
  shapes = jax.eval_shape(lambda o, t: detection.set_loss(o, t, no_aux), outputs, targets)
  assert set(shapes) == set(TERMS_FINAL)


def test_out_of_range_labels_raise_with_the_largest_id():
  rng = np.random.default_rng(7)
  outputs = random_outputs(rng, batch=2)
  targets = random_targets(rng, counts=[2, 3])
  targets["labels"][1, 1] = NUM_CLASSES + 3
  targets["labels"][0, 0] = NUM_CLASSES
  message = f"num_classes={NUM_CLASSES}.*largest id {NUM_CLASSES + 3}"
  with pytest.raises(ValueError, match=message):
    detection.check_labels(targets, NUM_CLASSES)
  with pytest.raises(ValueError, match=message):
    detection.set_loss(outputs, {k: jnp.asarray(v) for k, v in targets.items()})
  targets["labels"][:] = np.where(targets["box_mask"], 0, -7)  # padding's labels are ignored
  detection.check_labels(targets, NUM_CLASSES)
  targets["labels"][0, 1] = -2
  with pytest.raises(ValueError, match="largest id"):
    detection.check_labels(targets, NUM_CLASSES)


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_nan_and_negative_size_boxes_give_finite_loss_and_gradients(method):
  rng = np.random.default_rng(8)
  outputs = random_outputs(rng, batch=4, layers=3)
  targets = random_targets(rng, counts=[4, 3, 0, 2])
  targets["boxes"][0, 0] = [0.5, 0.5, -0.2, 0.3]     # negative width
  targets["boxes"][0, 1] = [0.5, 0.5, 0.0, 0.0]      # empty
  targets["boxes"][1, 0] = [np.nan, 0.5, 0.2, 0.2]   # NaN
  outputs["boxes"][0, 2] = [0.3, np.nan, 0.1, 0.1]
  outputs["boxes"][1, 0] = [0.3, 0.3, -0.1, -0.4]
  outputs["aux_boxes"][0, 1, 3] = [np.inf, 0.3, 0.1, 0.1]
  terms, grads = value_and_grads(outputs, targets, detection.SetLossConfig(matcher=method))
  assert all(np.isfinite(v) for v in terms.values()), terms
  assert all(np.all(np.isfinite(g)) for g in grads.values())


# ---- post-processing -------------------------------------------------------------------------

def test_postprocess_matches_hf():
  rng = np.random.default_rng(10)
  outputs = random_outputs(rng, batch=3)
  sizes = np.array([[480, 640], [300, 200], [17, 1000]], np.int32)
  detections = jax.jit(detection.postprocess)(outputs, sizes)
  hf_outputs = types.SimpleNamespace(logits=torch.tensor(outputs["logits"]),
                                     pred_boxes=torch.tensor(outputs["boxes"]))
  hf = DetrImageProcessor().post_process_object_detection(hf_outputs, threshold=0.0,
                                                          target_sizes=torch.tensor(sizes))
  for b, ref in enumerate(hf):
    np.testing.assert_allclose(detections["scores"][b], ref["scores"], atol=1e-5)
    np.testing.assert_array_equal(detections["labels"][b], ref["labels"])
    np.testing.assert_allclose(detections["boxes"][b], ref["boxes"], atol=1e-5)
  kept = detection.select_detections(detections, threshold=0.3)
  for b, ref in enumerate(DetrImageProcessor().post_process_object_detection(
      hf_outputs, threshold=0.3, target_sizes=torch.tensor(sizes))):
    np.testing.assert_array_equal(kept[b]["labels"], ref["labels"])
    np.testing.assert_allclose(kept[b]["boxes"], ref["boxes"], rtol=1e-6)
