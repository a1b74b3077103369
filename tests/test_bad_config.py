"""Bad config values are refused before anything is built, each with a message naming the key and
what would be valid (the command lines print it as 'error: ...' and exit 1: tests/test_cli.py)."""

from __future__ import annotations

import re

import pytest

from tests.train_configs import parse_like_train_py, tiny_config
from vit_jax.train import trainer

CASES = [
    (dict(batch_size=0), r"config.batch_size must be a positive integer, got 0"),
    (dict(batch_size=-4), r"config.batch_size must be a positive integer, got -4"),
    (dict(eval_batch_size=0), r"config.eval_batch_size must be a positive integer"),
    (dict(total_steps=0), r"config.total_steps must be a positive integer, got 0"),
    (dict(log_every=-1), r"config.log_every must be a positive integer, got -1"),
    (dict(eval_every=0), r"config.eval_every must be a positive integer"),
    (dict(checkpoint_every=0), r"config.checkpoint_every must be a positive integer"),
    (dict(keep_checkpoints=0), r"config.keep_checkpoints must be a positive integer"),
    (dict(num_classes=0), r"config.num_classes must be a positive integer"),
    (dict(grad_accum_steps=0), r"config.grad_accum_steps must be a positive integer"),
    (dict(grad_accum_steps=5), r"grad_accum_steps 5 must be >= 1 and divide batch_size 32"),
    (dict(lr=-1.0), r"config.lr must be a positive learning rate, got -1.0"),
    (dict(lr=0.0), r"config.lr must be a positive learning rate"),
    (dict(image_size=0), r"config.image_size must be a positive int"),
    ({"schedule.warmup_steps": -3}, r"warmup_steps must be >= 0, got -3"),
    ({"schedule.name": "zigzag"}, r"schedule 'zigzag' is not one of \('cosine'"),
    ({"optimizer.name": "adamq"}, r"optimizer 'adamq' is not one of \('adamw', 'sgd', 'adafactor'\)"),
    ({"optimizer.grad_clip_norm": -1.0}, r"grad_clip_norm must be >= 0 \(0 or None: no clipping\), got -1.0"),
    ({"optimizer.weight_decay": -1e-4}, r"weight_decay must be >= 0"),
    ({"model.dtype": "float8"}, r"dtype 'float8' is not one of \('float32', 'bfloat16'\)"),
    ({"model.name": "ViT-Q/2"}, r"unknown model name 'ViT-Q/2'"),
    (dict(mesh="data=2,foo=4"), r"mesh 'data=2,foo=4' is neither a preset .* over the axes \('data', 'fsdp', 'tensor'\)"),
    (dict(mesh="data=16"), r"mesh \{'data': 16\} does not fit \d+ devices"),
    (dict(pretrained="/nope/x.npz"), r"config.pretrained '/nope/x.npz': no such file or directory"),
]
DATA_CASES = [
    (dict(pp_train="decode|resize(8"), r"cannot parse preprocessing op 'resize\(8': '\(' was never closed"),
    (dict(pp_train="decode|resize('a')|value_range(-1, 1)|onehot(10)|keep('image', 'labels')"),
     r"resize: size must be a positive int or a \(height, width\) pair of them, got 'a'"),
    (dict(train_split="nosplit"), r"dataset 'sklearn_digits' has no split 'nosplit'.*\['test', 'test_0to4',"),
    (dict(dataset="no_such_dataset"), r"unknown dataset 'no_such_dataset'"),
]


@pytest.mark.parametrize("overrides,message", CASES + DATA_CASES,
                         ids=[re.sub(r"\W+", "_", str(o)) for o, _ in CASES + DATA_CASES])
def test_a_bad_config_value_is_refused_with_its_name(overrides, message):
  with pytest.raises(ValueError, match=message):
    setup = trainer.make_setup(tiny_config(**overrides))
    next(iter(setup.task.train_data(0)))


def test_a_warmup_longer_than_the_run_is_said(caplog):
  import logging
  with caplog.at_level(logging.WARNING):
    trainer.make_setup(tiny_config(**{"schedule.warmup_steps": 50}))
  assert "warmup_steps=50 >= total_steps=10" in caplog.text


# ------------------------------------------------------------------ random overrides (hypothesis)


from absl import flags  # noqa: E402
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

# The scalar keys a user overrides (data and model-name keys left out: they open datasets and
# build other models, tested in test_cli.py and test_config_overrides.py), and two unknown ones.
FUZZ_KEYS = ("batch_size", "eval_batch_size", "total_steps", "log_every", "eval_every",
             "checkpoint_every", "keep_checkpoints", "num_classes", "grad_accum_steps", "lr",
             "seed", "image_size", "mesh", "schedule.name", "schedule.warmup_steps",
             "schedule.end_lr", "optimizer.name", "optimizer.grad_clip_norm",
             "optimizer.weight_decay", "model.dtype", "model.hidden_size", "model.num_heads",
             "model.scan", "model.remat", "model.attention", "label_smoothing", "nosuchkey",
             "model.nosuch")
VALUES = st.one_of(st.integers(-3, 300).map(str),
                   st.one_of(st.floats(-1e3, 1e3), st.just(float("nan"))).map(str),
                   st.sampled_from(["True", "False", "None", "()", "(8, 8)", "adamw", "sgd", "data=2",
                                    "fsdp", "bfloat16", "full", "xla", "cosine", "", "'x'", "1e-3"]),
                   st.text(alphabet="abc019(),|'=-. ", max_size=6))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FUZZ_KEYS), VALUES), min_size=1, max_size=3))
def test_random_overrides_set_up_a_run_or_fail_with_one_clear_error(pairs):
  """What train.py does with the overrides before the data: absl's parsing (its errors are
  printed as one line by command_line.parse_flags), then the run's set-up, which may only refuse
  with a ValueError (printed as 'error: ...'); anything else would be a traceback."""
  try:
    config = parse_like_train_py("configs/default.py", [f"--config.{k}={v}" for k, v in pairs])
  except (AttributeError, KeyError, flags.Error):
    event("refused by the flag parser")
    return
  try:
    trainer.make_setup(config)
    event("a run set up")
  except ValueError as e:
    assert str(e).strip()
    event("refused by the set-up")
