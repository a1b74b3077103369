"""Few-shot linear evaluation (vit_jax/few_shot, few_shot.py): the closed-form solver against
NumPy and scikit-learn, the k-shot draws, features on 8 devices and on one, the trainer's hook
and the command line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier

from configs import detection, families
from tests.conftest import subprocess_xla_flags
from tests.train_configs import tiny_config
from vit_jax import few_shot
from vit_jax.few_shot import features, solver
from vit_jax.train import checkpointing, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "sklearn_digits:train:test"
# tiny_config() as train.py overrides spell it, with the few-shot options of the trained run.
TINY_FLAGS = ["--config.model.hidden_size=32", "--config.model.num_layers=2",
              "--config.model.num_heads=2", "--config.model.mlp_dim=64",
              "--config.eval_batch_size=80", f"--config.few_shot.datasets=('{DIGITS}',)",
              "--config.few_shot.shots=(1, 5)", "--config.few_shot.seeds=2"]


def few_shot_config(**overrides):
  return tiny_config(**{"few_shot.datasets": (DIGITS,), "few_shot.shots": (1, 5),
                        "few_shot.seeds": 2, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 10-step tiny ViT run with few-shot evaluation every 5 steps: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("few_shot_run"))
  return workdir, trainer.train_and_evaluate(few_shot_config(**{"few_shot.every": 5}), workdir)


# ------------------------------------------------------------------------------------ solver

@pytest.mark.parametrize("n, d", [(60, 12), (12, 60)], ids=["N>=D", "N<D"])
@pytest.mark.parametrize("l2", [0.5, 2.0 ** 10])
def test_solver_matches_numpy_reference(n, d, l2):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
  ridge = solver.Ridge(x)
  assert ridge.primal == (d <= n)
  want = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)
  np.testing.assert_allclose(solver.solve(x, y, l2), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_per_class, d", [(20, 8), (3, 40)], ids=["N>=D", "N<D"])
def test_predictions_equal_sklearn_ridge_classifier(n_per_class, d):
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(4, d))
  labels = np.repeat(np.arange(4) * 3 + 2, n_per_class)  # labels need not be 0..C-1
  x = centres[labels // 3] + 1.5 * rng.normal(size=(len(labels), d))
  test_labels = rng.integers(0, 4, 200) * 3 + 2
  test_x = centres[test_labels // 3] + 1.5 * rng.normal(size=(200, d))
  for l2 in (1.0, 2.0 ** 10):
    ours = solver.fit_predict(x, labels, test_x, (l2,))[l2]
    fit, test = solver.standardise(x, test_x)
    ref = RidgeClassifier(alpha=l2, fit_intercept=False).fit(fit, labels)
    np.testing.assert_array_equal(ours, ref.predict(test))
    assert 0.3 < np.mean(ours == test_labels)  # the data is learnable, so the check is not vacuous


def test_standardisation_and_bias_as_defined():
  fit = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
  other = np.array([[7.0, 11.0]])
  std0 = np.sqrt(8 / 3) + 1e-5  # column 0: mean 3, population variance 8/3; column 1: constant
  got_fit, got_other = solver.standardise(fit, other)
  np.testing.assert_allclose(got_fit, [[-2 / std0, 0, 100], [0, 0, 100], [2 / std0, 0, 100]])
  np.testing.assert_allclose(got_other, [[4 / std0, 1 / 1e-5, 100]])
  np.testing.assert_array_equal(solver.targets(np.array([5, 2]), np.array([2, 5, 9])),
                                [[-1, 1, -1], [1, -1, -1]])


def test_k_shot_sets_are_nested_balanced_and_reproducible():
  labels = np.random.default_rng(2).permutation(np.repeat(np.arange(5), 30))
  sets = few_shot.subsets(labels, (1, 5, 10, 25), seed=0)
  for small, large in ((1, 5), (5, 10), (10, 25)):
    assert set(sets[small]) < set(sets[large])
  for k, idx in sets.items():
    assert len(set(idx)) == len(idx) and np.all(np.bincount(labels[idx]) == k)
  again = few_shot.subsets(labels, (1, 5, 10, 25), seed=0)
  assert all(np.array_equal(sets[k], again[k]) for k in sets)
  # The shots asked for do not change the draws; another seed changes them.
  np.testing.assert_array_equal(few_shot.subsets(labels, (5,), seed=0)[5], sets[5])
  assert not np.array_equal(few_shot.subsets(labels, (5,), seed=1)[5], sets[5])


def test_l2_grid_picks_per_shot_and_reports_it():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(3), 30)
  x = np.eye(3)[labels] @ rng.normal(size=(3, 16)) + rng.normal(size=(90, 16))
  results = few_shot.evaluate_features("toy", (x, labels), (x, labels), shots=(2, 10), seeds=2,
                                       l2_reg=5.0, l2_grid=(1e-3, 1.0, 1e3))
  assert [r.shots for r in results] == [2, 10]
  assert all(r.l2 in (1e-3, 1.0, 1e3) and len(r.accuracies) == 2 for r in results)
  fixed = few_shot.evaluate_features("toy", (x, labels), (x, labels), shots=(2,), seeds=2,
                                     l2_reg=5.0)
  assert fixed[0].l2 == 5.0
  assert few_shot.metrics(fixed) == {"fewshot/toy/2shot": pytest.approx(fixed[0].mean)}


# ------------------------------------------------------------------- features on the mesh

@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_eight_devices_give_the_accuracies_of_one(family):
  if family == "vit":
    config = few_shot_config()
  else:
    config = families.get_config("mixer")
    config.model.num_layers = 1
    config.eval_batch_size = 80
    config.few_shot.update(datasets=(DIGITS,), shots=(1, 5), seeds=2)
  eight = trainer.make_setup(config)
  one = trainer.make_setup(config, devices=jax.devices()[:1])
  assert eight.mesh.size == 8 and one.mesh.size == 1
  state8 = eight.init_state()
  state1 = jax.device_put(jax.device_get(state8), one.shardings)
  results = []
  for setup, state in ((eight, state8), (one, state1)):
    train, test = (features.extract(setup, state, dataset="sklearn_digits", split=split,
                                    pp=config.pp_eval) for split in ("train", "test"))
    results.append((train, test, few_shot.evaluate_features(
        "sklearn_digits", train, test, shots=(1, 5, 25), seeds=2, l2_reg=2.0 ** 10)))
  (train8, test8, on_eight), (train1, test1, on_one) = results
  assert train8[0].shape == (1497, config.model.hidden_size) and test8[0].std() > 0
  for got, want in ((train8, train1), (test8, test1)):
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
  assert [r.accuracies for r in on_eight] == [r.accuracies for r in on_one]


def test_trainer_writes_few_shot_metrics(trained):
  workdir, final = trained
  keys = {"fewshot/sklearn_digits/1shot", "fewshot/sklearn_digits/5shot"}
  assert keys <= set(final) and "top1" in final
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [r for r in records if keys <= set(r)]
  assert [r["step"] for r in logged] == [5, 10]
  assert all(0.0 < logged[-1][k] <= 1.0 and logged[-1][k] == final[k] for k in keys)
  saved = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert {k: saved[k] for k in keys} == {k: final[k] for k in keys}


# ---------------------------------------------------------------------------- bad input

def options(**changes):
  c = few_shot_config().few_shot
  c.update(**changes)
  return c


@pytest.mark.parametrize("changes, message", [
    (dict(datasets=("sklearn_digits:train",)),
     r"'sklearn_digits:train' is not 'name:train_split:test_split'"),
    (dict(datasets=(DIGITS, "sklearn_digits:train[:50]:test")),
     r"names \['sklearn_digits'\] more than once"),
    (dict(shots=(0, 5)), r"shots must be positive integers .* got \(0, 5\)"),
    (dict(shots=(5, 5)), r"repeats a value"),
    (dict(seeds=0), r"seeds must be an integer >= 1 .* got 0"),
    (dict(l2_grid=(1.0, -2.0)), r"l2_grid must be positive"),
])
def test_bad_options_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    few_shot.check_options(options(**changes))


def test_shots_beyond_the_smallest_class_are_refused():
  labels = np.array([0] * 10 + [1] * 4 + [2] * 10)
  x = np.zeros((len(labels), 3))
  with pytest.raises(ValueError, match=r"5-shot needs 5 examples of every class in the training "
                                       r"split of few-shot dataset 'toy', but class 1 has only 4; "
                                       r"valid shots are 1 to 4"):
    few_shot.evaluate_features("toy", (x, labels), (x, labels), shots=(1, 5), seeds=1, l2_reg=1.0)


def test_spec_parsing_keeps_colons_of_names_and_slices():
  assert few_shot.parse_spec("cifar100:train[:800]:test[10%:]") == few_shot.DatasetSpec(
      "cifar100", "train[:800]", "test[10%:]")
  assert few_shot.parse_spec("imagefolder:/data/x:train:val").name == "imagefolder:/data/x"


def test_a_detector_is_refused():
  config = detection.get_config("yolos_digits")
  config.few_shot.datasets = (DIGITS,)
  setup = trainer.make_setup(config)
  with pytest.raises(ValueError, match=r"the 'detection' task's model .* has none; it serves the "
                                       r"classification task"):
    few_shot.FewShotEvaluator(setup)


# ---------------------------------------------------------------------------- command line

def test_command_line_on_a_checkpoint(trained):
  workdir, final = trained
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=subprocess_xla_flags())  # one device
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "few_shot.py"), "--config",
       os.path.join(ROOT, "configs/default.py"), "--checkpoint",
       os.path.join(workdir, "checkpoints", "10"), *TINY_FLAGS],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "1-shot" in out.stdout and "5-shot" in out.stdout and "sklearn_digits" in out.stdout
  result = json.loads(open(os.path.join(workdir, "fewshot_10.json")).read())
  assert result["step"] == 10
  detail = result["results"]["sklearn_digits"]["5shot"]
  assert len(detail["accuracies"]) == 2 and detail["l2"] == 2.0 ** 10
  # One device here, eight in the run: the same accuracies.
  for k in ("fewshot/sklearn_digits/1shot", "fewshot/sklearn_digits/5shot"):
    assert result[k] == pytest.approx(final[k], abs=1e-12)
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "few_shot.py"), "--config",
       os.path.join(ROOT, "configs/default.py"), "--workdir", workdir, *TINY_FLAGS,
       "--config.few_shot.seeds=0"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: config.few_shot.seeds must be an integer >= 1"), bad.stderr[-2000:]
