"""export.py and vit_jax.export: StableHLO, SavedModel and timm artifacts give the JAX model's
outputs (tiny models at small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

import export as export_script
from tests.conftest import subprocess_xla_flags
from tests.timm_helpers import import_timm
from tests.train_configs import ROOT, tiny_config
from vit_jax import checkpoints, models
from vit_jax import export as exporting
from vit_jax.checkpoints import hf_export, mapping, param_tree
from vit_jax.detection.postprocess import postprocess
from vit_jax.export import timm_format

TOL = 1e-4
TINY_VIT = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
TIMM_NUMERICS = dict(ws_style="var", ws_eps=1e-8, gn_eps=1e-5)  # timm's hybrid ResNet


def randomized(name: str, image_size=32, num_classes: int = 10, seed: int = 0, **options):
  """A model whose every parameter is perturbed (no zero head or identity norm to hide a bug)."""
  model = models.create(name, num_classes=num_classes, image_size=image_size, rngs=nnx.Rngs(seed),
                        **options)
  layer_lists = mapping.family_of(model).layer_lists
  rng = np.random.default_rng(seed)
  arrays = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in param_tree.model_arrays(model, layer_lists).items()}
  param_tree.assign(model, arrays, layer_lists)
  return model


def images(n: int, size=(32, 32), channels: int = 3, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, *size, channels)).astype(np.float32)


@pytest.fixture(scope="module")
def vit():
  return randomized("ViT-Ti/16", **TINY_VIT)


@pytest.fixture(scope="module")
def timm():
  return import_timm()


def test_stablehlo_any_batch_in_a_process_without_vit_jax(tmp_path, vit):
  serving = exporting.ServingConfig("ViT-Ti/16", 10, (32, 32))
  path = str(tmp_path / "vit.shlo")
  assert exporting.export(vit, serving, "stablehlo", path) == [path, path + ".json"]
  sidecar = json.load(open(path + ".json"))
  assert sidecar["inputs"] == [{"name": "images", "shape": ["b", 32, 32, 3], "dtype": "float32"}]
  assert sidecar["outputs"] == [{"name": "logits", "shape": ["b", 10], "dtype": "float32"}]
  assert (sidecar["mean"], sidecar["std"], sidecar["value_range"]) == ([0.5] * 3, [0.5] * 3, [-1, 1])
  batches = {f"b{n}": images(n, seed=n) for n in (1, 3, 32)}
  np.savez(tmp_path / "in.npz", **batches)
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      exported = jax.export.deserialize(open({path!r}, "rb").read())
      batches = np.load({str(tmp_path / "in.npz")!r})
      np.savez({str(tmp_path / "out.npz")!r},
               **{{k: np.asarray(exported.call(batches[k])["logits"]) for k in batches.files}})
      assert not [m for m in sys.modules if m.startswith("vit_jax")], "imported vit_jax"
  """)
  env = {**os.environ, "XLA_FLAGS": subprocess_xla_flags(), "PYTHONPATH": ""}
  subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)
  out = np.load(tmp_path / "out.npz")
  for key, x in batches.items():
    np.testing.assert_allclose(out[key], np.asarray(vit(x)), atol=TOL, rtol=0)

  exporting.export(vit, serving, "stablehlo", str(tmp_path / "fixed.shlo"), batch=2)
  fixed = jax.export.deserialize(open(tmp_path / "fixed.shlo", "rb").read())
  assert fixed.in_avals[0].shape == (2, 32, 32, 3)


def test_savedmodel_serving_default_in_tensorflow(tmp_path, vit):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serving = exporting.ServingConfig("ViT-Ti/16", 10, (32, 32), class_names=tuple("abcdefghij"))
  out = str(tmp_path / "saved")
  exporting.export(vit, serving, "savedmodel", out)
  assert json.load(open(out + ".json"))["class_names"] == list("abcdefghij")
  serve = tf.saved_model.load(out).signatures["serving_default"]
  assert list(serve.structured_input_signature[1]) == ["images"]
  for n in (1, 3):
    x = images(n, seed=n)
    got = serve(images=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(got, np.asarray(vit(x)), atol=TOL, rtol=0)


ONNX_VIT_OPS = ["Add", "Concat", "Div", "Erf", "Exp", "Expand", "Gather", "MatMul", "Max", "Mul",
                "Reciprocal", "ReduceMax", "ReduceSum", "Reshape", "Shape", "Sqrt", "Squeeze", "Sub",
                "Transpose"]


def onnx_session(path: str):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = 1
  return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def test_onnx_is_the_jax_computation_at_any_batch(tmp_path, vit):
  import onnx  # pylint: disable=g-import-not-at-top
  serving = exporting.ServingConfig("ViT-Ti/16", 10, (32, 32))
  path = str(tmp_path / "vit.onnx")
  assert exporting.export(vit, serving, "onnx", path) == [path, path + ".json"]
  graph = onnx.load(path).graph
  # The jaxpr's operations and nothing else: dot_general -> MatMul, erf -> Erf, softmax's
  # reduce_max/exp/reduce_sum/div, the batch read from the input's Shape for the class token.
  assert sorted({n.op_type for n in graph.node} - {"Identity"}) == ONNX_VIT_OPS
  assert json.load(open(path + ".json"))["operators"] == sorted(ONNX_VIT_OPS + ["Identity"])
  assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["b", 32, 32, 3]
  session = onnx_session(path)
  for n in (1, 3, 32):
    x = images(n, seed=n)
    got, = session.run(["logits"], {"images": x})
    np.testing.assert_allclose(got, np.asarray(vit(x)), atol=TOL, rtol=0)
  exporting.export(vit, serving, "onnx", str(tmp_path / "fixed.onnx"), batch=2)
  fixed = onnx.load(str(tmp_path / "fixed.onnx")).graph
  assert [d.dim_value for d in fixed.input[0].type.tensor_type.shape.dim] == [2, 32, 32, 3]
  assert "Shape" not in {n.op_type for n in fixed.node}  # nothing left to compute at run time
  x = images(2, seed=4)
  np.testing.assert_allclose(onnx_session(str(tmp_path / "fixed.onnx")).run(None, {"images": x})[0],
                             np.asarray(vit(x)), atol=TOL, rtol=0)


@pytest.mark.parametrize("name, options, ops", [
    ("R26+ViT-S/32", dict(TINY_VIT, resnet_layers=(1, 1), resnet_width=32), {"Conv", "MaxPool"}),
    ("BiT-R50x1", dict(layers=(1, 1), width=32), {"Conv", "MaxPool", "Pad"}),
    ("Mixer-B/8", dict(hidden_size=64, num_layers=2, tokens_mlp_dim=32, channels_mlp_dim=256), set()),
    ("TNT-S/16", dict(hidden_size=64, inner_size=16, num_layers=2, num_heads=2), {"Conv", "Slice"}),
])
def test_onnx_every_family(tmp_path, name, options, ops):
  import onnx  # pylint: disable=g-import-not-at-top
  model = randomized(name, **options)
  path = str(tmp_path / "m.onnx")
  exporting.export(model, exporting.ServingConfig(name, 10, (32, 32)), "onnx", path)
  assert ops <= {n.op_type for n in onnx.load(path).graph.node}
  x = images(3)
  np.testing.assert_allclose(onnx_session(path).run(None, {"images": x})[0], np.asarray(model(x)),
                             atol=TOL, rtol=0)


def test_onnx_rules_agree_with_jax_on_edge_cases(tmp_path):
  """Broadcasts kept small until a shape-sensitive operation, empty reductions, broadcast
  constants in products, and refusals where a rule would be wrong (found in review)."""
  import onnx  # pylint: disable=g-import-not-at-top
  from vit_jax.export import onnx_graph  # pylint: disable=g-import-not-at-top
  jnp = jax.numpy
  b, = jax.export.symbolic_shape("b")
  x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
  cases = {
      "broadcast_times_literal": lambda v: jnp.sum(jnp.broadcast_to(v[:1], (5, 4)) * 2.0, 0),
      "count_of_broadcast": lambda v: jnp.sum(jnp.broadcast_to(v[:, None], (v.shape[0], 2, 4)) > 0,
                                              axis=1).astype(jnp.float32),
      "empty_axes": lambda v: jnp.sum(v, axis=()) + jnp.max(v, axis=()),
      "broadcast_constant_product": lambda v: jnp.einsum("bk,knm->bnm", v, jnp.full((4, 2, 3), .5)),
  }
  for name, fn in cases.items():
    proto = onnx_graph.build_model(lambda v, fn=fn: {"y": fn(v)},
                                   [jax.ShapeDtypeStruct((b, 4), np.float32)], ["images"])
    onnx.save_model(proto, str(tmp_path / f"{name}.onnx"))
    got, = onnx_session(str(tmp_path / f"{name}.onnx")).run(None, {"images": x})
    np.testing.assert_allclose(got, np.asarray(fn(x)), atol=1e-6, rtol=0, err_msg=name)
  refused = {
      "not linear": (lambda v: jnp.zeros((v.shape[0] // 8, 3)), (b, 3)),
      "fills out-of-bounds": (lambda v: jnp.take(v, v[:, 0].astype(jnp.int32), axis=1), (3, 4)),
      "bitwise 'and' on integers": (lambda v: v.astype(jnp.int32) & 3, (3, 4)),
  }
  for message, (fn, shape) in refused.items():
    with pytest.raises(onnx_graph.UnsupportedPrimitive, match=message):
      onnx_graph.build_model(lambda v, fn=fn: {"y": fn(v)},
                             [jax.ShapeDtypeStruct(shape, np.float32)], ["images"])


def test_onnx_refuses_an_operation_it_has_no_rule_for(tmp_path):
  from vit_jax.export import onnx_graph  # pylint: disable=g-import-not-at-top
  spec = jax.ShapeDtypeStruct((2, 5), np.float32)
  with pytest.raises(onnx_graph.UnsupportedPrimitive, match="'sort' has no ONNX rule"):
    onnx_graph.build_model(lambda x: {"logits": jax.numpy.sort(x, axis=-1)}, [spec], ["images"])
  with pytest.raises(ValueError, match="onnx format has no platforms"):
    exporting.export(nnx.eval_shape(lambda: models.create("ViT-Ti/16", num_classes=10, image_size=32,
                                                          **TINY_VIT)),
                     exporting.ServingConfig("ViT-Ti/16", 10, (32, 32)), "onnx",
                     str(tmp_path / "m.onnx"), platforms=("cuda",))


def test_detectors_export_raw_and_post_processed_outputs(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  yolos = randomized("YOLOS-Ti", image_size=(32, 48), num_classes=5, patch_size=8,
                     num_det_tokens=6, **TINY_VIT)
  detr = randomized("DETR-R50", image_size=(32, 32), num_classes=5, resnet_layers=(1, 1, 1, 1),
                    resnet_width=8, hidden_size=32, num_heads=4, encoder_layers=1,
                    decoder_layers=2, mlp_dim=64, num_queries=7)
  for name, model, size in (("YOLOS-Ti", yolos, (32, 48)), ("DETR-R50", detr, (32, 32))):
    serving = exporting.ServingConfig(name, 5, size, detector=True)
    x = images(2, size)
    mask = np.ones((2, *size), np.float32)
    mask[1, :, size[1] // 2:] = 0  # the second image padded on the right
    sizes = np.array([[480, 640], [300, 200]], np.int32)  # the original images' (height, width)
    raw = jax.jit(lambda images, pixel_mask: model(images, pixel_mask=pixel_mask))(x, mask)
    want = {"logits": raw["logits"], "pred_boxes": raw["boxes"], **postprocess(raw, sizes)}
    want = {k: np.asarray(v) for k, v in want.items()}
    assert want["boxes"][..., 2:].max() > 100  # pixels of the original images
    tol = {k: TOL * (640 if k == "boxes" else 1) for k in want}  # 1e-4 of the image's size
    path = str(tmp_path / f"{name}.shlo")
    exporting.export(model, serving, "stablehlo", path)
    assert [i["name"] for i in json.load(open(path + ".json"))["inputs"]] == [
        "images", "pixel_mask", "image_sizes"]
    got = jax.export.deserialize(open(path, "rb").read()).call(x, mask, sizes)
    assert set(got) == set(want) == {"logits", "pred_boxes", "scores", "labels", "boxes"}
    for key in got:
      np.testing.assert_allclose(np.asarray(got[key]), want[key], atol=tol[key], rtol=0, err_msg=key)
    exporting.export(model, serving, "onnx", str(tmp_path / f"{name}.onnx"))
    session = onnx_session(str(tmp_path / f"{name}.onnx"))
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"images": x, "pixel_mask": mask, "image_sizes": sizes})))
    assert got["labels"].dtype == np.int32
    for key in want:
      np.testing.assert_allclose(got[key], want[key], atol=tol[key], rtol=0, err_msg=key)
    if name == "YOLOS-Ti":
      exporting.export(model, serving, "savedmodel", str(tmp_path / "yolos"))
      serve = tf.saved_model.load(str(tmp_path / "yolos")).signatures["serving_default"]
      got = serve(images=tf.constant(x), pixel_mask=tf.constant(mask), image_sizes=tf.constant(sizes))
      for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], atol=tol[key], rtol=0, err_msg=key)
  with pytest.raises(ValueError, match="detector: baking in the preprocessing"):
    exporting.export(yolos, exporting.ServingConfig("YOLOS-Ti", 5, (32, 48), detector=True),
                     "stablehlo", str(tmp_path / "p.shlo"), preprocess=True)


def test_with_preprocessing_takes_uint8_images(tmp_path, vit):
  serving = exporting.ServingConfig("ViT-Ti/16", 10, (32, 32), crop_pct=0.875,
                                    interpolation="bicubic", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
  assert serving.preprocessing().input_size == (36, 36)  # the model's size / crop_pct
  path = str(tmp_path / "pre.shlo")
  exporting.export(vit, serving, "stablehlo", path, preprocess=True, input_size=(40, 48))
  assert json.load(open(path + ".json"))["inputs"][0] == {
      "name": "images", "shape": ["b", 40, 48, 3], "dtype": "uint8"}
  pixels = np.random.default_rng(2).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
  # timm's eval transform: shorter side to floor(32 / 0.875) = 36 (the longer int(36 * 48 / 40)
  # = 43), centre crop 32 (top round(4 / 2), left round(11 / 2)), then (p / 255 - mean) / std.
  resized = np.asarray(jax.image.resize(pixels.astype(np.float32), (3, 36, 43, 3), "bicubic"))
  crop = resized[:, 2:34, 6:38]
  x = (crop / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.3, 0.25])
  want = np.asarray(vit(x.astype(np.float32)))
  got = jax.export.deserialize(open(path, "rb").read()).call(pixels)["logits"]
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
  exporting.export(vit, serving, "onnx", str(tmp_path / "pre.onnx"), preprocess=True,
                   input_size=(40, 48))
  got, = onnx_session(str(tmp_path / "pre.onnx")).run(None, {"images": pixels})
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


TIMM_CASES = {  # timm architectures at 32 px: (our name, options)
    "vit": ("ViT-Ti/16", TINY_VIT),
    "vit_gap_grey": ("ViT-Ti/8", dict(TINY_VIT, classifier="gap", channels=1)),
    "vit_map": ("ViT-Ti/8", dict(TINY_VIT, classifier="map")),
    "mixer": ("Mixer-S/32", {}),  # timm's Mixers fix patch, depth and width
    "hybrid_stem": ("R+ViT-Ti/16", dict(TINY_VIT, **TIMM_NUMERICS)),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_loads_the_export(tmp_path, timm, case):
  import torch  # pylint: disable=g-import-not-at-top
  name, options = TIMM_CASES[case]
  model = randomized(name, **options)
  channels = options.get("channels", 3)
  serving = exporting.ServingConfig(name, 10, (32, 32), channels=channels, crop_pct=0.9,
                                    class_names=tuple(str(i) for i in range(10)))
  out = str(tmp_path / "timm")
  exporting.export(model, serving, "timm", out)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["pretrained_cfg"]["input_size"] == [channels, 32, 32]
  assert config["pretrained_cfg"]["crop_pct"] == 0.9
  x = images(2, channels=channels)
  loaded = timm.create_model("local-dir:" + out, pretrained=True).eval()
  assert loaded.pretrained_cfg["label_names"] == [str(i) for i in range(10)]
  with torch.no_grad():
    got = loaded(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, np.asarray(model(x)), atol=TOL, rtol=0)
  if case == "vit":  # the other spelling: the architecture, its model_args, the file
    named = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay=dict(config["pretrained_cfg"],
                                                          file=os.path.join(out, "model.safetensors")))
    with torch.no_grad():
      np.testing.assert_allclose(named.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy(),
                                 got, atol=0, rtol=0)


@pytest.mark.parametrize("name, options", [
    ("BiT-R50x1", dict(layers=(1, 1), width=32)),
    ("TNT-S/16", dict(hidden_size=64, inner_size=16, num_layers=2, num_heads=2)),
    ("Mixer-B/8", dict(hidden_size=64, num_layers=2, tokens_mlp_dim=32, channels_mlp_dim=256)),
    ("R26+ViT-S/32", dict(TINY_VIT, resnet_layers=(1, 1), resnet_width=32)),
    ("ViT-Ti/16", dict(TINY_VIT, classifier="map", scan=True)),
])
def test_timm_names_load_back(tmp_path, name, options):
  """Every family's weights in timm's names, at sizes timm has no architecture for, read back by
  the loader (whose timm formats are parity-tested against timm in test_families.py)."""
  model = randomized(name, **options)
  path = hf_export.write_safetensors(timm_format.state_dict(model), tmp_path / "w.safetensors")
  fresh = checkpoints.load_pretrained(models.create(name, num_classes=10, image_size=32,
                                                    rngs=nnx.Rngs(5), **options), path)
  layer_lists = mapping.family_of(model).layer_lists
  want, got = param_tree.model_arrays(model, layer_lists), param_tree.model_arrays(fresh, layer_lists)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_timm_refuses_what_it_cannot_express(tmp_path, vit):
  def refused(name, match, **options):
    model = nnx.eval_shape(lambda: models.create(name, num_classes=10, image_size=32, **options))
    with pytest.raises(ValueError, match=match):
      exporting.export(model, exporting.ServingConfig(name, 10, (32, 32)), "timm",
                       str(tmp_path / "t"))
  refused("Mixer-B/8", "timm has no Mixer of patch 8, 2 blocks and width 64", hidden_size=64,
          num_layers=2, tokens_mlp_dim=32, channels_mlp_dim=256)
  refused("R26+ViT-S/32", r"timm has no hybrid with ResNet stages \(1, 1\)", resnet_layers=(1, 1),
          **TINY_VIT)
  refused("BiT-R50x1", "timm has no BiT with stages", layers=(1, 1), width=32)
  refused("ViT-Ti/16", "no pre-logits", representation_size=16, **TINY_VIT)
  refused("ViT-Ti/16", "exact GELU", gelu_approximate=True, **TINY_VIT)
  with pytest.raises(ValueError, match="timm has no detectors"):
    exporting.export(vit, exporting.ServingConfig("YOLOS-Ti", 5, (32, 32), detector=True), "timm",
                     str(tmp_path / "t"))
  serving = exporting.ServingConfig("ViT-Ti/16", 10, (32, 32))
  with pytest.raises(ValueError, match="timm format does not bake in preprocessing"):
    exporting.export(vit, serving, "timm", str(tmp_path / "t"), preprocess=True)
  with pytest.raises(ValueError, match="'tflite' is not one of stablehlo, savedmodel, onnx, timm"):
    exporting.export(vit, serving, "tflite", str(tmp_path / "t"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny train.py run: ViT-Ti/2 on the 8x8 grey digits."""
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("export") / "work")
  trainer.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every=2, eval_every=2,
                                         log_every=1, **{"schedule.warmup_steps": 1}),
                             path, jax.devices()[:1])
  return path


def test_command_line_on_a_trained_checkpoint(tmp_path, workdir, timm, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  spec, ckpt = checkpoints.infer_model(workdir)
  model = checkpoints.load_pretrained(models.create(spec.name, num_classes=spec.num_classes,
                                                    image_size=spec.image_size, **spec.overrides), ckpt)
  x = images(5, (8, 8), channels=1)
  want = np.asarray(model(x))

  path = str(tmp_path / "digits.shlo")
  assert export_script.main(["--checkpoint", workdir, "--format", "stablehlo", "--out", path]) == 0
  assert path in capsys.readouterr().out
  sidecar = json.load(open(path + ".json"))
  assert (sidecar["model"], sidecar["image_size"], sidecar["channels"]) == ("ViT-Ti/2", [8, 8], 1)
  assert sidecar["class_names"] == [str(i) for i in range(10)]  # the digits dataset's
  got = jax.export.deserialize(open(path, "rb").read()).call(x)["logits"]
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)

  path = str(tmp_path / "digits.onnx")
  assert export_script.main(["--checkpoint", workdir, "--format", "onnx", "--out", path]) == 0
  np.testing.assert_allclose(onnx_session(path).run(None, {"images": x})[0], want, atol=TOL, rtol=0)

  out = str(tmp_path / "timm")
  assert export_script.main(["--checkpoint", os.path.join(workdir, "checkpoints"),
                             "--format", "timm", "--out", out]) == 0
  loaded = timm.create_model("local-dir:" + out, pretrained=True).eval()
  with torch.no_grad():
    got = loaded(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_command_line_on_a_released_format_npz(tmp_path, vit, capsys):
  """The original repository's npz names (checkpoints.export_npz): the model read from the file."""
  npz = checkpoints.export_npz(vit, tmp_path / "released.npz")
  x = images(3)
  for fmt in ("onnx", "stablehlo"):
    out = str(tmp_path / f"released.{fmt}")
    assert export_script.main(["--checkpoint", npz, "--format", fmt, "--out", out]) == 0
    assert "(10 classes, 32x32)" in capsys.readouterr().out
    got = (onnx_session(out).run(None, {"images": x})[0] if fmt == "onnx" else
           jax.export.deserialize(open(out, "rb").read()).call(x)["logits"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(vit(x)), atol=TOL, rtol=0)


def test_bad_command_lines_give_one_error_line(tmp_path, capsys):
  prelogits = models.create("ViT-Ti/16", num_classes=10, image_size=32, representation_size=16,
                            **TINY_VIT)
  npz = checkpoints.export_npz(prelogits, tmp_path / "prelogits.npz")
  cases = [
      (["--checkpoint", npz, "--format", "tflite"],
       "--format 'tflite' is not one of stablehlo, savedmodel, onnx, timm"),
      (["--checkpoint", npz, "--format", "onnx", "--platforms", "cuda"], "onnx format has no platforms"),
      (["--checkpoint", npz, "--format", "onnx", "--dtype", "bfloat16"], "export.py --dtype float32"),
      (["--checkpoint", str(tmp_path / "none.npz"), "--format", "stablehlo"], "does not exist"),
      (["--checkpoint", npz, "--format", "timm", "--with_preprocessing"], "does not bake in"),
      (["--checkpoint", npz, "--format", "stablehlo", "--batch", "0"], "--batch '0'"),
      (["--checkpoint", npz, "--format", "timm"], "no pre-logits"),
  ]
  for argv, message in cases:
    assert export_script.main([*argv, "--out", str(tmp_path / "out")]) == 1, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", npz, "--format", "tflite",
       "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: --format 'tflite' is not one of stablehlo, savedmodel, onnx, timm"]
