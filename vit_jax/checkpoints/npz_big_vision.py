"""The big_vision ``.npz`` format of ViT (google-research/big_vision ``models/vit.py``).

Differences from the original format: keys under ``params/`` (``params/img/`` for the image
tower of a two-tower model), Linen block names (``MultiHeadDotProductAttention_0``,
``LayerNorm_1``, ``MlpBlock_0``), ``pos_embedding`` at the top level covering the patches only
(the class token is concatenated after it, so it gets no position embedding), an optional
``MAPHead_0``, and optionally the scan layout: one ``Transformer/encoderblock`` whose arrays
have a leading depth axis.
"""

from __future__ import annotations

import re
from typing import Collection

import numpy as np

from vit_jax.checkpoints import param_tree, posemb
from vit_jax.checkpoints.mapping import Arrays, Format, Rule, register_format, rename, strip_prefix
from vit_jax.checkpoints.npz_vit import BLOCKS, POSEMB

PREFIXES = ("params/img/", "params/")
SCANNED = "Transformer/encoderblock"
BLOCK = "Transformer/encoderblock_{i}/"


def _load_token_posemb(arrays, shapes):
  cls, pe = arrays
  del shapes
  prefix, _ = posemb.split_tokens(pe.shape[1])
  if prefix == 0:  # The class token had no position embedding: give it a zero row.
    pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  return [cls, pe]


def _save_token_posemb(arrays):
  cls, pe = arrays
  # Fold the class token's position embedding into the token: the same function.
  return [cls + pe[:, :1], pe[:, 1:]]


RULES = (
    rename(BLOCK + "MultiHeadDotProductAttention_0/{rest:*}",
           BLOCKS + "/{i}/MultiHeadDotProductAttention_1/{rest:*}"),
    rename(BLOCK + "LayerNorm_0/{rest:*}", BLOCKS + "/{i}/LayerNorm_0/{rest:*}"),
    rename(BLOCK + "LayerNorm_1/{rest:*}", BLOCKS + "/{i}/LayerNorm_2/{rest:*}"),
    rename(BLOCK + "MlpBlock_0/{rest:*}", BLOCKS + "/{i}/MlpBlock_3/{rest:*}"),
    Rule(("cls", "pos_embedding"), ("cls", POSEMB), load=_load_token_posemb,
         save=_save_token_posemb),
    rename("pos_embedding", POSEMB),
    rename("{name:*}", "{name:*}"),
)


def prepare(arrays: Arrays) -> Arrays:
  arrays = strip_prefix(arrays, PREFIXES)
  if "Transformer/pos_embedding" in arrays:  # Checkpoints from before 2022.
    arrays["pos_embedding"] = arrays.pop("Transformer/pos_embedding")
  scanned = {k.replace(SCANNED + "/", "Transformer/blocks/", 1): v for k, v in arrays.items()
             if k.startswith(SCANNED + "/")}
  if not scanned:
    return arrays
  rest = {k: v for k, v in arrays.items() if not k.startswith(SCANNED + "/")}
  for k, v in param_tree.unstack_layers(scanned, ["Transformer/blocks"]).items():
    rest[re.sub(r"^Transformer/blocks/(\d+)/", r"Transformer/encoderblock_\1/", k)] = v
  return rest


def finish(arrays: Arrays, *, scan: bool = False) -> Arrays:
  """Adds the ``params/`` prefix; with ``scan`` stacks the blocks as big_vision's scan layout."""
  if scan:
    blocks = {re.sub(r"^Transformer/encoderblock_(\d+)/", r"Transformer/blocks/\1/", k): v
              for k, v in arrays.items() if k.startswith("Transformer/encoderblock_")}
    stacked = param_tree.stack_layers(blocks, ["Transformer/blocks"])
    arrays = {k: v for k, v in arrays.items() if not k.startswith("Transformer/encoderblock_")}
    arrays.update({k.replace("Transformer/blocks/", SCANNED + "/", 1): v for k, v in stacked.items()})
  return {f"params/{k}": v for k, v in arrays.items()}


def detect(keys: Collection[str]) -> bool:
  """Linen block names, or a scanned stack, or a top-level ``pos_embedding``."""
  return any(k.startswith(SCANNED + "/")
             or re.fullmatch(r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/.+", k)
             for k in keys) or "pos_embedding" in keys


register_format(Format(
    family="ViT", name="big_vision", rules=RULES, detect=detect, containers=("npz",),
    prepare=prepare, finish=finish))
