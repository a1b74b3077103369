"""Few-shot linear evaluation (the ViT paper's; big_vision's ``fewshot_lsr``).

For each dataset ("name:train_split:test_split") and seed: each class's training examples are
permuted (``np.random.default_rng(seed)``) and the first k taken for every k of ``shots``, so the
k-shot sets of one seed are nested and the same on every call. A linear classifier is fit in
closed form to the k-shot set's frozen pre-logits (``vit_jax.few_shot.solver``) and scored on the
whole test split; the metric is the accuracy averaged over the seeds.

``l2_grid``: for each dataset and k the l2 of the grid with the best accuracy on a held-out fifth
of the k-shot set (fit on the rest), summed over the seeds, instead of ``l2_reg``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax.few_shot import features as features_lib
from vit_jax.few_shot.solver import fit_predict


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  train_split: str
  test_split: str


@dataclasses.dataclass(frozen=True)
class Result:
  """One dataset's k-shot accuracy on its test split, for each seed."""
  dataset: str
  shots: int
  accuracies: tuple[float, ...]
  l2: float

  @property
  def mean(self) -> float:
    return float(np.mean(self.accuracies))

  @property
  def std(self) -> float:
    return float(np.std(self.accuracies))

  @property
  def metric(self) -> str:
    return f"fewshot/{self.dataset}/{self.shots}shot"


def _split_outside_brackets(text: str) -> list[str]:
  """``text`` split at the colons outside brackets (tfds slices such as "train[:800]")."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == ":" and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def parse_spec(spec: str) -> DatasetSpec:
  """"name:train_split:test_split" (the name may hold colons, as "imagefolder:/root" does)."""
  parts = _split_outside_brackets(spec) if isinstance(spec, str) else []
  if len(parts) < 3 or not all(parts):
    raise ValueError(f"few-shot dataset {spec!r} is not 'name:train_split:test_split' (e.g. "
                     "'sklearn_digits:train:test' or 'cifar100:train[:10000]:test')")
  return DatasetSpec(":".join(parts[:-2]), parts[-2], parts[-1])


def check_options(options: Any) -> list[DatasetSpec]:
  """Checks ``config.few_shot``; returns its datasets. Raises a ValueError naming what is wrong."""
  datasets = options.datasets
  if isinstance(datasets, str):
    raise ValueError(f"config.few_shot.datasets must be a tuple of 'name:train:test' strings, got "
                     f"the string {datasets!r} (write ({datasets!r},))")
  specs = [parse_spec(s) for s in datasets]
  names = [s.name for s in specs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"config.few_shot.datasets names {repeated} more than once; the metrics "
                     "(fewshot/<dataset>/<k>shot) are keyed by dataset name, so give each once")
  shots = tuple(options.shots)
  if not shots or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1
                      for k in shots):
    raise ValueError(f"config.few_shot.shots must be positive integers (examples per class, e.g. "
                     f"(1, 5, 10, 25)), got {shots}")
  if len(set(shots)) != len(shots):
    raise ValueError(f"config.few_shot.shots {shots} repeats a value; give each k once")
  if not isinstance(options.seeds, (int, np.integer)) or options.seeds < 1:
    raise ValueError(f"config.few_shot.seeds must be an integer >= 1 (the number of random "
                     f"k-shot draws), got {options.seeds!r}")
  for key, values in (("l2_reg", (options.l2_reg,)), ("l2_grid", tuple(options.l2_grid))):
    if any(not isinstance(v, (int, float)) or not v > 0 for v in values):
      raise ValueError(f"config.few_shot.{key} must be positive (l2 regularisation), got "
                       f"{getattr(options, key)!r}")
  if not isinstance(options.every, int) or options.every < 0:
    raise ValueError(f"config.few_shot.every must be an integer >= 0 (0: at the evaluation steps), "
                     f"got {options.every!r}")
  return specs


def check_shots(labels: np.ndarray, shots: Sequence[int],
                where: str = "the training split") -> None:
  """Raises a ValueError unless every class of ``labels`` has max(shots) examples or more."""
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < 2:
    raise ValueError(f"{where} holds {len(classes)} class(es); few-shot classification needs two "
                     "or more")
  smallest, k = int(np.argmin(counts)), max(shots)
  if k > counts[smallest]:
    raise ValueError(f"{k}-shot needs {k} examples of every class in {where}, but class "
                     f"{classes[smallest]} has only {counts[smallest]}; valid shots are 1 to "
                     f"{counts[smallest]}")


def subsets(labels: np.ndarray, shots: Sequence[int], seed: int) -> dict[int, np.ndarray]:
  """k -> indices into ``labels`` of the first k examples of each class (classes in ascending
  order) after permuting each class's examples with ``np.random.default_rng(seed)``."""
  labels = np.asarray(labels)
  check_shots(labels, shots)
  rng = np.random.default_rng(seed)
  perms = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  return {k: np.concatenate([p[:k] for p in perms]) for k in shots}


def _choose_l2(x: np.ndarray, y: np.ndarray, sets: Sequence[np.ndarray], k: int,
               grid: tuple[float, ...], classes: np.ndarray) -> float:
  """The l2 of ``grid`` with the most correct predictions on a held-out fifth of each seed's
  k-shot set (drawn with ``default_rng((seed, k))``), fit on the rest; ties go to the first."""
  correct = np.zeros(len(grid))
  for seed, idx in enumerate(sets):
    perm = np.random.default_rng((seed, k)).permutation(idx)
    held = max(1, len(perm) // 5)
    predictions = fit_predict(x[perm[held:]], y[perm[held:]], x[perm[:held]], grid, classes)
    correct += [np.sum(predictions[l2] == y[perm[:held]]) for l2 in grid]
  return grid[int(np.argmax(correct))]


def evaluate_features(name: str, train: tuple[np.ndarray, np.ndarray],
                      test: tuple[np.ndarray, np.ndarray], *, shots: Sequence[int], seeds: int,
                      l2_reg: float, l2_grid: Sequence[float] = ()) -> list[Result]:
  """The few-shot results of one dataset from its (features, labels) of each split."""
  (train_x, train_y), (test_x, test_y) = train, test
  check_shots(train_y, shots, f"the training split of few-shot dataset {name!r}")
  classes = np.unique(train_y)
  sets = [subsets(train_y, shots, seed) for seed in range(seeds)]
  results = []
  for k in shots:
    l2 = (_choose_l2(train_x, train_y, [s[k] for s in sets], k, tuple(l2_grid), classes)
          if l2_grid else l2_reg)
    accuracies = tuple(
        float(np.mean(fit_predict(train_x[s[k]], train_y[s[k]], test_x, (l2,), classes)[l2]
                      == test_y)) for s in sets)
    results.append(Result(name, k, accuracies, float(l2)))
  return results


class FewShotEvaluator:
  """Few-shot evaluation of a run's model on ``config.few_shot.datasets``: checks the options,
  the model and the datasets' splits when built, computes the features on each ``run``."""

  def __init__(self, setup: Any):
    self.setup = setup
    self.options = setup.config.few_shot
    self.specs = check_options(self.options)
    features_lib.check_classifier(setup)
    self.pp = self.options.pp or setup.config.pp_eval
    from vit_jax import data  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    c = setup.config
    for spec in self.specs:  # a missing dataset or split fails now, not at the first evaluation
      for split in (spec.train_split, spec.test_split):
        data.num_eval_batches(dataset=spec.name, split=split, pp=self.pp,
                              batch_size=c.eval_batch_size, data_dir=c.data_dir,
                              num_shards=c.num_data_shards or None)
    self._step = None

  def run(self, state: Any) -> list[Result]:
    """Every dataset's results for every k, in the order of the config."""
    if self._step is None:
      self._step = features_lib.make_feature_step(self.setup)
    o, results = self.options, []
    for spec in self.specs:
      extract = functools.partial(features_lib.extract, self.setup, state, dataset=spec.name,
                                  pp=self.pp, feature_step=self._step)
      train = extract(split=spec.train_split)
      check_shots(train[1], o.shots, f"the training split of few-shot dataset {spec.name!r}")
      results += evaluate_features(spec.name, train, extract(split=spec.test_split),
                                   shots=o.shots, seeds=o.seeds, l2_reg=o.l2_reg,
                                   l2_grid=tuple(o.l2_grid))
    return results


def evaluate(setup: Any, state: Any) -> list[Result]:
  """Few-shot evaluation of ``state`` on the datasets of ``setup.config.few_shot``."""
  return FewShotEvaluator(setup).run(state)


def metrics(results: Sequence[Result]) -> dict[str, float]:
  """``fewshot/<dataset>/<k>shot`` -> the accuracy averaged over the seeds."""
  return {r.metric: r.mean for r in results}


def as_json(results: Sequence[Result]) -> dict[str, Any]:
  """The metrics and, per dataset and k, each seed's accuracy, their mean and std, and the l2."""
  detail: dict[str, dict[str, Any]] = {}
  for r in results:
    detail.setdefault(r.dataset, {})[f"{r.shots}shot"] = {
        "mean": r.mean, "std": r.std, "accuracies": list(r.accuracies), "l2": r.l2}
  return {**metrics(results), "results": detail}


def format_table(results: Sequence[Result]) -> str:
  """A table of accuracies, datasets by k: the mean ± std over the seeds."""
  shots = sorted({r.shots for r in results})
  by_key: Mapping[tuple[str, int], Result] = {(r.dataset, r.shots): r for r in results}
  datasets = list(dict.fromkeys(r.dataset for r in results))
  width = max([len("dataset")] + [len(d) for d in datasets])
  lines = ["  ".join([f"{'dataset':<{width}}"] + [f"{f'{k}-shot':>15}" for k in shots])]
  for d in datasets:
    cells = [f"{by_key[d, k].mean:.4f} ± {by_key[d, k].std:.4f}" if (d, k) in by_key else "-"
             for k in shots]
    lines.append("  ".join([f"{d:<{width}}"] + [f"{c:>15}" for c in cells]))
  return "\n".join(lines)
