"""Reading checkpoint files into flat ``{name: numpy array}`` dicts, by content, not by suffix.

Containers: ``.npz`` (the original ViT and big_vision releases), ``.safetensors`` (read here
with numpy alone), torch state-dict files (torch is imported only for those), and the orbax
checkpoint directories this library's trainer writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import zipfile
from typing import Any

import numpy as np

from vit_jax.checkpoints.mapping import Arrays


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist."""


@dataclasses.dataclass
class Checkpoint:
  path: str
  container: str  # "npz" | "safetensors" | "torch" | "orbax"
  arrays: Arrays
  meta: dict = dataclasses.field(default_factory=dict)  # orbax: the trainer's meta (signature)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bfloat16():
  import ml_dtypes  # A JAX dependency.
  return ml_dtypes.bfloat16


def to_float(a: np.ndarray) -> np.ndarray:
  """Floating arrays (float16, bfloat16 or bfloat16 stored as raw 2-byte voids) as float32."""
  a = np.asarray(a)
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    a = a.view(_bfloat16())
  if a.dtype.kind == "f" or a.dtype == _bfloat16():
    return a.astype(np.float32)
  return a


def _kind(path: str) -> str:
  if os.path.isdir(path):
    return "orbax"
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:4] == b"PK\x03\x04":
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise CheckpointError(f"{path!r} is a damaged or truncated zip archive (an .npz or a torch "
                            f"checkpoint, cut short?): {e}") from None
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    if any(n.endswith("data.pkl") for n in names):
      return "torch"
    raise CheckpointError(f"{path!r} is a zip archive but neither an .npz of arrays nor a torch "
                          f"checkpoint (its first entries: {names[:5]})")
  if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
    return "safetensors"
  if head[:1] == b"\x80":  # A pickle: torch's legacy format.
    return "torch"
  raise CheckpointError(
      f"{path!r} is not a checkpoint: expected an .npz of arrays (original ViT or big_vision), "
      f"a .safetensors file, a torch state dict or an orbax checkpoint directory of this library")


def read_npz(path: str) -> Arrays:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: to_float(z[k]) for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise CheckpointError(f"cannot read the .npz checkpoint {path!r}: {e}") from None


def read_safetensors(path: str) -> Arrays:
  """Reads a .safetensors file with numpy (bfloat16 through ml_dtypes)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
  except (struct.error, ValueError) as e:
    raise CheckpointError(f"{path!r} is not a valid .safetensors file: {e}") from None
  body = memoryview(data)[8 + n:]
  out: Arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _bfloat16() if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    a = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
    out[name] = to_float(a.copy())
  return out


def read_torch(path: str) -> Arrays:
  """Reads a torch state dict (also one wrapped as {'state_dict': ...} or {'model': ...})."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # Optional dependency.
  except ImportError:
    raise CheckpointError(f"{path!r} is a torch checkpoint; reading it needs PyTorch "
                          "(pip install torch), or convert it to .safetensors") from None
  try:
    # Training scripts (DETR's, YOLOS's) save their argparse.Namespace beside the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds.
    raise CheckpointError(f"cannot read the torch checkpoint {path!r}: {e}") from None
  for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
    raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict of tensors")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def _orbax_step_dirs(path: str) -> list[str]:
  """The step directories to try, newest first: ``path`` itself, or the steps under it (or
  under ``path/checkpoints``, a workdir)."""
  if os.path.isdir(os.path.join(path, "state")):
    return [path]
  for root in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(root):
      steps = [d for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
      if steps:
        return [os.path.join(root, d) for d in sorted(steps, key=int, reverse=True)]
  raise CheckpointError(f"{path!r} is a directory but not an orbax checkpoint of this library: "
                        "expected a step directory with a 'state' item, or a workdir/checkpoint "
                        "directory holding step directories")


def _flatten(tree: Any, prefix: str = "") -> Arrays:
  out: Arrays = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = to_float(np.asarray(v))
  return out


def read_orbax(path: str) -> tuple[Arrays, dict, str]:
  """The parameters, model state and meta of a trainer checkpoint: (arrays, meta, step
  directory); parameters and model state share one namespace, the model's variable paths.
  The arrays are verified against the fingerprints saved with them; for a workdir the newest
  step that passes is read (a damaged one is skipped with a warning)."""
  candidates = _orbax_step_dirs(os.path.abspath(path))  # orbax misreads relative paths' metadata
  failures = []
  for step_dir in candidates:
    try:
      return _read_orbax_step(step_dir)
    except Exception as e:  # pylint: disable=broad-except  (damage of any kind)
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      failures.append(f"{step_dir}: {reason}")
      if len(candidates) > 1:
        logging.warning("checkpoint %s is damaged and will not be used (%s)", step_dir, reason)
  if len(candidates) == 1:
    raise CheckpointError(f"the checkpoint {failures[0]}")
  raise CheckpointError("no checkpoint under " + repr(path) + " reads back as it was saved: "
                        + "; ".join(failures))


def _read_orbax_step(step_dir: str) -> tuple[Arrays, dict, str]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vit_jax.train import fingerprint  # pylint: disable=g-import-not-at-top

  state_dir = os.path.join(step_dir, "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    if "params" not in tree:
      raise CheckpointError(f"{step_dir!r} holds no 'params' in its state")
    # The parameters and the model state (e.g. batch-norm statistics), not the optimizer's.
    items = {k: tree[k] for k in ("params", "model_state") if k in tree and tree[k]}
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=items, restore_args={k: jax_tree_map_numpy(v) for k, v in items.items()},
        partial_restore=True))
  meta = {}
  meta_file = os.path.join(step_dir, "meta", "metadata")
  if os.path.exists(meta_file):
    with open(meta_file) as f:
      meta = json.load(f)
  saved = meta.get("fingerprints")
  if saved is not None:
    saved = {k: v for k, v in saved.items() if k.split("/", 1)[0] in restored}
    wrong = fingerprint.differences(saved, fingerprint.numpy_fingerprints(dict(restored)))
    if wrong:
      raise CheckpointError(f"{len(wrong)} arrays differ from what was saved ({'; '.join(wrong[:3])})")
  arrays = _flatten(restored["params"])
  arrays.update(_flatten(restored.get("model_state") or {}))
  return arrays, meta, step_dir


def jax_tree_map_numpy(tree: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def read(path: str) -> Checkpoint:
  """Reads any supported checkpoint at ``path``."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
  kind = _kind(path)
  if kind == "orbax":
    arrays, meta, step_dir = read_orbax(path)
    return Checkpoint(step_dir, kind, arrays, meta)
  reader = {"npz": read_npz, "safetensors": read_safetensors, "torch": read_torch}[kind]
  arrays = reader(path)
  if not arrays:
    raise CheckpointError(f"{path!r} ({kind}) holds no arrays")
  return Checkpoint(path, kind, arrays)
