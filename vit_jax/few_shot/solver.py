"""The few-shot linear classifier: standardised features, a bias feature, l2-regularised least
squares in closed form (float64, on the host).

With X the [N, D] standardised, bias-augmented features and Y the [N, C] targets in {-1, 1}, the
weights are W = (XᵀX + λI)⁻¹ XᵀY. One eigendecomposition of the smaller Gram matrix (XᵀX,
D×D, or XXᵀ, N×N, through W = Xᵀ(XXᵀ + λI)⁻¹Y) serves every λ of a grid.
"""

from __future__ import annotations

import numpy as np

BIAS = 100.0  # the constant feature appended to every example
STD_EPS = 1e-5  # added to each feature's standard deviation


def standardise(fit: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """``fit`` and ``others`` in float64, each feature standardised with ``fit``'s mean and
  (std + 1e-5), then a constant feature of 100 appended."""
  fit = np.asarray(fit, np.float64)
  mean, std = fit.mean(axis=0), fit.std(axis=0) + STD_EPS

  def transform(x):
    x = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS)], axis=1)

  return tuple(transform(x) for x in (fit, *others))


def targets(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """[N, C] targets: 1 for the example's class (its index in ``classes``), -1 elsewhere."""
  onehot = np.asarray(labels)[:, None] == np.asarray(classes)[None, :]
  return 2.0 * onehot - 1.0


class Ridge:
  """l2-regularised least squares on the rows of ``x`` [N, D], for any targets and l2."""

  def __init__(self, x: np.ndarray):
    self.x = np.asarray(x, np.float64)
    n, d = self.x.shape
    self.primal = d <= n
    gram = self.x.T @ self.x if self.primal else self.x @ self.x.T
    self.eigvals, self.eigvecs = np.linalg.eigh(gram)

  def weights(self, y: np.ndarray, l2: float) -> np.ndarray:
    """[D, C] weights minimising |XW - Y|² + l2 |W|² (``l2`` > 0)."""
    y = np.asarray(y, np.float64)
    v, scale = self.eigvecs, 1.0 / (self.eigvals + l2)[:, None]
    if self.primal:
      return v @ (scale * (v.T @ (self.x.T @ y)))
    return self.x.T @ (v @ (scale * (v.T @ y)))


def solve(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
  """The weights of ``Ridge(x).weights(y, l2)``: (XᵀX + l2·I)⁻¹ XᵀY."""
  return Ridge(x).weights(y, l2)


def fit_predict(fit_x: np.ndarray, fit_labels: np.ndarray, test_x: np.ndarray,
                l2s: tuple[float, ...], classes: np.ndarray | None = None
                ) -> dict[float, np.ndarray]:
  """For each l2: the predicted label of every row of ``test_x`` by the classifier fit on
  (``fit_x``, ``fit_labels``), raw features standardised with ``fit_x``'s statistics.
  ``classes``: the labels it can predict (default: those of ``fit_labels``)."""
  classes = np.unique(fit_labels) if classes is None else np.asarray(classes)
  fit_x, test_x = standardise(fit_x, test_x)
  ridge, y = Ridge(fit_x), targets(fit_labels, classes)
  return {l2: classes[np.argmax(test_x @ ridge.weights(y, l2), axis=1)] for l2 in l2s}
