"""ViT models: options, layouts and errors (exact parameter counts: tests/test_registry.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_registry import PARAM_COUNTS
from vit_jax import models

def count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_underscore_spelling_and_any_patch():
  a = nnx.eval_shape(lambda: models.create("ViT-B_16", num_classes=1000))
  assert count(a) == PARAM_COUNTS["ViT-B/16"]
  small = models.create("ViT-S/4", num_classes=7, image_size=16, num_layers=1)
  assert small(jnp.zeros((2, 16, 16, 3))).shape == (2, 7)


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"unknown model name 'ViT-Q/16'.*ViT-B/16"):
    models.create("ViT-Q/16", num_classes=10)


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match=r"unknown ViT option.*hidden_size"):
    models.create("ViT-Ti/16", num_classes=10, hiden_size=3)


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 16, 32, 3), (2, 32, 32, 1)])
def test_images_that_do_not_fit(shape):
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, num_layers=1)
  with pytest.raises(ValueError, match=r"do not fit this model.*\(batch, 32, 32, 3\)"):
    model(jnp.zeros(shape))


@pytest.mark.parametrize("classifier", ["token", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_classifiers_and_posembs(classifier, posemb):
  model = models.create("ViT-Ti/16", num_classes=5, image_size=32, num_layers=2,
                        classifier=classifier, posemb=posemb, representation_size=16)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
  logits = model(x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert ("cls" in params) == (classifier == "token")
  assert ("MAPHead_0" in params) == (classifier == "map")
  assert ("posembed_input" in params["Transformer"]) == (posemb == "learn")
  assert params["pre_logits"]["kernel"].shape == (192, 16)
  assert not np.any(params["head"]["kernel"])  # zero-initialised head


def test_original_initialisers_and_epsilon():
  model = models.create("ViT-B/16", num_classes=10, image_size=32, num_layers=1)
  block = model.Transformer.blocks[0]
  assert block.LayerNorm_0.eps == 1e-6
  assert block.MultiHeadDotProductAttention_1.query.kernel.shape == (768, 12, 64)
  assert block.MultiHeadDotProductAttention_1.out.kernel.shape == (12, 64, 768)
  assert model.Transformer.posembed_input.pos_embedding.shape == (1, 5, 768)
  assert abs(float(jnp.std(model.Transformer.posembed_input.pos_embedding[...])) - 0.02) < 0.003
  assert float(jnp.max(jnp.abs(block.MlpBlock_3.Dense_0.bias[...]))) < 1e-5


def test_parameters_carry_logical_axes_without_a_mesh():
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, num_layers=1)
  assert jax.sharding.get_abstract_mesh().empty
  q = model.Transformer.blocks[0].MultiHeadDotProductAttention_1.query.kernel
  assert q.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
  assert model.head.kernel.get_metadata()["out_sharding"] == ("embed", "classes")


def test_bfloat16_compute_float32_params():
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, num_layers=2, dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref = models.create("ViT-Ti/16", num_classes=10, image_size=32, num_layers=2, representation_size=8)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  assert model(x).dtype == jnp.float32
  assert ref(x).dtype == jnp.float32


def test_gelu_approximate_changes_outputs_slightly():
  kw = dict(num_classes=10, image_size=32, num_layers=2, representation_size=32)
  exact = models.create("ViT-Ti/16", **kw, rngs=nnx.Rngs(1))
  approx = models.create("ViT-Ti/16", **kw, gelu_approximate=True, rngs=nnx.Rngs(1))
  _, state = nnx.split(exact)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  head = jax.random.normal(jax.random.key(3), exact.head.kernel.shape)
  exact.head.kernel[...] = head
  approx.head.kernel[...] = head
  diff = float(jnp.max(jnp.abs(exact(x) - approx(x))))
  assert 0 < diff < 1e-2


def test_scan_layout_matches_unrolled():
  kw = dict(num_classes=10, image_size=32, num_layers=3)
  unrolled = models.create("ViT-Ti/16", **kw)
  scanned = models.create("ViT-Ti/16", **kw, scan=True, remat="full")
  p = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  p["head"]["kernel"] = jax.random.normal(jax.random.key(2), p["head"]["kernel"].shape)
  blocks = p["Transformer"]["blocks"]
  stacked = dict(p, Transformer=dict(p["Transformer"], blocks=jax.tree.map(
      lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(3)])))
  kernel = nnx.state(scanned, nnx.Param)["Transformer"]["blocks"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.shape == (3, 192, 768)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  g1, _ = nnx.split(unrolled, nnx.Param)
  g2, _ = nnx.split(scanned, nnx.Param)
  np.testing.assert_allclose(nnx.merge(g1, p)(x), nnx.merge(g2, stacked)(x), rtol=1e-5, atol=1e-4)


def test_dropout_needs_rngs_and_is_deterministic_for_a_key():
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, num_layers=2, dropout_rate=0.1,
                        stochastic_depth=0.1, representation_size=8)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  with pytest.raises(ValueError, match="rngs"):
    model(x, train=True)
  a = model.encode(x, train=True, rngs=nnx.Rngs(dropout=1))
  b = model.encode(x, train=True, rngs=nnx.Rngs(dropout=1))
  c = model.encode(x, train=True, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(model.encode(x), model.encode(x))


def test_attention_implementations_agree_and_bad_name_fails():
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([1, 4]), 5)
  outputs, grads = {}, {}
  for impl in ("explicit", "xla"):
    model = models.create("ViT-Ti/4", num_classes=5, image_size=16, num_layers=2, attention=impl)
    # A random head, so that the gradients reach the attention.
    model.head.kernel[...] = jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    graphdef, params = nnx.split(model)

    def loss(p):
      logits = nnx.merge(graphdef, p)(images)
      return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))
    outputs[impl] = nnx.merge(graphdef, params)(images)
    grads[impl] = jax.grad(loss)(params)
  np.testing.assert_allclose(outputs["xla"], outputs["explicit"], rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["explicit"])):
    # (+1e-5: the key bias has an exact gradient of zero, so both give rounding noise there)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-5
  with pytest.raises(ValueError, match=r"attention implementation 'flash' is not one of \('explicit', 'xla', 'cudnn'\)"):
    models.create("ViT-Ti/4", num_classes=5, image_size=16, num_layers=1, attention="flash")
