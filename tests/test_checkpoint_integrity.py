"""Checkpoint integrity: fingerprints independent of the mesh, every corruption of the latest
checkpoint detected (none loads silently), the previous one restored instead, the same for the
readers predict.py and visualize.py use."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.checkpoint_damage import VARIANTS, corrupt
from vit_jax.checkpoints import readers
from vit_jax.train import checkpointing, fingerprint

AUTO = jax.sharding.AxisType.Auto


def mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def make_state(seed: int, m) -> dict:
  rng = np.random.default_rng(seed)
  w = jax.device_put(rng.normal(size=(16, 24)).astype(np.float32), NamedSharding(m, P("data")))
  return {"params": {"dense": {"kernel": w, "bias": jnp.asarray(rng.normal(size=(24,)), jnp.bfloat16)}},
          "model_state": {"bn": {"mean": jnp.asarray(rng.normal(size=(24,)), jnp.float32)}},
          "opt_state": {"count": jnp.asarray(seed, jnp.int32)}, "step": jnp.asarray(seed, jnp.int32)}


def abstract(state, m, spec=P()):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(m, spec)),
                      state)


def equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_fingerprints_do_not_depend_on_the_mesh_and_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  tree = {"x": x, "i": np.arange(5, dtype=np.int32), "h": np.asarray(x[:2], jnp.bfloat16)}
  ways = [jax.tree.map(jnp.asarray, tree),
          {k: jax.device_put(v, NamedSharding(mesh((8,), ("a",)), P("a") if v.shape[0] % 8 == 0 else P()))
           for k, v in tree.items()},
          {k: jax.device_put(v, NamedSharding(mesh((2, 4), ("a", "b")), P(None, "b") if v.ndim == 2 and v.shape[1] % 4 == 0 else P()))
           for k, v in tree.items()}]
  want = fingerprint.numpy_fingerprints(tree)
  for t in ways:
    assert fingerprint.fingerprints(t) == want
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5] ^= 1 << 7
  assert fingerprint.numpy_fingerprints({**tree, "x": flipped})["x"] != want["x"]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert fingerprint.numpy_fingerprints({**tree, "x": swapped})["x"] != want["x"]


def test_the_cpu_fold_and_the_accelerators_reduction_give_the_same_fingerprints():
  rng = np.random.default_rng(1)
  tree = {"rows_odd": rng.normal(size=(3, 4096 * 5 + 77)).astype(np.float32),  # 15 rows + a tail
          "rows_even": rng.normal(size=(4096 * 8,)).astype(np.float32),
          "short": rng.normal(size=(9000,)).astype(jnp.bfloat16), "bool": rng.normal(size=5000) > 0,
          "scalar": np.int32(7), "bytes": rng.integers(0, 255, size=(70, 90), dtype=np.uint8)}
  want = fingerprint.numpy_fingerprints(tree)
  on_devices = jax.tree.map(jnp.asarray, tree)
  assert fingerprint.fingerprints(on_devices, folded=True) == want
  assert fingerprint.fingerprints(on_devices, folded=False) == want
  # A checkpoint written by the first scheme (no "v2:"; its first sum is this one's) still passes.
  first_scheme = {k: v[3:].split("-")[0] + "-0badc0de-" + v.split("-")[-1] for k, v in want.items()}
  assert fingerprint.differences(first_scheme, want) == []
  first_scheme["short"] = "00000000-0badc0de-9000"
  assert fingerprint.differences(first_scheme, want) == [
      f"short: fingerprint {want['short']} != saved 00000000-0badc0de-9000"]


@pytest.fixture
def saved(tmp_path):
  m = mesh((8,), ("data",))
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  states = {s: make_state(s, m) for s in (1, 2)}
  for s, state in states.items():
    ckpt.save(s, state, {"signature": {"model": "toy"}, "step": s})
  ckpt.close()
  return directory, states





@pytest.mark.parametrize("how", VARIANTS)
def test_a_damaged_latest_checkpoint_is_never_used(saved, how, caplog):
  directory, states = saved
  corrupt(os.path.join(directory, "2"), how)
  m = mesh((2, 4), ("a", "b"))  # restored onto another mesh: the fingerprints still agree
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(abstract(states[1], m), {"model": "toy"})
  assert meta["step"] == 1 and equal(state, states[1])
  assert f"checkpoint {directory}/2 is damaged" in caplog.text
  assert ckpt.latest_step() == 1
  assert glob.glob(os.path.join(directory, "damaged-2-*"))
  # A later save of step 2 (the resumed run reaching it again) is possible.
  ckpt.save(2, states[2], {"signature": {"model": "toy"}, "step": 2})
  ckpt.wait()
  state, meta = ckpt.restore(abstract(states[2], m), {"model": "toy"})
  assert meta["step"] == 2 and equal(state, states[2])
  ckpt.close()


def test_no_good_checkpoint_is_a_clear_error(saved):
  directory, states = saved
  corrupt(os.path.join(directory, "2"), "fingerprint")
  corrupt(os.path.join(directory, "1"), "delete")
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  with pytest.raises(checkpointing.CheckpointIntegrityError,
                     match=r"no checkpoint in .* reads back as it was saved: .*/2: 1 arrays differ.*/1: "):
    ckpt.restore(abstract(states[1], mesh((8,), ("data",))), {"model": "toy"})
  ckpt.close()


def test_an_explicit_damaged_step_is_refused_and_left_in_place(saved):
  directory, states = saved
  corrupt(os.path.join(directory, "2"), "fingerprint")
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  with pytest.raises(checkpointing.CheckpointIntegrityError,
                     match=r"checkpoint .*/2 does not read back as it was saved: 1 arrays differ"):
    ckpt.restore(abstract(states[2], mesh((8,), ("data",))), {"model": "toy"}, 2, move_aside=False)
  assert os.path.isdir(os.path.join(directory, "2"))
  ckpt.close()


@pytest.mark.parametrize("how", ["flip", "stale_arrays"])
def test_the_readers_skip_a_damaged_checkpoint(saved, how, tmp_path):
  directory, states = saved
  corrupt(os.path.join(directory, "2"), how)
  arrays, meta, step_dir = readers.read_orbax(str(tmp_path))  # the workdir
  assert step_dir.endswith("/1") and meta["step"] == 1
  np.testing.assert_array_equal(arrays["dense/kernel"], np.asarray(states[1]["params"]["dense"]["kernel"]))
  with pytest.raises(readers.CheckpointError, match="/2: .*"):
    readers.read_orbax(os.path.join(directory, "2"))
  shutil.rmtree(os.path.join(directory, "1"))
  with pytest.raises(readers.CheckpointError):
    readers.read_orbax(str(tmp_path))


# ------------------------------------------------------------------ one run per workdir

def test_a_second_run_on_a_workdir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  from vit_jax.train import workdir_lock
  workdir = str(tmp_path / "work")
  with workdir_lock.hold(workdir):
    with pytest.raises(workdir_lock.WorkdirInUseError,
                       match=rf"the workdir {workdir} is in use by another run \(process {os.getpid()} on "):
      with workdir_lock.hold(workdir):
        pass
  with workdir_lock.hold(workdir):  # released at the end of the block
    pass
  # A holder killed with SIGKILL: the kernel drops its lock; the next run takes it over.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, %r)\n"
      "from vit_jax.train import workdir_lock\n"
      "with workdir_lock.hold(%r):\n  print('held', flush=True); time.sleep(60)") % (
          os.path.dirname(os.path.dirname(os.path.abspath(__file__))), workdir)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirInUseError, match=f"process {holder.pid} "):
    with workdir_lock.hold(workdir):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(workdir):
    pass


def test_a_save_that_would_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  import shutil
  from vit_jax.train import disk_space
  state = {"w": jnp.ones((256, 256), jnp.float32)}  # 256 KB
  ckpt = checkpointing.Checkpointer(str(tmp_path / "c"), keep=3)
  ckpt.save(1, state, {"step": 1})
  ckpt.wait()
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=(1 << 20) + 1000))
  with pytest.raises(disk_space.DiskFullError, match=(
      r"no space for the checkpoint of step 2 in .*/c: it needs about 1.2 MB, 1.0 MB free. The "
      r"last complete checkpoint, step 1, is intact. Free some space")):
    ckpt.save(2, state, {"step": 2})
  assert sorted(os.listdir(tmp_path / "c")) == ["1"]
  monkeypatch.setattr(shutil, "disk_usage", real)
  ckpt.save(2, state, {"step": 2})  # room again: saved
  ckpt.wait()
  assert ckpt.manager.all_steps() == [1, 2]
  ckpt.close()


def test_out_of_space_errors_are_recognised_through_their_chain():
  import errno
  from vit_jax.train import disk_space
  assert disk_space.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = ValueError("RESOURCE_EXHAUSTED: Failed to write 237 bytes to file 10: No "
                                 "space left on device [os_error_code='28']")
  assert disk_space.is_disk_full(wrapped)
  assert not disk_space.is_disk_full(OSError(errno.EACCES, "Permission denied"))
