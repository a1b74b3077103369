"""predict.py: top-5 with class names from released npz files and from our own checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

import predict
from vit_jax import checkpoints, models
from vit_jax.checkpoints import param_tree
from vit_jax.data import imagenet_labels

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def tiny_model(num_classes: int, seed: int = 0):
  model = models.create("ViT-Ti/16", num_classes=num_classes, image_size=32, rngs=nnx.Rngs(seed), **TINY)
  rng = np.random.default_rng(seed)
  arrays = {k: (v + 0.5 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in param_tree.model_arrays(model, ["Transformer/blocks"]).items()}
  param_tree.assign(model, arrays, ["Transformer/blocks"])
  return model


def expected_top5(model, paths):
  batch = np.stack([predict.load_image(p, 32, 3) for p in paths])
  logits = np.asarray(model(batch))
  return [list(np.argsort(-l, kind="stable")[:5]) for l in logits]


def test_imagenet1k_npz_without_model_name(tmp_path, image_files, capsys):
  model = tiny_model(1000)
  path = checkpoints.export_npz(model, tmp_path / "in1k.npz")
  out = tmp_path / "pred.json"
  assert predict.main(["--checkpoint", path, "--json", str(out), *image_files]) == 0
  results = json.loads(out.read_text())
  names = imagenet_labels.imagenet_names(1000)
  assert names[0] == "tench, Tinca tinca" and len(names) == 1000
  assert [r["image"] for r in results] == image_files
  for r, want in zip(results, expected_top5(model, image_files)):
    assert [t["index"] for t in r["top"]] == want
    assert [t["label"] for t in r["top"]] == [names[i] for i in want]
    probs = [t["probability"] for t in r["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
  printed = capsys.readouterr().out
  assert "ViT-B/16 (1000 classes, 32 px, hidden_size=32" in printed
  assert names[results[0]["top"][0]["index"]] in printed


def test_imagenet21k_names(tmp_path, image_files):
  model = tiny_model(21843)
  path = checkpoints.export_npz(model, tmp_path / "in21k.npz")
  results = predict.predict(["--checkpoint", path, image_files[0]])
  names = imagenet_labels.imagenet_names(21843)
  assert names[0] == "organism, being"
  top = results[0]["top"]
  assert [t["label"] for t in top] == [names[t["index"]] for t in top]
  assert [t["index"] for t in top] == expected_top5(model, image_files[:1])[0]


def test_own_orbax_checkpoint_with_a_labels_file(tmp_path, image_files):
  from vit_jax.train.checkpointing import Checkpointer
  from vit_jax.train.state import TrainState
  model = tiny_model(3, seed=2)
  state = TrainState(step=np.int32(7), params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                     opt_state={"count": np.zeros((), np.int32)}, model_state={})
  signature = {"task": "classification", "model": "ViT-Ti/16", "num_classes": 3, "image_size": 32,
               "options": TINY}
  ckpt = Checkpointer(str(tmp_path / "work" / "checkpoints"), async_save=False)
  ckpt.save(7, state, {"signature": signature, "step": 7})
  ckpt.close()
  labels = tmp_path / "labels.txt"
  labels.write_text("cat\ndog\neel\n")
  results = predict.predict(["--checkpoint", str(tmp_path / "work"), "--labels", str(labels),
                             "--top_k", "2", *image_files])
  want = expected_top5(model, image_files)
  for r, w in zip(results, want):
    assert [t["index"] for t in r["top"]] == w[:2]
    assert [t["label"] for t in r["top"]] == [["cat", "dog", "eel"][i] for i in w[:2]]


def test_errors_exit_with_a_message(tmp_path, image_files, capsys):
  path = checkpoints.export_npz(tiny_model(10), tmp_path / "m.npz")
  assert predict.main(["--checkpoint", path, "--model", "ViT-S/16", image_files[0]]) == 1
  err = capsys.readouterr().err
  assert "error: checkpoint" in err and "does not fit" in err and "embedding/kernel" in err
  assert predict.main(["--checkpoint", str(tmp_path / "none.npz"), image_files[0]]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert predict.main(["--checkpoint", path, str(tmp_path / "missing.png")]) == 1
  assert "cannot read the image" in capsys.readouterr().err
  labels = tmp_path / "two.txt"
  labels.write_text("a\nb\n")
  assert predict.main(["--checkpoint", path, "--labels", str(labels), image_files[0]]) == 1
  assert "has 2 classes, the checkpoint 10" in capsys.readouterr().err
