"""Sweeps: named train.py runs (models × data sizes × durations × seeds) and their dependent stages.

A sweep is a file ``configs/sweeps/NAME.py`` whose ``get_sweep(arg=None)`` returns a ``Sweep``: a
list of ``Run``s, each an ordinary command (``train.py --config SPEC --workdir ROOT/<name>
--config.KEY=VALUE ...``) with its own workdir under the sweep's root. A run may start from
another (its ``parent``): a fine-tuning run loads the parent's checkpoint
(``--config.pretrained=ROOT/<parent>``), a few-shot run evaluates it (``few_shot.py --workdir
ROOT/<parent> --output ROOT/<name>/few_shot.json``). ``Sweep.product`` builds the usual grid::

  def get_sweep(arg=None):
    return Sweep.product(
        config="configs/default.py",
        models=["ViT-Ti/2", "ViT-S/2"],
        data_sizes=["train[:25%]", "train"],
        steps=[500, 2000],
        seeds=[0, 1],
        transfers=[Transfer("digits", config="configs/default.py")],
        few_shot=FewShot(overrides={"few_shot.datasets": ("sklearn_digits:train:test",),
                                    "few_shot.shots": (1, 5)}))

``resolve(sweep, root)`` checks every run before anything starts (the model names, every config
key and value, as train.py would parse them) and describes each: its command, model, family,
parameter count, pre-training data size, steps, batch size, examples seen and training FLOPs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("pretrain", "finetune", "fewshot")
TRAIN_MARKER = "final_metrics.json"     # train.py writes it when a run completes
FEW_SHOT_OUTPUT = "few_shot.json"
# Config spec templates of transfers and few-shot stages may name these; {model} is the
# pre-trained model's name, {dataset} the transfer's dataset.
DEFAULT_TRANSFER_CONFIG = "configs/finetune.py:model={model},dataset={dataset}"


@dataclasses.dataclass(frozen=True)
class Run:
  """One command of a sweep.

  config: ``configs/NAME.py[:ARG]`` (relative to the repository), in which ``{model}`` and
    ``{dataset}`` are replaced by the model's name and the transfer's dataset.
  overrides: config key -> value, given as ``--config.KEY=VALUE``.
  stage: "pretrain" | "finetune" | "fewshot"; a finetune or fewshot run names its ``parent``.
  program: the script, relative to the repository (``train.py``; ``few_shot.py`` for fewshot).
  data_size: the number of pre-training examples (None: counted from the dataset's split).
  epochs: sets ``total_steps`` to ceil(epochs × data_size / batch_size).
  dataset: the transfer's name in the results' metric columns.
  label: the model's name in the results when the model axis names it (e.g. "ViT-S" for a
    ViT-Ti/2 with a width of 32); None: the registered name.
  """
  name: str
  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  stage: str = "pretrain"
  parent: str | None = None
  program: str = "train.py"
  data_size: int | None = None
  epochs: float | None = None
  dataset: str | None = None
  label: str | None = None


@dataclasses.dataclass(frozen=True)
class Data:
  """A data-size axis value: the training split, and its number of examples if not to be counted
  (``examples``); ``label`` names it in run names; ``overrides`` go with it (e.g. the dataset)."""
  split: str | None = None
  examples: int | None = None
  label: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Transfer:
  """Fine-tuning of each pre-trained run on ``dataset``: a train.py run of ``config`` from the
  pre-trained checkpoint. ``inherit_model``: take the pre-training run's ``model.*`` overrides
  (the checkpoint's architecture) unless ``overrides`` sets them."""
  dataset: str
  config: str = DEFAULT_TRANSFER_CONFIG
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  inherit_model: bool = True


@dataclasses.dataclass(frozen=True)
class FewShot:
  """Few-shot evaluation of each pre-trained run: ``program --config SPEC --workdir ROOT/<parent>
  --output ROOT/<name>/few_shot.json``. ``config`` None: the pre-training run's config and
  overrides (so the same model), plus ``overrides``."""
  config: str | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  name: str = "fewshot"
  program: str = "few_shot.py"


def label(text: Any) -> str:
  """A run-name part: 'ViT-B/16' -> 'ViT-B16', 'train[:50%]' -> 'train-50pct'."""
  text = str(text).replace("/", "").replace("%", "pct")
  return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9.+-]", "-", text)).strip("-") or "x"


@dataclasses.dataclass
class Sweep:
  """Named runs, each after its parent."""
  runs: list[Run]

  def __post_init__(self):
    self.runs = list(self.runs)
    seen: set[str] = set()
    for run in self.runs:
      if not isinstance(run, Run):
        raise ValueError(f"a sweep holds Run objects, got {run!r}")
      if run.name in seen:
        raise ValueError(f"two runs are named {run.name!r}")
      if not re.fullmatch(r"[A-Za-z0-9+-][A-Za-z0-9._+-]*", run.name):
        raise ValueError(f"run name {run.name!r}: use letters, digits and . + - _ only")
      if run.stage not in STAGES:
        raise ValueError(f"run {run.name}: stage {run.stage!r} is not one of {list(STAGES)}")
      if (run.parent is None) != (run.stage == "pretrain"):
        raise ValueError(f"run {run.name}: a {run.stage} run " +
                         ("needs a parent" if run.parent is None else "has no parent"))
      if run.parent is not None and run.parent not in seen:
        raise ValueError(f"run {run.name}: its parent {run.parent!r} is not an earlier run of "
                         "the sweep")
      seen.add(run.name)

  def __add__(self, other: "Sweep") -> "Sweep":
    return Sweep(self.runs + other.runs)

  def __getitem__(self, name: str) -> Run:
    for run in self.runs:
      if run.name == name:
        return run
    raise KeyError(name)

  def names(self) -> list[str]:
    return [r.name for r in self.runs]

  def children(self, name: str) -> list[Run]:
    return [r for r in self.runs if r.parent == name]

  def select(self, pattern: str | None) -> list[Run]:
    """The runs whose name matches ``pattern`` (``re.search``), with the runs they start from."""
    if not pattern:
      return list(self.runs)
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"--only {pattern!r} is not a regular expression: {e}") from None
    wanted = {r.name for r in self.runs if regex.search(r.name)}
    if not wanted:
      raise ValueError(f"--only {pattern!r} matches no run; the runs: {', '.join(self.names())}")
    for run in reversed(self.runs):
      if run.name in wanted and run.parent:
        wanted.add(run.parent)
    return [r for r in self.runs if r.name in wanted]

  @classmethod
  def product(cls, *, config: str,
              models: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
              data_sizes: Sequence[str | Data] | None = None,
              steps: Sequence[int] | None = None, epochs: Sequence[float] | None = None,
              seeds: Sequence[int] = (0,), overrides: Mapping[str, Any] | None = None,
              transfers: Sequence[Transfer] = (), few_shot: FewShot | Sequence[FewShot] = (),
              prefix: str = "") -> "Sweep":
    """Pre-training runs of ``config`` for every model × data size × duration × seed, each
    followed by its transfers and few-shot evaluations.

    models: model names (``model.name``), or {label: overrides} for models with options.
    data_sizes: training splits (``train_split``) or ``Data``; None: the config's own.
    steps / epochs: ``total_steps``, or epochs of the data size; None: the config's own.
    overrides: for every pre-training run. Run names: ``PREFIX<model>_<data>_<N>steps_s<seed>``
    (an axis left out is left out of the names), then ``_ft-<dataset>`` and ``_fewshot``.
    """
    if steps is not None and epochs is not None:
      raise ValueError("give steps or epochs, not both")
    model_axis = _model_axis(models)
    data_axis = [(None, Data())] if data_sizes is None else [_data_value(d) for d in data_sizes]
    if steps is not None:
      time_axis = [(f"{s}steps", {"total_steps": int(s)}, None) for s in steps]
    elif epochs is not None:
      time_axis = [(f"{e:g}ep", {}, float(e)) for e in epochs]
    else:
      time_axis = [(None, {}, None)]
    fews = [few_shot] if isinstance(few_shot, FewShot) else list(few_shot)
    runs = []
    for model_label, model_overrides in model_axis:
      for data_label, data in data_axis:
        for time_label, time_overrides, run_epochs in time_axis:
          for seed in seeds:
            parts = [model_label, data_label, time_label, f"s{seed}"]
            name = prefix + "_".join(p for p in parts if p)
            values = {**(overrides or {}), **model_overrides, **dict(data.overrides),
                      **({"train_split": data.split} if data.split is not None else {}),
                      **time_overrides, "seed": int(seed)}
            pretrain = Run(name, config, values, data_size=data.examples, epochs=run_epochs,
                           label=model_label if isinstance(models, Mapping) else None)
            runs += [pretrain, *(transfer_run(pretrain, t) for t in transfers),
                     *(few_shot_run(pretrain, f) for f in fews)]
    return cls(runs)


def transfer_run(parent: Run, transfer: Transfer) -> Run:
  """The fine-tuning run of ``parent`` on ``transfer.dataset``."""
  inherited = {k: v for k, v in parent.overrides.items()
               if k.startswith("model.")} if transfer.inherit_model else {}
  overrides = {**inherited, "seed": parent.overrides.get("seed", 0), **dict(transfer.overrides)}
  return Run(f"{parent.name}_ft-{label(transfer.dataset)}", transfer.config, overrides,
             stage="finetune", parent=parent.name, dataset=transfer.dataset, label=parent.label)


def few_shot_run(parent: Run, few_shot: FewShot) -> Run:
  """The few-shot evaluation of ``parent``."""
  config = parent.config if few_shot.config is None else few_shot.config
  base = dict(parent.overrides) if few_shot.config is None else {}
  return Run(f"{parent.name}_{label(few_shot.name)}", config, {**base, **dict(few_shot.overrides)},
             stage="fewshot", parent=parent.name, program=few_shot.program, label=parent.label)


def _model_axis(models: Any) -> list[tuple[str | None, dict]]:
  if models is None:
    return [(None, {})]
  if isinstance(models, str):
    raise ValueError(f"models is a list of names (or a dict), got the string {models!r}")
  if isinstance(models, Mapping):
    return [(label(k), dict(v)) for k, v in models.items()]
  return [(label(m), {"model.name": m}) for m in models]


def _data_value(value: str | Data) -> tuple[str, Data]:
  data = Data(split=value) if isinstance(value, str) else value
  if not isinstance(data, Data):
    raise ValueError(f"data_sizes holds splits or Data(...), got {value!r}")
  return label(data.label or data.split or "data"), data


# --- Loading a sweep file ---------------------------------------------------------------------

def _find(path: str) -> str | None:
  for candidate in (path, os.path.join(REPO, path)):
    if os.path.isfile(candidate):
      return candidate
  return None


def load_sweep(spec: str) -> Sweep:
  """``configs/sweeps/NAME.py[:ARG]`` -> the Sweep its ``get_sweep(ARG)`` returns."""
  path, _, arg = spec.partition(":")
  found = _find(path)
  if found is None:
    here = os.path.join(REPO, "configs", "sweeps")
    files = sorted(f"configs/sweeps/{n}" for n in os.listdir(here)
                   if n.endswith(".py") and not n.startswith("_")) if os.path.isdir(here) else []
    raise ValueError(f"no sweep file {path!r}" +
                     (f"; the sweeps: {', '.join(files)}" if files else ""))
  module = _load_module(found, "_sweep_file")
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} has no get_sweep(arg=None)")
  sweep = module.get_sweep(arg or None)
  if not isinstance(sweep, Sweep):
    raise ValueError(f"{path}: get_sweep returned {type(sweep).__name__}, not a Sweep")
  return sweep


def _load_module(path: str, name: str) -> Any:
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


# --- Checking and describing every run --------------------------------------------------------

@dataclasses.dataclass
class Resolved:
  """A checked run: its command (``argv`` after the Python executable, run in the repository),
  the file that marks it complete, and its description (``info``)."""
  run: Run
  config: str
  overrides: dict[str, Any]
  argv: list[str]
  marker: str                 # path of the completion file, relative to ROOT/<name>
  info: dict[str, Any]        # model, family, params, data_size, steps, batch_size,
                              # examples_seen, seed, flops (this run's training FLOPs),
                              # pretrain_flops (of the pre-training run)

  def to_json(self) -> dict:
    return {"name": self.run.name, "stage": self.run.stage, "parent": self.run.parent,
            "dataset": self.run.dataset, "program": self.run.program, "config": self.config,
            "overrides": self.overrides, "argv": self.argv, "marker": self.marker, **self.info}


def resolve(sweep: Sweep, root: str, runs: Iterable[Run] | None = None) -> list[Resolved]:
  """Checks and describes ``runs`` (default: all) of ``sweep`` with workdirs under ``root``.

  Raises ValueError naming the run and what is wrong before anything starts: an unknown model
  (listing the valid names), an unknown config key (listing the valid keys), a value train.py
  would refuse, a model option the family does not take.
  """
  root = os.path.abspath(root)
  wanted = {r.name for r in (sweep.runs if runs is None else runs)}
  needed = set(wanted)
  for run in reversed(sweep.runs):
    if run.name in needed and run.parent:
      needed.add(run.parent)
  done: dict[str, Resolved] = {}
  for run in sweep.runs:
    if run.name not in needed:
      continue
    try:
      done[run.name] = _resolve(run, done.get(run.parent) if run.parent else None, root)
    except ValueError as e:
      raise ValueError(f"run {run.name}: {e}") from None
  return [done[r.name] for r in sweep.runs if r.name in wanted]


def _resolve(run: Run, parent: Resolved | None, root: str) -> Resolved:
  fields = {"model": (parent.info["model"] if parent else run.overrides.get("model.name", "")),
            "dataset": run.dataset or ""}
  try:
    spec = run.config.format(**fields)
  except (KeyError, IndexError) as e:
    raise ValueError(f"config {run.config!r} names {e}; it may name {{model}} and "
                     "{dataset}") from None
  overrides = dict(run.overrides)
  if run.stage == "finetune":
    overrides["pretrained"] = os.path.join(root, parent.run.name)
  config = parse_config(spec, overrides)
  info = _describe(run, config, parent)
  if run.epochs is not None:
    if info["data_size"] is None:
      raise ValueError(f"epochs={run.epochs:g} needs the number of training examples, and "
                       f"{config.dataset!r} split {config.train_split!r} could not be counted "
                       "here; state it: Data(split, examples=N)")
    overrides["total_steps"] = math.ceil(run.epochs * info["data_size"] / config.batch_size)
    config = parse_config(spec, overrides)
    info = _describe(run, config, parent)
  workdir = os.path.join(root, run.name)
  if run.stage == "fewshot":
    marker = FEW_SHOT_OUTPUT
    argv = [run.program, f"--config={spec}", f"--workdir={os.path.join(root, parent.run.name)}",
            f"--output={os.path.join(workdir, marker)}"]
  else:
    marker = TRAIN_MARKER
    argv = [run.program, f"--config={spec}", f"--workdir={workdir}"]
  argv += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
  return Resolved(run, spec, overrides, argv, marker, info)


def format_value(value: Any) -> str:
  """A value as ``--config.KEY=VALUE`` takes it (ml_collections' config_flags)."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def config_keys(config: Any, prefix: str = "") -> list[str]:
  """Every dotted leaf key of a ConfigDict."""
  keys = []
  for k, v in config.items():
    if hasattr(v, "items"):
      keys += config_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return sorted(keys)


_CONFIG_CACHE: dict[str, Any] = {}


def load_config(spec: str) -> Any:
  """The ConfigDict of ``configs/NAME.py[:ARG]`` (a copy)."""
  if spec not in _CONFIG_CACHE:
    path, _, arg = spec.partition(":")
    found = _find(path)
    if found is None:
      raise ValueError(f"no config file {path!r}")
    module = _load_module(found, "_sweep_config")
    if not hasattr(module, "get_config"):
      raise ValueError(f"{path} has no get_config(arg=None)")
    try:
      _CONFIG_CACHE[spec] = module.get_config(arg or None)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"config {spec}: {e}") from None
  return copy.deepcopy(_CONFIG_CACHE[spec])


def parse_config(spec: str, overrides: Mapping[str, Any]) -> Any:
  """The config train.py builds from ``--config SPEC`` and ``--config.KEY=VALUE`` for each
  override (parsed by ml_collections' config_flags, as train.py does)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = load_config(spec)
  valid = config_keys(config)
  for key, value in overrides.items():
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3)
      raise ValueError(f"unknown config key {key!r} (in {spec})" +
                       (f"; did you mean {' or '.join(close)}?" if close else "") +
                       f" Valid keys: {', '.join(valid)}")
    if value is None:
      raise ValueError(f"{key}=None: a command line cannot set None; leave the key out")
    if isinstance(_get(config, key), list):
      raise ValueError(f"{key} is a list, which a command line cannot set (--config.KEY=VALUE "
                       "takes str, int, float, bool and tuple values); set it in a config file")
  argv = ["train.py"] + [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
  except (flags.Error, TypeError, AttributeError, KeyError) as e:  # config_flags' errors
    message = str(e).split("(Note", 1)[0].strip()
    raise ValueError(f"{message} (config {spec})") from None
  return values.config


def _get(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


_COUNTS: dict[tuple, int | None] = {}


def count_examples(dataset: str, split: str, data_dir: str | None = None) -> int | None:
  """The number of examples of ``split`` of ``dataset`` (None where it cannot be read here)."""
  key = (dataset, split, data_dir)
  if key not in _COUNTS:
    try:
      from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
      _COUNTS[key] = int(sum(sources.open_source(dataset, data_dir).shard_sizes(split, 1)))
    except Exception:  # pylint: disable=broad-except  (not prepared, no such dataset: unknown)
      _COUNTS[key] = None
  return _COUNTS[key]


def model_options(config: Any) -> dict[str, Any]:
  """The ``models.create`` options the config's model block sets."""
  return {k: v for k, v in config.model.items() if k != "name" and v is not None}


def model_facts(name: str, image_size: Any, num_classes: int, options: Mapping[str, Any]
                ) -> tuple[str, int, int]:
  """(family name, exact parameter count, training FLOPs per image) of a model, from its
  abstract (shape-only) build."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  family, _ = registry.resolve(name)
  options = dict(options)
  if "scan" in family.options:
    options["scan"] = True  # the same parameters and FLOPs, built much faster
  options.pop("remat", None)
  if isinstance(image_size, list):
    image_size = tuple(image_size)
  per_image = flops.train_flops(name, image_size, num_classes, **options)
  model = flops.abstract_model(name, image_size, num_classes, **options)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return family.name, int(params), int(per_image)


def _describe(run: Run, config: Any, parent: Resolved | None) -> dict[str, Any]:
  if run.stage == "fewshot":  # evaluates the parent's model; trains nothing
    steps = batch = examples = flops = None
  else:
    try:
      family, params, per_image = model_facts(config.model.name, config.image_size,
                                              config.num_classes, model_options(config))
    except (ValueError, TypeError) as e:
      raise ValueError(str(e).strip().splitlines()[0]) from None
    steps, batch = int(config.total_steps), int(config.batch_size)
    examples = steps * batch
    flops = per_image * examples
  if parent is None:
    data_size = run.data_size
    if data_size is None:
      data_size = count_examples(config.dataset, config.train_split, config.data_dir)
    pretrain = {"model": config.model.name, "label": run.label or config.model.name,
                "family": family, "params": params, "data_size": data_size, "pretrain_flops": flops}
  else:
    pretrain = {k: parent.info[k] for k in ("model", "label", "family", "params", "data_size",
                                            "pretrain_flops")}
  return {**pretrain, "steps": steps, "batch_size": batch, "examples_seen": examples,
          "seed": int(config.seed), "flops": flops}
