"""Pareto frontiers and the saturating power law of Zhai et al. 2022, "Scaling Vision Transformers".

The law: E = a·(C + d)^(−b) + c, with E the error (1 − accuracy) and C the compute; c is the error
that no amount of compute removes, d shifts the small-compute end where the curve flattens, and
a, b set the power law in between. It has four parameters, so a fit needs at least five points.

* ``pareto_frontier(compute, error)``: the runs with the lowest error so far as compute grows.
* ``fit_saturating_power_law(compute, error)``: least squares on log E (each point weighs by its
  relative error, so the small errors at large compute count as much as the large ones), with
  a > 0, b > 0, c ≥ 0, d ≥ 0. Started from a grid over (c, d), where log(E − c) is linear in
  log(C + d) and a, b follow in closed form; the best few starts are refined by
  ``scipy.optimize.least_squares`` and the lowest cost wins.
* ``held_out_error(compute, error)``: fit without the largest-compute point and compare the
  prediction there with the measurement, the extrapolation test of a scaling law.

Compute is rescaled by its geometric mean while fitting, so the fit does not depend on its units;
the parameters are reported in the caller's units (d in the units of C, a in error·C^b).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

NUM_PARAMETERS = 4
MIN_POINTS = NUM_PARAMETERS + 1

ArrayLike = Sequence[float] | np.ndarray


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """E = a·(C + d)^(−b) + c, fitted to ``n`` points; ``rms``: residual RMS of log E."""

  a: float
  b: float
  c: float
  d: float
  rms: float
  n: int

  def predict(self, compute: ArrayLike | float) -> np.ndarray:
    """The error the law predicts at ``compute`` (same units as the fit's)."""
    return self.a * (np.asarray(compute, dtype=float) + self.d) ** (-self.b) + self.c

  def label(self) -> str:
    """A short legend entry, e.g. ``E = 0.5(C+1)^-0.3 + 0.05``."""
    return f"E = {self.a:.3g}(C+{self.d:.3g})$^{{-{self.b:.3g}}}$ + {self.c:.3g}"


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """The law fitted without the largest-compute point, and its prediction there."""

  compute: float
  observed: float
  predicted: float
  fit: PowerLawFit

  @property
  def relative_error(self) -> float:
    """(predicted − observed) / observed."""
    return (self.predicted - self.observed) / self.observed


def pareto_frontier(compute: ArrayLike, error: ArrayLike) -> np.ndarray:
  """Indices of the points with a lower error than every point of less or equal compute.

  Ordered by compute; of several points with the same compute only the lowest error can be on
  it. Points with a non-finite compute or error are left out.
  """
  compute, error = _pair(compute, error)
  finite = np.flatnonzero(np.isfinite(compute) & np.isfinite(error))
  order = finite[np.lexsort((error[finite], compute[finite]))]
  frontier, best = [], np.inf
  for i in order:
    if error[i] < best:
      frontier.append(int(i))
      best = error[i]
  return np.asarray(frontier, dtype=int)


def fit_saturating_power_law(compute: ArrayLike, error: ArrayLike, *,
                             name: str = "the data") -> PowerLawFit:
  """Fits E = a·(C + d)^(−b) + c to the points; ``name`` says what they are in error messages.

  Raises ValueError for fewer than five points, or for a compute or error that is not positive
  and finite.
  """
  compute, error = _pair(compute, error)
  if len(compute) < MIN_POINTS:
    raise ValueError(
        f"{name} has {len(compute)} point{'s' if len(compute) != 1 else ''}; the saturating power "
        f"law E = a(C+d)^-b + c has {NUM_PARAMETERS} parameters and needs at least {MIN_POINTS}")
  for label, values in (("compute", compute), ("error", error)):
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
      raise ValueError(f"{name}: every {label} must be positive and finite; got "
                       f"{values[bad].tolist()}")
  distinct = len(np.unique(compute))
  if distinct < NUM_PARAMETERS:
    raise ValueError(f"{name} has {distinct} distinct compute values; fitting {NUM_PARAMETERS} "
                     f"parameters needs at least {NUM_PARAMETERS}")

  scale = float(np.exp(np.mean(np.log(compute))))
  x = compute / scale
  log_e = np.log(error)
  e_min = float(error.min())
  lower = np.array([-np.inf, 1e-6, 0.0, 0.0])
  upper = np.array([np.inf, 20.0, np.inf, np.inf])

  def residuals(theta: np.ndarray) -> np.ndarray:
    log_a, b, c, d = theta
    return np.log(np.exp(log_a) * (x + d) ** (-b) + c) - log_e

  def jacobian(theta: np.ndarray) -> np.ndarray:
    log_a, b, c, d = theta
    u = x + d
    p = np.exp(log_a) * u ** (-b)
    m = p + c
    return np.stack([p / m, -p * np.log(u) / m, 1.0 / m, -b * p / (u * m)], axis=1)

  best = None
  for start in _starts(x, error):
    start = np.clip(start, lower, upper)
    result = optimize.least_squares(residuals, start, jac=jacobian, bounds=(lower, upper),
                                    method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12,
                                    gtol=1e-12, max_nfev=2000)
    if best is None or result.cost < best.cost:
      best = result
  log_a, b, c, d = best.x
  # The bounded solver stops a hair above a bound it converges to: report those as 0.
  c = 0.0 if c < 1e-9 * e_min else c
  d = 0.0 if d < 1e-9 * x.min() else d
  rms = float(np.sqrt(np.mean(best.fun ** 2)))
  # a·(x + d')^(−b) with x = C/s equals a·s^b·(C + d'·s)^(−b).
  return PowerLawFit(a=float(np.exp(log_a) * scale ** b), b=float(b), c=float(c),
                     d=float(d * scale), rms=rms, n=len(compute))


def held_out_error(compute: ArrayLike, error: ArrayLike, *, name: str = "the data") -> HeldOut:
  """Fits without the largest-compute point and predicts it (needs six points)."""
  compute, error = _pair(compute, error)
  if len(compute) < MIN_POINTS + 1:
    raise ValueError(
        f"{name} has {len(compute)} points; holding one out of a saturating power-law fit needs "
        f"at least {MIN_POINTS + 1}")
  last = int(np.argmax(compute))
  keep = np.arange(len(compute)) != last
  fit = fit_saturating_power_law(compute[keep], error[keep], name=f"{name} without its last point")
  return HeldOut(compute=float(compute[last]), observed=float(error[last]),
                 predicted=float(fit.predict(compute[last])), fit=fit)


def _pair(compute: ArrayLike, error: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  compute = np.asarray(compute, dtype=float).ravel()
  error = np.asarray(error, dtype=float).ravel()
  if compute.shape != error.shape:
    raise ValueError(f"compute and error differ in length: {len(compute)} and {len(error)}")
  return compute, error


def _starts(x: np.ndarray, error: np.ndarray, keep: int = 6) -> list[np.ndarray]:
  """The best ``keep`` starting points (log a, b, c, d) of a grid over c and d.

  For fixed c and d the law is a straight line, log(E − c) = log a − b·log(x + d), so a and b come
  from a linear regression; each start is scored by its residual on log E.
  """
  e_min = float(error.min())
  log_e = np.log(error)
  quantiles = np.quantile(x, [0.0, 0.25, 0.5])
  d_grid = np.concatenate([[0.0], np.outer(quantiles, [0.3, 1.0, 3.0]).ravel()])
  scored = []
  for c in e_min * np.array([0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99]):
    y = np.log(error - c)
    for d in np.unique(d_grid):
      log_u = np.log(x + d)
      if np.ptp(log_u) == 0:
        continue
      slope, intercept = np.polyfit(log_u, y, 1)
      b = max(-slope, 1e-3)
      theta = np.array([intercept, b, c, d])
      cost = np.sum((np.log(np.exp(intercept) * (x + d) ** (-b) + c) - log_e) ** 2)
      if np.isfinite(cost):
        scored.append((cost, theta))
  scored.sort(key=lambda item: item[0])
  return [theta for _, theta in scored[:keep]]
