"""One train step on every mesh: same numbers as one device, real FSDP sharding, restore anywhere."""

import jax
import numpy as np
import pytest

from tests.train_configs import tiny_config
from vit_jax.train import checkpointing, sharding, trainer

MESHES = ["data=8", "fsdp=8", "data=2,fsdp=4", "data=2,tensor=4", "fsdp=2,tensor=4"]


def mesh_config(mesh):
  # Widths divisible by 8 and heads by 4, so that every axis really splits something.
  c = tiny_config(mesh=mesh, label_smoothing=0.0, lr=1e-4)
  c.model.update(hidden_size=64, num_heads=4, mlp_dim=128, num_layers=2)
  c.num_classes = 16
  c.batch_size = 32
  # The key bias's exact gradient is zero (softmax ignores a constant shift): what is computed
  # is rounding noise, which Adam scales to updates of size lr that differ between meshes and
  # compilers. Frozen, it stays at its (exact) value on every mesh.
  c.optimizer.frozen = [r"Transformer/blocks/(\d+/)?MultiHeadDotProductAttention_1/key/bias"]
  return c


def fixed_batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "labels": np.eye(16, dtype=np.float32)[rng.integers(0, 16, n)]}


def with_random_head(setup, state):
  # The head starts at zero, so the backbone's first gradients are zero and the next ones tiny:
  # Adam normalises them to full-size updates whose rounding differs between meshes. A fixed
  # random head of a trained model's scale gives gradients well above rounding noise.
  head = np.random.default_rng(1).normal(0, 0.2, (64, 16)).astype(np.float32)
  params = dict(state.params, head=dict(state.params["head"], kernel=jax.device_put(
      head, setup.shardings.params["head"]["kernel"])))
  return state.replace(params=params)


def five_steps(mesh, devices=None):
  setup = trainer.make_setup(mesh_config(mesh), devices)
  state, step = with_random_head(setup, setup.init_state()), setup.jit_train_step()
  batch = setup.global_batch(fixed_batch())
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return setup, state, losses


def adam_state(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu"))


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.fixture(scope="module")
def one_device():
  _, state, losses = five_steps("data=1", jax.devices()[:1])
  return flat(state.params), losses


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_agrees_with_one_device(mesh, one_device):
  ref_params, ref_losses = one_device
  setup, state, losses = five_steps(mesh)
  assert setup.mesh.size == 8
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  got = flat(state.params)
  assert got.keys() == ref_params.keys()
  for path, ref in ref_params.items():
    if "['key']['bias']" in path:  # exact gradient zero (frozen above): bit-equal
      np.testing.assert_array_equal(got[path], ref, err_msg=path)
    else:
      assert np.linalg.norm(got[path] - ref) <= 1e-5 * np.linalg.norm(ref) + 1e-12, path


def test_fsdp_shards_parameters_and_adam_moments():
  setup = trainer.make_setup(mesh_config("fsdp"))
  state = setup.init_state()
  kernel = state.params["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
  mu = adam_state(state.opt_state).mu["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
  nu = adam_state(state.opt_state).nu["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
  for array in (kernel, mu, nu):
    assert array.shape == (64, 128)
    assert len(array.addressable_shards) == 8
    assert all(s.data.shape == (8, 128) for s in array.addressable_shards)


def test_tensor_parallel_is_megatron_layout():
  setup = trainer.make_setup(mesh_config("data=2,tensor=4"))
  p = setup.shardings.params["Transformer"]["blocks"][0]
  attn = p["MultiHeadDotProductAttention_1"]
  assert tuple(attn["query"]["kernel"].spec) == (None, "tensor", None)
  assert tuple(attn["out"]["kernel"].spec) == ("tensor", None, None)
  assert tuple(p["MlpBlock_3"]["Dense_0"]["kernel"].spec) == (None, "tensor")
  assert tuple(p["MlpBlock_3"]["Dense_1"]["kernel"].spec) == ("tensor", None)


@pytest.mark.parametrize("mesh,message", [
    ("data=3", "does not fit 8 devices"),
    ("data=2,fsdp=2", "uses 4 devices, but 8 are present"),
    ("data=-1,fsdp=-1", "at most one axis may be -1"),
    ("pipeline=2", "neither a preset"),
])
def test_bad_meshes_fail_before_compiling(mesh, message):
  with pytest.raises(ValueError, match=message):
    trainer.make_setup(mesh_config(mesh))


def test_batch_not_divisible_by_the_mesh():
  c = mesh_config("data=8")
  c.batch_size = 12
  with pytest.raises(ValueError, match="batch_size 12 is not divisible by data\\*fsdp = 8"):
    trainer.make_setup(c)


def test_checkpoint_restores_bit_equal_on_other_meshes(tmp_path):
  setup, state, _ = five_steps("fsdp=8")
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  signature = setup.task.signature()
  ckpt.save(5, state, {"signature": signature, "step": 5})
  ckpt.wait()
  saved = flat(state)
  for mesh, devices in (("data=2,tensor=2", jax.devices()[:4]), ("data=1", jax.devices()[:1])):
    other = trainer.make_setup(mesh_config(mesh), devices)
    restored, meta = ckpt.restore(other.sharded_abstract_state(), signature)
    assert meta["step"] == 5
    kernel = restored.params["Transformer"]["blocks"][0]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert kernel.sharding.mesh.size == len(devices)
    got = flat(restored)
    assert got.keys() == saved.keys()
    for k in saved:
      np.testing.assert_array_equal(got[k], saved[k])
    # and it trains on from there
    state2, metrics = other.jit_train_step()(restored, other.global_batch(fixed_batch()))
    assert np.isfinite(float(metrics["loss"]))
  ckpt.close()


def test_scan_remat_bf16_and_mu_dtype_switches():
  c = mesh_config("fsdp=8")
  c.model.update(scan=True, remat="save_dots", dtype="bfloat16")
  c.optimizer.adamw.mu_dtype = "bfloat16"
  setup = trainer.make_setup(c)
  state = setup.init_state()
  mu = adam_state(state.opt_state).mu["Transformer"]["blocks"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert mu.dtype == np.dtype("bfloat16") and mu.shape == (2, 64, 128)
  assert state.params["Transformer"]["blocks"]["MlpBlock_3"]["Dense_0"]["kernel"].dtype == np.float32
  step = setup.jit_train_step()
  batch = setup.global_batch(fixed_batch())
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]


def test_rules_name_real_mesh_axes():
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sharding.rules_dict([("embed", "model")])
