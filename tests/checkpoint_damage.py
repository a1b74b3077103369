"""Ways to damage a saved checkpoint step directory (tests/test_checkpoint_integrity.py and
bench/faults.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil

# flip/truncate/delete: orbax's storage reports the damage; stale_arrays/fingerprint: the arrays
# read back without error and only the fingerprints tell.
VARIANTS = ("flip", "truncate", "delete", "metadata", "meta_json", "stale_arrays", "fingerprint")


def data_files(step_dir: str) -> list[str]:
  """The array data files of a step (orbax's OCDBT keeps the arrays' bytes under ``d/``)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  biggest = max(os.path.getsize(f) for f in files)
  return [f for f in files if os.path.getsize(f) == biggest]


def corrupt(step_dir: str, how: str) -> None:
  if how == "flip":  # bytes inside the arrays' data, the container left intact
    for path in data_files(step_dir):
      data = bytearray(open(path, "rb").read())
      for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
      open(path, "wb").write(bytes(data))
  elif how == "truncate":
    for path in data_files(step_dir):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif how == "delete":
    for path in data_files(step_dir):
      os.remove(path)
  elif how == "metadata":
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("{garbled")
  elif how == "meta_json":
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
      f.write("not json")
  elif how == "stale_arrays":  # valid arrays of another step under this step's metadata
    steps = sorted((d for d in os.listdir(os.path.dirname(step_dir)) if d.isdigit()), key=int)
    mine = os.path.basename(step_dir)
    others = [d for d in steps if d != mine]
    if not others:
      raise ValueError(f"stale_arrays needs another step beside {step_dir}")
    other = os.path.join(os.path.dirname(step_dir), others[-1], "state")
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(other, os.path.join(step_dir, "state"))
  elif how == "fingerprint":  # the arrays read back fine but differ from what was saved
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    key = sorted(k for k in meta["fingerprints"] if k.startswith("params/"))[0]
    meta["fingerprints"][key] = "v2:00000000-00000000-" + meta["fingerprints"][key].split("-")[-1]
    json.dump(meta, open(path, "w"))
  else:
    raise ValueError(how)
