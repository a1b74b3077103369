"""Parameter groups (learning-rate and weight-decay multipliers, frozen parameters), optax
options passed through, and partial loading of checkpoints (load / init patterns)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import param_groups
from tests.train_configs import tiny_config
from vit_jax import checkpoints, models
from vit_jax.checkpoints import param_tree, posemb
from vit_jax.train import checkpointing, optimizer, trainer
from vit_jax.train.step import make_loss_and_grads

BLOCKS = ["Transformer/blocks"]
OPTIMIZERS = [("adamw", {}), ("sgd", {"momentum": 0.9}), ("adafactor", {"momentum": 0.9})]


def fixed_batch(setup, n=32, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return setup.global_batch({"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
                             "labels": np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]})


def with_random_head(setup, state):
  # The head starts at zero, which makes the backbone's first gradient exactly zero.
  kernel = state.params["head"]["kernel"]
  head = np.random.default_rng(1).normal(0, 0.2, kernel.shape).astype(np.float32)
  params = dict(state.params, head=dict(state.params["head"], kernel=jax.device_put(
      head, setup.shardings.params["head"]["kernel"])))
  return state.replace(params=params)


def flat(tree) -> dict[str, np.ndarray]:
  return {optimizer.param_path(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def state_param_names(opt_state) -> list[str]:
  """The parameter each optimizer-state leaf belongs to (its trailing dict keys), '' if none."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    tail = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      tail.insert(0, k)
    names.append(optimizer.param_path(tail))
  return names


def sgd_config(**optimizer_options):
  """Plain SGD, no clipping, no decay: each update is exactly -lr * lr_mult * grad."""
  c = tiny_config(label_smoothing=0.0)
  c.optimizer.update(name="sgd", grad_clip_norm=0.0, weight_decay=0.0, **optimizer_options)
  c.optimizer.sgd.momentum = 0.0
  return c


# ---------------------------------------------------------------- groups train

def test_backbone_at_a_tenth_and_a_frozen_group_train():
  """A 0.1x backbone and a frozen embedding: the frozen parameters are bit-unchanged, the others
  move, and the backbone's first update is 0.1x that of a run without multipliers."""
  runs = {}
  for name, cfg in (("plain", sgd_config()),
                    ("grouped", sgd_config(lr_mults=[("head/.*", 1.0), (".*", 0.1)],
                                           frozen=["embedding/.*"]))):
    setup = trainer.make_setup(cfg)
    state = with_random_head(setup, setup.init_state())
    batch = fixed_batch(setup)
    # The first update through the optimizer itself, from the same gradients.
    _, grads, _ = jax.jit(make_loss_and_grads(setup.graphdef, setup.task))(
        state.params, state.model_state, batch, jax.random.key(0))
    updates, _ = jax.jit(setup.tx.update)(grads, state.opt_state, state.params)
    step = setup.jit_train_step()
    start = flat(state.params)
    for _ in range(3):
      state, metrics = step(state, batch)
      assert np.isfinite(float(metrics["loss"]))
    runs[name] = dict(start=start, updates=flat(updates), grads=flat(grads), end=flat(state.params))

  plain, grouped = runs["plain"], runs["grouped"]
  assert plain["start"].keys() == grouped["start"].keys()
  for k in plain["start"]:
    np.testing.assert_array_equal(plain["start"][k], grouped["start"][k], err_msg=k)
    if k.startswith("embedding/"):
      assert not np.array_equal(plain["grads"][k], 0), k  # it would have moved
      np.testing.assert_array_equal(grouped["updates"][k], 0.0, err_msg=k)
      np.testing.assert_array_equal(grouped["end"][k], grouped["start"][k], err_msg=k)
      continue
    mult = 1.0 if k.startswith("head/") else 0.1
    np.testing.assert_allclose(grouped["updates"][k], mult * plain["updates"][k].astype(np.float64),
                               rtol=1e-6, atol=0, err_msg=k)
    if "/key/bias" not in k:  # the attention key's bias has an exactly zero gradient
      assert np.abs(plain["updates"][k]).max() > 0, k
      assert not np.array_equal(grouped["end"][k], grouped["start"][k]), k


@pytest.mark.parametrize("name,options", OPTIMIZERS)
def test_frozen_parameters_hold_no_optimizer_state(name, options):
  frozen = ["embedding/.*", "Transformer/blocks/0/.*"]
  is_frozen = lambda n: n.startswith(("embedding/", "Transformer/blocks/0/"))
  names = {}
  for groups in ([], frozen):
    cfg = tiny_config()
    cfg.optimizer.update(name=name, frozen=groups)
    cfg.optimizer[name].update(options)
    names[tuple(groups)] = state_param_names(trainer.make_setup(cfg).abstract_state.opt_state)
  full, partial = collections.Counter(names[()]), collections.Counter(names[tuple(frozen)])
  assert any(is_frozen(n) for n in full)
  assert not any(is_frozen(n) for n in partial)
  # Every trained parameter keeps exactly the state it had without a frozen group.
  assert {n: c for n, c in partial.items() if n} == {n: c for n, c in full.items() if n and not is_frozen(n)}

  cfg = tiny_config()
  cfg.optimizer.update(name=name, frozen=frozen)
  cfg.optimizer[name].update(options)
  setup = trainer.make_setup(cfg)
  state = setup.init_state()
  if name == "adamw":
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu"))
    trained = [k for k in flat(state.params) if not is_frozen(k)]
    assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(adam.nu)) == len(trained)
  before = flat(state.params)
  state, metrics = setup.jit_train_step()(state, fixed_batch(setup))
  assert np.isfinite(float(metrics["loss"]))
  after = flat(state.params)
  for k in before:
    if is_frozen(k):
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert not np.array_equal(after["head/bias"], before["head/bias"])


def test_fsdp_mesh_with_a_frozen_group_and_checkpoint_round_trip(tmp_path):
  c = tiny_config(mesh="fsdp=8", label_smoothing=0.0)
  c.model.update(hidden_size=64, num_heads=4, mlp_dim=128, num_layers=2)
  c.num_classes = 16
  c.optimizer.update(frozen=["embedding/.*", "cls"], lr_mults=[("Transformer/.*", 0.1)])
  setup = trainer.make_setup(c)
  state = setup.init_state()
  assert setup.mesh.size == 8
  adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu"))
  assert not jax.tree.leaves(adam.mu["embedding"]) and not jax.tree.leaves(adam.nu["cls"])
  mu = adam.mu["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
  kernel = state.params["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
  for array in (kernel, mu):
    assert array.shape == (64, 128) and all(s.data.shape == (8, 128) for s in array.addressable_shards)
  embedding = flat(state.params)["embedding/kernel"]
  state, metrics = setup.jit_train_step()(state, fixed_batch(setup, classes=16))
  assert np.isfinite(float(metrics["loss"]))
  np.testing.assert_array_equal(flat(state.params)["embedding/kernel"], embedding)
  # The state (with no optimizer leaves for the frozen group) saves and restores bit-equal.
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, state, {"signature": setup.task.signature(), "step": 1})
  ckpt.wait()
  restored, _ = ckpt.restore(setup.sharded_abstract_state(), setup.task.signature())
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for k, v in flat(state).items():
    np.testing.assert_array_equal(flat(restored)[k], v, err_msg=k)


# ---------------------------------------------------------------- the transformation itself

def test_weight_decay_multipliers_against_a_hand_computation():
  rng = np.random.default_rng(0)
  shapes = {"a/kernel": (2, 3), "b/kernel": (3,), "e/kernel": (2, 2), "c/bias": (3,), "d/scale": (2,)}
  params, grads = {}, {}
  for name, shape in shapes.items():
    top, leaf = name.split("/")
    params.setdefault(top, {})[leaf] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    grads.setdefault(top, {})[leaf] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cfg = dict(name="sgd", weight_decay=0.1, grad_clip_norm=0.0, sgd=dict(momentum=0.0),
             wd_mults=[("b/kernel", 0.0), ("e/.*", 2.0), ("d/scale", 3.0)],
             lr_mults=[("d/.*", 0.5)])
  lr = 0.25
  tx = optimizer.make_optimizer(cfg, lambda step: lr)
  updates, _ = tx.update(grads, tx.init(params), params)
  # decay rate: kernels 1x by default, bias/scale 0 unless a pattern names them.
  rates = {"a/kernel": 0.1, "b/kernel": 0.0, "e/kernel": 0.2, "c/bias": 0.0, "d/scale": 0.3}
  lr_mult = {"d/scale": 0.5}
  got = flat(updates)
  for name in shapes:
    top, leaf = name.split("/")
    p, g = np.asarray(params[top][leaf], np.float64), np.asarray(grads[top][leaf], np.float64)
    want = -lr * lr_mult.get(name, 1.0) * (g + rates[name] * p)
    np.testing.assert_allclose(got[name], want, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name,block,message", [
    ("adamw", dict(beta1=0.9), "optimizer.adamw has no option 'beta1'; optax.scale_by_adam takes: "
                               "b1, b2, eps, eps_root, mu_dtype, nesterov"),
    ("sgd", dict(momentun=0.9), "optimizer.sgd has no option 'momentun'; optax.sgd takes: momentum, "
                                "nesterov, accumulator_dtype"),
    ("adafactor", dict(weight_decay_rate=0.1), "optimizer.adafactor has no option "
                                               "'weight_decay_rate'; optax.adafactor takes: "
                                               "min_dim_size_to_factor, decay_rate"),
])
def test_unknown_optimizer_option_lists_the_valid_ones(name, block, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    optimizer.make_optimizer(dict(name=name, **{name: block}), lambda step: 1.0)
  with pytest.raises(ValueError, match=r"optimizer has no key\(s\) \['momentum'\]"):
    optimizer.make_optimizer(dict(name="sgd", momentum=0.9), lambda step: 1.0)


def test_options_reach_optax_with_dtypes_converted():
  params = {"w": {"kernel": jnp.ones((4, 4))}}
  tx = optimizer.make_optimizer(dict(name="adamw", adamw=dict(mu_dtype="bfloat16", b1=0.5)),
                                lambda step: 1.0)
  adam = tx.init(params)[0]
  assert adam.mu["w"]["kernel"].dtype == jnp.bfloat16 and adam.nu["w"]["kernel"].dtype == jnp.float32
  tx = optimizer.make_optimizer(dict(name="sgd", sgd=dict(momentum=0.9, accumulator_dtype="bfloat16")),
                                lambda step: 1.0)
  assert jax.tree.leaves(tx.init(params))[0].dtype == jnp.bfloat16
  tx = optimizer.make_optimizer(dict(name="adafactor", adafactor=dict(
      momentum=0.9, dtype_momentum="bfloat16", min_dim_size_to_factor=2)), lambda step: 1.0)
  assert {x.dtype for x in jax.tree.leaves(tx.init(params))} >= {jnp.dtype(jnp.bfloat16)}


def test_pattern_typos_are_errors_listing_parameters():
  cfg = tiny_config()
  cfg.optimizer.frozen = ["embeding/.*"]
  with pytest.raises(ValueError, match=r"optimizer.frozen pattern 'embeding/\.\*' matches no "
                                       r"parameter.*Transformer/blocks/0/LayerNorm_0/bias.*head/kernel"):
    trainer.make_setup(cfg)
  cfg = tiny_config()
  cfg.optimizer.lr_mults = [("Transformer/encoderblock_0/.*", 0.1)]
  with pytest.raises(ValueError, match="optimizer.lr_mults pattern 'Transformer/encoderblock_0/"):
    trainer.make_setup(cfg)
  cfg = tiny_config()
  cfg.optimizer.wd_mults = [("(", 0.0)]
  with pytest.raises(ValueError, match=r"optimizer.wd_mults: '\(' is not a valid regex"):
    trainer.make_setup(cfg)


# ---------------------------------------------------------------- partial loading

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def vit(seed, **kw):
  return models.create("ViT-Ti/16", num_classes=10, image_size=32, rngs=nnx.Rngs(seed), **TINY, **kw)


@pytest.mark.parametrize("extra,init", [
    (dict(representation_size=32), ["pre_logits/.*"]),
    (dict(classifier="map"), ["MAPHead_0/.*", "cls"]),
    (dict(classifier="map", representation_size=32), ["MAPHead_0/.*", "pre_logits/.*", "cls"]),
])
def test_loading_into_a_model_with_extra_parameters(tmp_path, extra, init):
  source = vit(0)
  rng = np.random.default_rng(0)
  src = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
         for k, v in param_tree.model_arrays(source, BLOCKS).items()}
  param_tree.assign(source, src, BLOCKS)
  path = checkpoints.export_npz(source, tmp_path / "vit.npz")
  fresh = param_tree.model_arrays(vit(7, **extra), BLOCKS)
  new = sorted(set(fresh) - set(src))
  assert new and all(k.startswith(("pre_logits/", "MAPHead_0/")) for k in new)

  got = param_tree.model_arrays(checkpoints.load_pretrained(vit(7, **extra), path, init=init), BLOCKS)
  assert got.keys() == fresh.keys()
  pe = "Transformer/posembed_input/pos_embedding"
  for k in got:
    if k in new:
      np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)  # the model's own init
    elif k == pe and "cls" in init:  # the class token's row is dropped for a map model
      np.testing.assert_array_equal(got[k], posemb.resample_posemb(src[k], fresh[k].shape[1]))
    else:
      np.testing.assert_array_equal(got[k], src[k], err_msg=k)

  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.load_pretrained(vit(7, **extra), path)
  message = str(e.value)
  assert "missing from the checkpoint:" in message
  for k in new:
    assert f"\n  {k} {fresh[k].shape}" in message, k
  if "cls" in init:
    assert "unexpected (the model has no such parameter):\n  cls (1, 1, 32)" in message
  assert f"Here: init={init}." in message  # the option that accepts them


def test_param_groups_config_fine_tunes_a_trainer_checkpoint(tmp_path):
  """configs/param_groups.py from a checkpoint of the default model (shrunk): everything but the
  head comes from the workdir, the head is new, the embedding never moves."""
  source = tiny_config()
  setup = trainer.make_setup(source)
  state = with_random_head(setup, setup.init_state())
  ckpt = checkpointing.Checkpointer(str(tmp_path / "default" / "checkpoints"), keep=1)
  ckpt.save(10, state, {"signature": setup.task.signature(), "step": 10})
  ckpt.wait()
  ckpt.close()
  saved = flat(state.params)

  c = param_groups.get_config()
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  c.update(dict(pretrained=str(tmp_path / "default"), batch_size=32, eval_batch_size=80, total_steps=3))
  assert c.optimizer.frozen == ["embedding/.*"] and c.pretrained_options.init == ["head/.*"]
  ft = trainer.make_setup(c)
  init = ft.init_state()
  got = flat(init.params)
  for k, v in saved.items():
    if k.startswith("head/"):
      assert not got[k].any(), k
    else:
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  after, metrics = ft.jit_train_step()(init, fixed_batch(ft))
  assert np.isfinite(float(metrics["loss"]))
  np.testing.assert_array_equal(flat(after.params)["embedding/kernel"], saved["embedding/kernel"])
