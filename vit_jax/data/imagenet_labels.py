"""ImageNet-1k and ImageNet-21k class names, read from the files the timm package ships.

Nothing is downloaded and timm (with its torch dependency) is not imported: its data files
``timm/data/_info/imagenet_synsets.txt`` (1,000 WordNet ids in class order),
``imagenet21k_goog_synsets.txt`` (21,843, Google's ImageNet-21k order, as in the original ViT
checkpoints) and ``imagenet_synset_to_lemma.txt`` (id -> "tench, Tinca tinca") are read directly.
Without timm installed the names are unavailable and callers print class indices.
"""

from __future__ import annotations

import functools
import importlib.util
import os

SYNSET_FILES = {1000: "imagenet_synsets.txt", 21843: "imagenet21k_goog_synsets.txt"}
SUBSETS = {"imagenet1k": 1000, "imagenet21k": 21843}
LEMMA_FILE = "imagenet_synset_to_lemma.txt"


def _info_dir() -> str | None:
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "_info")
  return path if os.path.isdir(path) else None


@functools.lru_cache(maxsize=None)
def imagenet_names(num_classes: int) -> list[str] | None:
  """Names of the 1,000 or 21,843 ImageNet classes in checkpoint order; None if unknown or
  if timm's files are not installed."""
  info = _info_dir()
  if num_classes not in SYNSET_FILES or info is None:
    return None
  with open(os.path.join(info, SYNSET_FILES[num_classes])) as f:
    synsets = f.read().split()
  with open(os.path.join(info, LEMMA_FILE)) as f:
    lemmas = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
  if len(synsets) != num_classes:
    return None
  return [lemmas.get(s, s) for s in synsets]
