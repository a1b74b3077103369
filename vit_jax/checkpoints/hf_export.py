"""Hugging Face model folders: ``write_hf_folder`` writes ``model.safetensors`` and
``config.json``, which transformers' ``from_pretrained(folder)`` reads offline; ``read_hf_folder``
reads such a folder (or a downloaded one) back as a ``readers.Checkpoint`` for ``load_pretrained``.

The family-specific part (parameter names, the config dict) lives with each family's names
module (``yolos_names.export_hf``). Written with numpy alone: no torch or safetensors needed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np

from vit_jax.checkpoints import readers

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# Single-file and sharded weights, in the order ``read_hf_folder`` looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32", np.dtype(np.bool_): "BOOL"}


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> str:
  """Writes ``arrays`` (floats as float32) to a ``.safetensors`` file; returns its path."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  blobs, offset = [], 0
  for name in sorted(arrays):
    a = np.asarray(arrays[name])
    a = np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)
    if a.dtype not in _DTYPES:
      raise ValueError(f"cannot write {name!r} of dtype {a.dtype} to safetensors; "
                       f"supported: {sorted(str(d) for d in _DTYPES)}")
    blob = a.tobytes()
    header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  path = os.fspath(path)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  return path


def write_hf_folder(state_dict: Mapping[str, np.ndarray], config_dict: Mapping[str, Any],
                    folder: str | os.PathLike) -> str:
  """Writes an HF model folder: ``state_dict`` (PyTorch names and layouts) as
  ``model.safetensors`` and ``config_dict`` (with its ``model_type``) as ``config.json``.
  Creates ``folder`` if needed; returns its path."""
  if "model_type" not in config_dict:
    raise ValueError("config_dict needs a 'model_type' (e.g. 'yolos') for transformers to read it")
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(state_dict, os.path.join(folder, WEIGHTS))
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump(dict(config_dict), f, indent=2, sort_keys=True)
    f.write("\n")
  return folder


def is_hf_folder(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory with an HF ``config.json``."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def read_hf_folder(folder: str | os.PathLike) -> readers.Checkpoint:
  """The weights of an HF model folder (``model.safetensors``, ``pytorch_model.bin`` or their
  sharded ``.index.json`` forms), with its ``config.json`` as ``meta["config"]``."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise readers.CheckpointNotFoundError(f"HF model folder {folder!r} does not exist")
  try:
    with open(os.path.join(folder, CONFIG)) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise readers.CheckpointError(f"{folder!r} is not an HF model folder: cannot read its "
                                  f"{CONFIG} ({e})") from None
  name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
  if name is None:
    raise readers.CheckpointError(f"HF model folder {folder!r} holds none of {list(WEIGHT_FILES)}")
  path = os.path.join(folder, name)
  if name.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    parts = [readers.read(os.path.join(folder, shard)) for shard in shards]
    arrays = {k: v for part in parts for k, v in part.arrays.items()}
    return readers.Checkpoint(path, parts[0].container, arrays, {"config": config})
  ckpt = readers.read(path)
  return readers.Checkpoint(ckpt.path, ckpt.container, ckpt.arrays, {"config": config})
