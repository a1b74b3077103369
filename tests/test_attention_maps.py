"""Attention maps: capture for every family (against softmax(q·kᵀ/√d) recomputed from each layer's
inputs, outputs unchanged), rollout and its gradient-weighted variant against NumPy references,
the Figure 7 analyses, detection maps, visualize.py end to end and its bad inputs."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit_jax import checkpoints, models
from vit_jax.attention_maps import capture as capture_lib
from vit_jax.attention_maps import detection_maps, figure7, rollout as rollout_lib
from vit_jax.models import recording

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> (name, image size, options): tiny members of every family with attention.
FAMILIES = {
    "vit_token": ("ViT-Ti/8", 32, dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)),
    "vit_gap": ("ViT-Ti/8", 32, dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                                     classifier="gap")),
    "vit_map": ("ViT-Ti/8", 32, dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                                     classifier="map")),
    "vit_scan": ("ViT-Ti/8", 32, dict(hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32,
                                      scan=True)),
    "hybrid": ("R26+ViT-S/32", 32, dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                                        resnet_layers=(1, 1), resnet_width=32)),
    "tnt": ("TNT-S/16", 32, dict(hidden_size=16, inner_size=8, num_layers=2, num_heads=2)),
    "yolos": ("YOLOS-Ti/8", (32, 48), dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                                           num_det_tokens=4)),
    "detr": ("DETR-R50", (64, 96), dict(resnet_layers=(1, 1), resnet_width=8, hidden_size=16,
                                        num_heads=2, mlp_dim=32, encoder_layers=2,
                                        decoder_layers=2, num_queries=4)),
}


def random_model(family: str, **extra) -> nnx.Module:
  """The family's tiny model, built abstractly and filled with seeded random values (variances
  positive), which is much faster than initialising it."""
  name, size, options = FAMILIES[family]
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create(
      name, num_classes=3, image_size=size, **options, **extra)))
  rng = np.random.default_rng(0)

  def fill(path, a):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if "var" in key:
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape).astype(a.dtype))
    return jnp.asarray(rng.uniform(-0.5, 0.5, a.shape).astype(a.dtype))
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def images_for(family: str, batch: int = 2) -> np.ndarray:
  size = FAMILIES[family][1]
  h, w = (size, size) if isinstance(size, int) else size
  return np.random.default_rng(1).uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _plain(graphdef, state, x):
  return nnx.merge(graphdef, state)(x, train=False)


def module_at(model: nnx.Module, name: str):
  """The attention module a captured name refers to, and the layer index for scanned stacks."""
  for template, module in capture_lib.attention_names(model).items():
    if recording.LAYER not in template:
      if template == name:
        return module, None
      continue
    head, tail = template.split(recording.LAYER)
    if name.startswith(head) and name.endswith(tail):
      return module, int(name[len(head):len(name) - len(tail)])
  raise KeyError(name)


def reference_weights(module, layer, queries, keys) -> np.ndarray:
  """softmax(q·kᵀ/√d) in float64 from the module's own projections of its recorded inputs."""
  def proj(dense, x):
    kernel = np.asarray(dense.kernel[...], np.float64)
    bias = None if dense.bias is None else np.asarray(dense.bias[...], np.float64)
    if layer is not None:
      kernel = kernel[layer]
      bias = None if bias is None else bias[layer]
    y = np.einsum("...d,dhk->...hk", np.asarray(x, np.float64), kernel)
    return y if bias is None else y + bias
  q, k = proj(module.query, queries), proj(module.key, keys)  # [..., T, H, Dh]
  logits = np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("implementation", ["explicit", "xla"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_weights_are_the_softmax_of_each_layer_and_change_no_output(family, implementation):
  model = random_model(family, attention=implementation)
  x = images_for(family)
  cap = capture_lib.capture(model, jnp.asarray(x), keep_inputs=True)
  graphdef, state = nnx.split(model)
  plain = _plain(graphdef, state, jnp.asarray(x))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cap.outputs), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-equal
  expected = {n.replace(recording.LAYER, str(i)) for n in capture_lib.attention_names(model)
              for i in range(FAMILIES[family][2].get("num_layers", 1))}
  if family != "vit_scan":
    expected = set(capture_lib.attention_names(model))
  assert set(cap.weights) == expected
  for name, w in cap.weights.items():
    module, layer = module_at(model, name)
    queries, keys = cap.inputs[name]
    ref = reference_weights(module, layer, queries, keys)
    assert w.shape == ref.shape, name
    np.testing.assert_allclose(np.asarray(w), ref, atol=2e-6, err_msg=name)


def test_capture_names_layers_and_families():
  names = set(capture_lib.attention_names(random_model("detr")))
  assert {"encoder/layers/0/self_attn", "decoder/layers/1/self_attn",
          "decoder/layers/1/multihead_attn"} <= names
  tnt = set(capture_lib.attention_names(random_model("tnt")))
  assert {"blocks/0/attn_in", "blocks/0/attn_out", "blocks/1/attn_out"} <= tnt
  assert set(capture_lib.attention_names(random_model("vit_scan"))) == {
      "Transformer/blocks/{layer}/MultiHeadDotProductAttention_1"}
  for bad in ("Mixer-B/16", "BiT-R50x1"):
    model = nnx.eval_shape(lambda: models.create(bad, num_classes=3, image_size=32))
    with pytest.raises(ValueError, match="has no attention.*ViT.*TNT.*YOLOS.*DETR"):
      capture_lib.capture(model, jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------ rollout against NumPy

def numpy_rollout(layers, fusion="mean", discard=0.0, keep_first=True):
  """The paper's definition, written plainly (per image, per layer, loops)."""
  out = []
  for b in range(layers[0].shape[0]):
    r = None
    for w in layers:
      a = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](np.asarray(w[b], np.float64), axis=0)
      if discard:
        flat = a.flatten()
        ranked = flat.copy()
        if keep_first:
          ranked[0] = np.inf
        count = int(flat.size * discard)
        flat[np.argsort(ranked, kind="stable")[:count]] = 0.0
        a = flat.reshape(a.shape)
      a = a + np.eye(a.shape[0])
      a = a / a.sum(axis=1)[:, None]
      r = a if r is None else a @ r
    out.append(r)
  return np.stack(out)


def random_attention(layers=3, batch=2, heads=3, tokens=5, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(layers):
    logits = rng.normal(size=(batch, heads, tokens, tokens))
    e = np.exp(logits)
    out.append((e / e.sum(-1, keepdims=True)).astype(np.float32))
  return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_matches_the_definition(fusion, discard):
  layers = random_attention()
  ours = rollout_lib.rollout([jnp.asarray(w) for w in layers], head_fusion=fusion, discard_ratio=discard)
  np.testing.assert_allclose(np.asarray(ours), numpy_rollout(layers, fusion, discard), atol=1e-6)
  assert np.allclose(np.asarray(ours).sum(-1), 1.0, atol=1e-5)  # rows, not columns, sum to 1


def test_gradient_rollout_matches_autodiff_reference():
  model = random_model("vit_token")
  x = jnp.asarray(images_for("vit_token"))
  ours, targets = rollout_lib.gradient_rollout(model, x, target=[1, 2])
  np.testing.assert_array_equal(np.asarray(targets), [1, 2])
  # Reference: the gradient of the target logits by finite-difference-free autodiff through a
  # perturbation written here, then Chefer's recursion in NumPy.
  run, state = capture_lib.capture_function(model)
  _, weights = run(state, x, None, {})
  names = [f"Transformer/blocks/{i}/MultiHeadDotProductAttention_1" for i in range(2)]
  zeros = {n: jnp.zeros_like(weights[n]) for n in names}
  grads = jax.grad(lambda p: run(state, x, None, p)[0][jnp.arange(2), jnp.asarray([1, 2])].sum())(zeros)
  expected = []
  for b in range(2):
    r = np.eye(weights[names[0]].shape[-1])
    for n in names:
      a = np.maximum(np.asarray(grads[n][b], np.float64) * np.asarray(weights[n][b], np.float64), 0).mean(0)
      r = r + a @ r
    expected.append(r[0, 1:].reshape(4, 4))
  np.testing.assert_allclose(np.asarray(ours), np.stack(expected), atol=1e-6)


def test_rollout_maps_follow_the_pooling():
  for family in ("vit_token", "vit_gap", "vit_map", "yolos"):
    model = random_model(family)
    x = jnp.asarray(images_for(family))
    lay = capture_lib.layout(model, x.shape[1:3])
    got, cap = rollout_lib.attention_rollout(model, x)
    r = numpy_rollout([np.asarray(w) for w in capture_lib.encoder_weights(cap, lay)],
                      keep_first=lay.prefix > 0)
    rows, cols = lay.grid
    patches = slice(lay.prefix, lay.prefix + rows * cols)
    if family == "vit_token":
      want = r[:, 0, patches]
    elif family == "vit_gap":
      want = r[:, patches, patches].mean(1)
    elif family == "vit_map":
      probe = np.asarray(cap.weights["MAPHead_0/MultiHeadDotProductAttention_0"]).mean(1)[:, 0]
      want = np.einsum("bt,bts->bs", probe, r)[:, patches]
    else:
      want = r[:, lay.prefix + rows * cols:, patches].reshape(2, lay.suffix, rows, cols)
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
      continue
    np.testing.assert_allclose(np.asarray(got), want.reshape(2, rows, cols), atol=1e-6)


# ------------------------------------------------------------------ Figure 7

def test_mean_attention_distance_on_constructed_attention():
  n, patch = 4, 16
  tokens = n * n
  uniform = np.full((1, 2, tokens + 1, tokens + 1), 1.0 / (tokens + 1))
  d = figure7.patch_distances((n, n), patch)
  np.testing.assert_allclose(figure7.mean_attention_distance(uniform, (n, n), patch),
                             [d.mean(), d.mean()], rtol=1e-12)
  # The known value for a 4x4 grid of 16 px patches, from the pairwise distances written out.
  ys, xs = np.divmod(np.arange(tokens), n)
  brute = np.mean([np.hypot(ys[i] - ys[j], xs[i] - xs[j]) * patch
                   for i in range(tokens) for j in range(tokens)])
  assert figure7.mean_attention_distance(uniform, (n, n), patch)[0] == pytest.approx(brute)
  self_attention = np.zeros((1, 1, tokens + 1, tokens + 1))
  self_attention[0, 0] = np.eye(tokens + 1)
  assert figure7.mean_attention_distance(self_attention, (n, n), patch)[0] == 0.0


def test_position_similarity_on_a_non_square_grid():
  rows, cols, dim = 384 // 16, 240 // 16, 8
  posemb = np.random.default_rng(0).normal(size=(1, 1 + rows * cols, dim))
  got = figure7.position_similarity(posemb, (rows, cols), prefix=1)
  cells = posemb[0, 1:]
  for (i, j) in ((0, 0), (3, 7), (rows - 1, cols - 1)):
    a = cells[i * cols + j]
    want = np.array([[a @ cells[r * cols + c] / np.linalg.norm(a) / np.linalg.norm(cells[r * cols + c])
                      for c in range(cols)] for r in range(rows)])
    np.testing.assert_allclose(got[i, j], want, rtol=1e-12)


def test_embedding_components_are_numpy_pca_of_a_released_format_npz(tmp_path, visualize, image_files):
  # A ViT-B/16 in the original release's .npz layout (one block: the filters and positions are
  # ViT-B/16's), with known random weights.
  model = nnx.eval_shape(lambda: models.create("ViT-B/16", num_classes=10, image_size=224, num_layers=1))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(3)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32) * 0.05), state)
  model = nnx.merge(graphdef, state)
  path = str(tmp_path / "ViT-B_16.npz")
  checkpoints.export_npz(model, path)
  arrays = np.load(path)
  kernel = arrays["embedding/kernel"]
  assert kernel.shape == (16, 16, 3, 768)
  comps = figure7.embedding_components(kernel, 28)
  assert comps.shape == (28, 16, 16, 3)
  x = kernel.reshape(-1, 768).T.astype(np.float64)
  x = x - x.mean(0)
  eigvals, eigvecs = np.linalg.eigh(np.cov(x, rowvar=False))
  top = eigvecs[:, ::-1][:, :28].T
  for k in range(28):
    v = comps[k].ravel()
    assert abs(abs(v @ top[k]) - 1.0) < 1e-6, k  # the same direction up to sign
  # The Figure 7 panels from that file: 28 RGB filters, the 14x14 similarity tiles, the distances.
  out = tmp_path / "fig7"
  assert visualize.main(["--checkpoint", path, "--images", image_files[0], "--out", str(out)]) == 0
  fig = np.load(out / "figure7.npz")
  np.testing.assert_allclose(fig["components"], comps, atol=1e-6)
  assert fig["position_similarity"].shape == (14, 14, 14, 14)
  assert fig["attention_distance"].shape == (1, 12)
  for name in ("figure7_filters.png", "figure7_position_similarity.png", "figure7_attention_distance.png"):
    assert (out / name).stat().st_size > 0


# ------------------------------------------------------------------ detection maps

def test_detection_maps_read_the_right_rows():
  model = random_model("yolos")
  x = jnp.asarray(images_for("yolos"))
  lay = capture_lib.layout(model, x.shape[1:3])
  assert (lay.prefix, lay.grid, lay.suffix) == (1, (4, 6), 4)
  cap = capture_lib.capture(model, x)
  att = detection_maps.yolos_det_attention(cap.weights, lay)
  last = np.asarray(cap.weights["Transformer/blocks/1/MultiHeadDotProductAttention_1"])
  np.testing.assert_array_equal(att[:, :, 2].reshape(2, 2, 24), last[:, :, 1 + 24 + 2, 1:25])
  model = random_model("detr")
  x = jnp.asarray(images_for("detr"))
  lay = capture_lib.layout(model, x.shape[1:3])
  cap = capture_lib.capture(model, x, pixel_mask=jnp.ones(x.shape[:3]))
  rows, cols = lay.grid
  cross = detection_maps.detr_cross_attention(cap.weights, lay)
  w = np.asarray(cap.weights["decoder/layers/1/multihead_attn"]).mean(1)
  assert w.shape[-1] == rows * cols
  np.testing.assert_allclose(cross.reshape(2, 4, -1), w, rtol=1e-6)
  enc = detection_maps.detr_encoder_attention(cap.weights, lay, (0, lay.patch_size * (cols - 1)))
  w = np.asarray(cap.weights["encoder/layers/1/self_attn"]).mean(1)
  np.testing.assert_allclose(enc.reshape(2, -1), w[:, cols - 1], rtol=1e-6)
  with pytest.raises(ValueError, match="outside"):
    detection_maps.detr_encoder_attention(cap.weights, lay, (10_000, 0))


def test_capture_on_eight_devices_with_sharded_parameters():
  from jax.sharding import NamedSharding, PartitionSpec as P
  assert jax.device_count() == 8
  model = random_model("vit_token")
  x = jnp.asarray(images_for("vit_token", batch=8))
  single = capture_lib.capture(model, x)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = capture_lib.capture(nnx.merge(graphdef, state),
                                jax.device_put(x, NamedSharding(mesh, P("data"))))
  for name, w in single.weights.items():
    np.testing.assert_allclose(np.asarray(capture_lib.to_numpy({name: sharded.weights[name]})[name]),
                               np.asarray(w), atol=1e-6)


# ------------------------------------------------------------------ visualize.py

@pytest.fixture(scope="module")
def visualize():
  import visualize as module
  return module


@pytest.fixture(scope="module")
def vit_npz(tmp_path_factory):
  model = random_model("vit_token")
  path = str(tmp_path_factory.mktemp("vit") / "tiny.npz")
  checkpoints.export_npz(model, path)
  return path, model


def test_visualize_a_classifier_writes_rollouts_grids_and_figure7(visualize, vit_npz, image_files, tmp_path):
  from vit_jax.data.image_files import load_image
  path, model = vit_npz
  out = tmp_path / "maps"
  assert visualize.main(["--checkpoint", path, "--images", *image_files, "--out", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  for stem in ("img0", "img1"):
    for suffix in ("_rollout.png", "_heads.png", "_maps.npz"):
      assert (out / (stem + suffix)).stat().st_size > 0
  for name in ("figure7_filters.png", "figure7_position_similarity.png",
               "figure7_attention_distance.png", "figure7.npz"):
    assert name in summary["written"] and (out / name).exists()
  arrays = np.load(out / "img1_maps.npz")
  x = jnp.asarray(load_image(image_files[1], 32, 3)[None])
  loaded = models.create("ViT-Ti/8", num_classes=3, image_size=32, **FAMILIES["vit_token"][2])
  checkpoints.load_pretrained(loaded, path)
  want, _ = rollout_lib.attention_rollout(loaded, x)
  np.testing.assert_allclose(arrays["rollout"], np.asarray(want[0]), atol=1e-6)
  assert arrays["layer_head"].shape == (2, 2, 4, 4)
  fig = np.load(out / "figure7.npz")
  assert fig["components"].shape == (16, 8, 8, 3) and fig["attention_distance"].shape == (2, 2)


def test_visualize_a_detr_checkpoint(visualize, image_files, tmp_path):
  from vit_jax.train.checkpointing import Checkpointer
  from vit_jax.train.state import TrainState
  model = random_model("detr")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  state = TrainState(step=np.int32(1), params=params, opt_state={"count": np.zeros((), np.int32)},
                     model_state=rest)
  name, size, options = FAMILIES["detr"]
  signature = {"task": "detection", "model": name, "num_classes": 3, "canvas": list(size),
               "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
  ckpt = Checkpointer(str(tmp_path / "work" / "checkpoints"), async_save=False)
  ckpt.save(1, state, {"signature": signature, "step": 1})
  ckpt.close()
  out = tmp_path / "det"
  assert visualize.main(["--workdir", str(tmp_path / "work"), "--images", image_files[0],
                         "--out", str(out), "--threshold", "0.0", "--max_queries", "3",
                         "--reference_pixels", "8,8;40,70"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["images"][0]["shown_queries"]) == 3
  arrays = np.load(out / "img0_maps.npz")
  lay = capture_lib.layout(model, (64, 96))
  assert arrays["cross_attention"].shape == (4, *lay.grid)
  assert arrays["encoder_attention"].shape == (2, *lay.grid)
  np.testing.assert_allclose(arrays["cross_attention"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  assert (out / "img0_decoder.png").exists() and (out / "img0_encoder.png").exists()


@pytest.mark.parametrize("case,match", [
    ("missing_image", "cannot read the image .*no such file"),
    ("bad_image", "cannot read the image"),
    ("layer", "--layer 7 is out of range: the model has 2 layers"),
    ("head", "--head 2 is out of range: the model has 2 heads"),
    ("discard", "--discard_ratio 1.5"),
    ("mixer", "has no attention.*ViT"),
    ("config", "describes ViT-Ti/2 with 10 classes, but the checkpoint holds ViT-B/8 with 3"),
])
def test_visualize_bad_input_is_a_clear_message(visualize, vit_npz, image_files, tmp_path, capsys,
                                                 case, match):
  path, _ = vit_npz
  args = ["--checkpoint", path, "--images", image_files[1], "--out", str(tmp_path / "o")]
  if case == "missing_image":
    args[args.index("--images") + 1] = str(tmp_path / "nope.png")
  elif case == "bad_image":
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args[args.index("--images") + 1] = str(bad)
  elif case == "layer":
    args += ["--layer", "7"]
  elif case == "head":
    args += ["--head", "2"]
  elif case == "discard":
    args += ["--discard_ratio", "1.5"]
  elif case == "config":
    args += ["--config", os.path.join(ROOT, "configs/default.py")]
  elif case == "mixer":
    mixer = models.create("Mixer-B/16", num_classes=3, image_size=32, hidden_size=8, num_layers=1,
                          tokens_mlp_dim=4, channels_mlp_dim=8)
    args[1] = checkpoints.export_npz(mixer, tmp_path / "mixer.npz")
  assert visualize.main(args) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert __import__("re").search(match, err), err
