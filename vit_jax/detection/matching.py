"""Bipartite matching of predicted queries to target boxes (DETR's Hungarian matching).

``matching_cost`` builds each image's ``[Q, M]`` cost over fixed-shape padded targets;
``match`` solves the assignment with one of two solvers behind one interface:

* ``"scipy"``: ``scipy.optimize.linear_sum_assignment`` on the host through
  ``jax.pure_callback`` (works under ``jit`` and ``vmap``; one device-host round trip per call).
* ``"jax"``: a Hungarian algorithm in ``lax`` loops (shortest augmenting paths with potentials,
  the Jonker-Volgenant / e-maxx formulation, O(M^2 Q) per image), compiled into the program:
  no host round trip, batched by ``vmap``.

Padded targets must not change the valid targets' assignment. Given to scipy, their columns
cost a constant 0: with Q >= M every completion of an assignment of the valid targets with the
padding costs the same. The JAX solver skips their rows altogether.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.detection import boxes as box_ops

METHODS = ("scipy", "jax")
# What a NaN or infinite cost becomes: a pair that is matched only when nothing else can be.
# Kept far below float32's maximum so that the solver's sums of costs stay finite.
INVALID_COST = 1e6


def matching_cost(logits: jax.Array, boxes: jax.Array, target_labels: jax.Array,
                  target_boxes: jax.Array, box_mask: jax.Array, *, class_cost: float = 1.0,
                  bbox_cost: float = 5.0, giou_cost: float = 2.0) -> jax.Array:
  """DETR's matching cost ``[..., Q, M]`` of every query against every target (no gradient).

  ``class_cost * -softmax(logits)[label] + bbox_cost * L1(cxcywh) + giou_cost * -GIoU``, over
  ``logits [..., Q, C+1]``, ``boxes [..., Q, 4]`` and ``target_labels [..., M]``,
  ``target_boxes [..., M, 4]``, ``box_mask [..., M]``. NaN/inf costs become ``INVALID_COST``;
  padded targets' columns are 0.
  """
  logits, boxes, target_boxes = jax.lax.stop_gradient((logits, boxes, target_boxes))
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  labels = jnp.clip(target_labels, 0, logits.shape[-1] - 1)
  class_prob = jnp.take_along_axis(prob, labels[..., None, :].astype(jnp.int32), axis=-1)
  boxes = box_ops.finite_boxes(boxes.astype(jnp.float32))
  target_boxes = box_ops.finite_boxes(target_boxes.astype(jnp.float32))
  l1 = jnp.sum(jnp.abs(boxes[..., :, None, :] - target_boxes[..., None, :, :]), axis=-1)
  giou = box_ops.paired_generalized_box_iou(box_ops.cxcywh_to_xyxy(boxes)[..., :, None, :],
                                            box_ops.cxcywh_to_xyxy(target_boxes)[..., None, :, :])
  cost = bbox_cost * l1 - class_cost * class_prob - giou_cost * giou
  return jnp.where(box_mask[..., None, :], finite_cost(cost), 0.0)


def finite_cost(cost: jax.Array) -> jax.Array:
  """``cost`` with NaN and infinities replaced by ``INVALID_COST``, clipped to +-INVALID_COST
  (the solvers need finite costs: scipy refuses others, the JAX one would not terminate)."""
  cost = jnp.where(jnp.isfinite(cost), cost, INVALID_COST)
  return jnp.clip(cost, -INVALID_COST, INVALID_COST)


def match(cost: jax.Array, valid: jax.Array, method: str = "jax") -> jax.Array:
  """The query matched to each target: ``cost [B, Q, M], valid [B, M] -> [B, M]`` int32, -1 for
  padded targets. The assignment of the valid targets minimises their total cost.

  Needs ``M <= Q`` (every target gets a query). Works under ``jit`` and ``vmap``.
  """
  if method not in METHODS:
    raise ValueError(f"matcher method {method!r} is not one of {METHODS}")
  if cost.ndim != 3 or valid.shape != (cost.shape[0], cost.shape[2]):
    raise ValueError(f"match takes cost [B, Q, M] and valid [B, M]; got {cost.shape} and "
                     f"{valid.shape}")
  if cost.shape[2] > cost.shape[1]:
    raise ValueError(f"{cost.shape[2]} targets per image (padded) but only {cost.shape[1]} "
                     "queries: pad the targets to at most the number of queries")
  valid = valid.astype(bool)
  cost = jnp.where(valid[:, None, :], finite_cost(cost), 0.0)
  if method == "scipy":
    return _match_scipy(cost, valid)
  return jax.vmap(_assign_rows)(jnp.swapaxes(cost, 1, 2), valid)


def _scipy_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  from scipy import optimize  # imported on first use only
  *lead, q, m = cost.shape
  cost = np.asarray(cost, np.float64).reshape(-1, q, m)
  valid = np.asarray(valid).reshape(-1, m)
  out = np.full(valid.shape, -1, np.int32)
  for b in range(cost.shape[0]):
    queries, targets = optimize.linear_sum_assignment(cost[b])
    out[b, targets] = queries
  return np.where(valid, out, -1).reshape(*lead, m)


def _match_scipy(cost: jax.Array, valid: jax.Array) -> jax.Array:
  result = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_scipy_host, result, cost, valid, vmap_method="broadcast_all")


def _assign_rows(cost: jax.Array, active: jax.Array) -> jax.Array:
  """Minimum-cost assignment of each active row of ``cost [n, m]`` (n <= m) to its own column;
  returns the column per row, -1 for inactive rows.

  Shortest augmenting paths with row/column potentials (e-maxx's formulation, 1-based with a
  virtual column 0): each active row in turn grows a Dijkstra tree over the reduced costs until
  it reaches a free column, then the matching is flipped along that path.
  """
  n, m = cost.shape
  if n == 0:
    return jnp.zeros((0,), jnp.int32)
  cost = cost.astype(jnp.float32)
  inf = jnp.array(jnp.inf, jnp.float32)
  columns = jnp.arange(m + 1)

  def add_row(i, state):
    u, v, row_of_col = state  # u [n+1], v [m+1], row_of_col [m+1] (0: free)
    row_of_col = row_of_col.at[0].set(i)

    def grow(s):
      u, v, used_col, used_row, minv, way, j0 = s
      used_col = used_col | (columns == j0)
      i0 = row_of_col[j0]
      used_row = used_row.at[i0].set(True)
      reduced = jnp.concatenate([inf[None], cost[i0 - 1] - u[i0] - v[1:]])
      closer = ~used_col & (reduced < minv)
      minv = jnp.where(closer, reduced, minv)
      way = jnp.where(closer, j0, way)
      free_minv = jnp.where(used_col, inf, minv)
      j1 = jnp.argmin(free_minv)
      delta = free_minv[j1]
      u = jnp.where(used_row, u + delta, u)
      v = jnp.where(used_col, v - delta, v)
      minv = jnp.where(used_col, minv, minv - delta)
      return u, v, used_col, used_row, minv, way, j1

    def growing(s):
      return active[i - 1] & (row_of_col[s[-1]] != 0)

    init = (u, v, jnp.zeros(m + 1, bool), jnp.zeros(n + 1, bool), jnp.full(m + 1, inf),
            jnp.zeros(m + 1, jnp.int32), jnp.int32(0))
    u, v, _, _, _, way, j0 = jax.lax.while_loop(growing, grow, init)

    def flip(s):
      row_of_col, j0 = s
      j1 = way[j0]
      return row_of_col.at[j0].set(row_of_col[j1]), j1

    row_of_col, _ = jax.lax.while_loop(lambda s: s[1] != 0, flip, (row_of_col, j0))
    return u, v, row_of_col

  init = (jnp.zeros(n + 1, jnp.float32), jnp.zeros(m + 1, jnp.float32),
          jnp.zeros(m + 1, jnp.int32))
  _, _, row_of_col = jax.lax.fori_loop(1, n + 1, add_row, init)
  # Invert: column j holds row row_of_col[j]; free columns (row 0) write to the dropped slot 0.
  row_of_col = row_of_col.at[0].set(0)
  col_of_row = jnp.full(n + 1, -1, jnp.int32).at[row_of_col].set(columns.astype(jnp.int32) - 1)
  return jnp.where(active, col_of_row[1:], -1)


def linear_sum_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``scipy.optimize.linear_sum_assignment`` in JAX for one ``[n, m]`` matrix, either shape:
  ``(row_ind, col_ind)``, each of length ``min(n, m)``, rows ascending. Jittable."""
  n, m = cost.shape
  cost = finite_cost(cost)
  if n <= m:
    return jnp.arange(n, dtype=jnp.int32), _assign_rows(cost, jnp.ones(n, bool))
  row_of_col = _assign_rows(cost.T, jnp.ones(m, bool))
  order = jnp.argsort(row_of_col)
  return row_of_col[order], order.astype(jnp.int32)
