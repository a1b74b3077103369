"""The core (models, train step, trainer's step-building path) needs neither TensorFlow nor
ml_collections: GPU machines have only the JAX stack."""

import json
import os
import subprocess
import sys

from tests.train_configs import tiny_config
from tests.conftest import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "ml_collections", "tensorflow_datasets"):
      raise ImportError(f"{name} is unimportable in this test")
    return None

sys.meta_path.insert(0, Block())
import jax, numpy as np
from vit_jax import models
from vit_jax.plain_config import PlainConfig
from vit_jax.train import trainer

config = PlainConfig.from_json(sys.argv[1])
setup = trainer.make_setup(config)
state = setup.init_state()
spec = setup.task.input_spec(config.batch_size)
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, spec["image"].shape).astype(np.float32),
         "labels": np.eye(spec["labels"].shape[1], dtype=np.float32)[rng.integers(0, 10, spec["labels"].shape[0])]}
step = setup.jit_train_step()
losses = []
for _ in range(3):
  state, metrics = step(state, setup.global_batch(batch))
  losses.append(float(metrics["loss"]))
assert losses[-1] < losses[0], losses
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "ml_collections"))
assert not bad, bad
print("ok", losses)
"""


def test_models_and_train_step_without_tensorflow_or_ml_collections(tmp_path):
  config = tiny_config(label_smoothing=0.0, batch_size=8).to_dict()
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = subprocess_xla_flags()
  out = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("ok")
