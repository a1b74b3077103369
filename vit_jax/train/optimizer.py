"""optax optimizers and learning-rate schedules built from the config.

The config's ``optimizer`` block names the optimizer and holds one sub-block per optimizer whose
keys are optax's own option names, passed straight through: ``adamw`` -> ``optax.scale_by_adam``,
``sgd`` -> the options of ``optax.sgd`` (momentum, nesterov, accumulator_dtype), ``adafactor`` ->
``optax.adafactor``. An option optax does not take is an error listing those it does. The chain
is: global-norm clipping, the optimizer's scaling, decoupled weight decay, the learning rate,
the per-parameter learning-rate multiplier.

Parameter groups and partial loading: parameters are named by their '/'-joined paths in the
params tree, e.g. ``Transformer/blocks/3/MlpBlock_3/Dense_0/kernel`` (``Transformer/blocks/...``
without the index for a ``scan=True`` model), ``embedding/kernel``, ``head/bias``. ``lr_mults``
and ``wd_mults`` are ``(regex, multiplier)`` pairs; each parameter takes the multiplier of the
first pair whose regex matches its whole path (``re.fullmatch``), else 1 (weight decay: 1 for
``kernel`` leaves and 0 for the rest, unless a ``wd_mults`` pattern names the leaf). ``frozen``
regexes name parameters that are never updated and hold no optimizer state at all (their
gradients are also left out of the clipping norm). A pattern that matches no parameter is an
error listing some parameter paths, raised when the optimizer first sees the parameters
(``make_setup``). To fine-tune only part of a model, pair these with the loading side:
``pretrained_options.load`` / ``init`` (``vit_jax.checkpoints.load_pretrained``) say which
parameters come from the checkpoint and which keep the model's initialisation (a new head).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant", "step")
OPTIMIZERS = ("adamw", "sgd", "adafactor")

# Keys of the ``optimizer`` block itself (each optimizer's options live in its own sub-block).
KEYS = ("name", "grad_clip_norm", "weight_decay", "lr_mults", "wd_mults", "frozen", *OPTIMIZERS)
# The optax function each sub-block's options are checked against, and its name in messages.
_OPTAX = {"adamw": (optax.scale_by_adam, "optax.scale_by_adam"),
          "sgd": (optax.sgd, "optax.sgd"),
          "adafactor": (optax.adafactor, "optax.adafactor")}
# Parameters of those functions that this module sets itself.
_NOT_OPTIONS = ("learning_rate", "weight_decay", "weight_decay_rate", "weight_decay_mask", "mask")


def make_schedule(lr: float, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                  end_lr: float = 0.0, boundaries: Sequence[int] = (),
                  factor: float = 0.1) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then ``name`` decay (rsqrt decays from the warm-up end;
  step multiplies the rate by ``factor`` at each of the ``boundaries`` steps)."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule {name!r} is not one of {SCHEDULES}")
  if name == "step" and not boundaries:
    raise ValueError("the step schedule needs schedule.boundaries, e.g. (400_000,)")
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if name == "cosine":
      decay = end_lr / lr + (1 - end_lr / lr) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    elif name == "linear":
      decay = 1.0 - t * (1.0 - end_lr / lr)
    elif name == "rsqrt":
      decay = jax.lax.rsqrt(jnp.maximum(step, warmup_steps) + 1) * jnp.sqrt(warmup_steps + 1.0)
    elif name == "step":
      passed = sum((step >= b).astype(jnp.float32) for b in boundaries)
      decay = factor ** passed
    else:
      decay = 1.0
    return lr * warm * decay

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weight matrices (``kernel``); biases, norms, position embeddings, cls and probe
  tokens are not decayed."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def param_path(path: Sequence[Any]) -> str:
  """A jax key path -> the '/'-joined name patterns are matched against."""
  def part(k):
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(part(k) for k in path)


def param_paths(params: Any) -> list[str]:
  """Every parameter's name, in tree order."""
  return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile(pattern: Any, where: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise ValueError(f"optimizer.{where}: {pattern!r} is not a regex string")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"optimizer.{where}: {pattern!r} is not a valid regex ({e})") from None


def _pairs(items: Any, where: str) -> list[tuple[str, re.Pattern, float]]:
  out = []
  for item in items or ():
    if isinstance(item, str) or len(item) != 2:
      raise ValueError(f"optimizer.{where} takes (regex, multiplier) pairs, got {item!r}")
    pattern, mult = item
    out.append((pattern, _compile(pattern, where), float(mult)))
  return out


def _first_match(pairs, name: str, default: float) -> float:
  return next((mult for _, rx, mult in pairs if rx.fullmatch(name)), default)


def _as_dict(block: Any) -> dict:
  if block is None:
    return {}
  return dict(block.to_dict() if hasattr(block, "to_dict") else block)


def _dtype(key: str, value: Any) -> Any:
  if "dtype" in key and isinstance(value, str):
    return jnp.dtype(value) if value else None
  return value


def optimizer_options(name: str, block: Any) -> dict:
  """The ``optimizer.<name>`` sub-block checked against its optax function's signature, with
  dtype strings converted."""
  fn, fn_name = _OPTAX[name]
  valid = [p for p in inspect.signature(fn).parameters if p not in _NOT_OPTIONS]
  options = _as_dict(block)
  for key in options:
    if key not in valid:
      raise ValueError(f"optimizer.{name} has no option {key!r}; {fn_name} takes: {', '.join(valid)}")
  return {k: _dtype(k, v) for k, v in options.items()}


def _scaling(name: str, options: dict) -> list[optax.GradientTransformation]:
  if name == "adamw":
    return [optax.scale_by_adam(**options)]
  if name == "sgd":
    if not options.get("momentum"):
      return []
    return [optax.trace(decay=options["momentum"], nesterov=options.get("nesterov", False),
                        accumulator_dtype=options.get("accumulator_dtype"))]
  # optax.adafactor ends with a sign flip (its own descent direction): undone here, since the
  # weight decay and scale_by_learning_rate (which flips the sign) follow.
  return [optax.adafactor(learning_rate=None, weight_decay_rate=None, **options), optax.scale(-1.0)]


def _scale_by_path(mult_of: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by ``mult_of(its path)`` (1: left as is)."""
  def update(updates, state, params=None):
    del params
    def scale(path, u):
      m = mult_of(param_path(path))
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decay_by_path(rate_of: Callable[[str], float]) -> optax.GradientTransformation:
  """Decoupled weight decay: adds ``rate_of(path) * param`` to each update (0: none)."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    def decay(path, u, p):
      rate = rate_of(param_path(path))
      return u if rate == 0.0 else u + jnp.asarray(rate, u.dtype) * p.astype(u.dtype)
    return jax.tree_util.tree_map_with_path(decay, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _examples(paths: list[str], n: int = 8) -> str:
  if len(paths) <= n:
    return ", ".join(paths)
  picks = sorted({round(i * (len(paths) - 1) / (n - 1)) for i in range(n)})
  return ", ".join(paths[i] for i in picks) + f" ({len(paths)} in all)"


def check_patterns(params: Any, groups: dict[str, list[str]]) -> None:
  """ValueError for a pattern (``groups``: config key -> patterns) that matches no parameter."""
  paths = param_paths(params)
  for where, patterns in groups.items():
    for pattern in patterns:
      rx = re.compile(pattern)
      if not any(rx.fullmatch(p) for p in paths):
        raise ValueError(
            f"optimizer.{where} pattern {pattern!r} matches no parameter (patterns must match a "
            f"whole '/'-joined path); the parameters are named like: {_examples(paths)}")


def make_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``cfg`` is the config's ``optimizer`` block (see the module docstring).

  Chain: ``clip_by_global_norm(grad_clip_norm)`` (if set), the optimizer's scaling, decoupled
  weight decay ``weight_decay * wd_mult * param``, ``scale_by_learning_rate(schedule)``, then the
  per-parameter ``lr_mult``. Parameters matching ``frozen`` get zero updates and no state
  (``optax.partition`` with ``optax.set_to_zero``).
  """
  cfg = _as_dict(cfg)
  name = cfg.get("name")
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
  unknown = [k for k in cfg if k not in KEYS]
  if unknown:
    raise ValueError(f"optimizer has no key(s) {unknown}; it takes {', '.join(KEYS)} (an "
                     f"optimizer's own options go in its block, e.g. optimizer.{name}.<option>)")
  options = optimizer_options(name, cfg.get(name))
  lr_mults = _pairs(cfg.get("lr_mults"), "lr_mults")
  wd_mults = _pairs(cfg.get("wd_mults"), "wd_mults")
  frozen = [(p, _compile(p, "frozen")) for p in cfg.get("frozen") or ()]
  wd = float(cfg.get("weight_decay") or 0.0)

  chain = []
  if cfg.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(cfg["grad_clip_norm"]))
  chain += _scaling(name, options)
  if wd:
    def rate_of(path: str) -> float:
      default = 1.0 if path.rsplit("/", 1)[-1] == "kernel" else 0.0
      return wd * _first_match(wd_mults, path, default)
    chain.append(_decay_by_path(rate_of))
  chain.append(optax.scale_by_learning_rate(schedule))
  if lr_mults:
    chain.append(_scale_by_path(lambda path: _first_match(lr_mults, path, 1.0)))
  tx = optax.chain(*chain)

  if frozen:
    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: "frozen" if any(rx.fullmatch(param_path(path)) for _, rx in frozen)
          else "trained", params)
    tx = optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)

  groups = {"lr_mults": [p for p, _, _ in lr_mults], "wd_mults": [p for p, _, _ in wd_mults],
            "frozen": [p for p, _ in frozen]}

  def init(params):
    check_patterns(params, groups)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init, tx.update)
