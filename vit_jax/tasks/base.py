"""The task protocol: what the trainer asks of a task, and the task registry.

Losses and metrics travel as ``(sum, weight)`` pairs: a microbatch, a device or a process
adds its sums and its weights, and the mean ``sum / weight`` is taken once, at the end. So a
loss normalised by a per-batch count (valid boxes, unmasked examples) accumulates exactly.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np
from flax import nnx

# name -> (sum, weight); the trainer reports sum / weight.
LossTerms = dict[str, tuple[jax.Array, jax.Array]]


class Evaluator(Protocol):
  """Host-side evaluation: fed each eval batch's device outputs (numpy, gathered from every
  process), asked for the metrics once at the end."""

  def update(self, outputs: Any) -> None: ...
  def result(self) -> dict[str, float]: ...


class Task(Protocol):
  """What differs between tasks; the trainer, step, sharding and checkpoints name no metric.

  ``objective``: the loss terms the training objective is made of, with their coefficients;
  the objective is ``sum_i coef_i * sum_i / weight_i`` over the whole (global) batch.
  """

  objective: Mapping[str, float]

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...
  def signature(self) -> dict: ...
  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array, train: bool) -> LossTerms: ...
  def eval_outputs(self, model: nnx.Module, batch: dict) -> Any: ...
  def evaluator(self) -> Evaluator: ...
  def format_metrics(self, metrics: Mapping[str, Any]) -> str: ...
  def input_spec(self, batch_size: int) -> dict: ...  # the largest batch the data yields
  def input_specs(self, batch_size: int) -> list[dict]: ...  # every batch shape it yields
  def data_order(self) -> dict: ...  # its settings that order the training data (JSON; empty: off)
  def train_data(self, start_step: int) -> Iterator[dict]: ...
  def eval_data(self, split: str | None = None) -> Iterator[dict]: ...


class SumEvaluator:
  """Adds ``(sum, weight)`` pairs over batches; the result is each ``sum / weight``."""

  def __init__(self, count_name: str | None = None):
    self.sums: dict[str, float] = {}
    self.weights: dict[str, float] = {}
    self.count_name = count_name

  def update(self, outputs: Mapping[str, tuple[Any, Any]]) -> None:
    for k, (s, w) in outputs.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(s, np.float64))
      self.weights[k] = self.weights.get(k, 0.0) + float(np.asarray(w, np.float64))

  def result(self) -> dict[str, float]:
    if not self.sums:
      raise ValueError("the evaluation saw no batches")
    out = {k: self.sums[k] / max(self.weights[k], 1e-12) for k in self.sums}
    if self.count_name:
      out[self.count_name] = int(round(max(self.weights.values())))
    return out


def model_kwargs(config: Any) -> dict:
  """``models.create`` options from the config's ``model`` block: every key but ``name`` that
  is set (None means the family's default)."""
  return {k: v for k, v in config.model.items() if k != "name" and v is not None}


_TASKS: dict[str, Callable[[Any], Task]] = {}
_discovered = False


def register(name: str, cls: Callable[[Any], Task]) -> None:
  """Registers the task ``name`` (``config.task``); ``cls(config)`` builds it."""
  _TASKS[name] = cls


def _discover() -> None:
  global _discovered
  if _discovered:
    return
  _discovered = True
  package = importlib.import_module("vit_jax.tasks")
  for info in pkgutil.iter_modules(package.__path__):
    if info.name != "base":
      importlib.import_module(f"vit_jax.tasks.{info.name}")


def names() -> list[str]:
  _discover()
  return sorted(_TASKS)


def create(config: Any) -> Task:
  """The task named by ``config.task``."""
  _discover()
  if config.task not in _TASKS:
    raise ValueError(f"task {config.task!r} is not one of {names()}")
  return _TASKS[config.task](config)
