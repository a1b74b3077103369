"""Shape buckets: examples grouped by image size, each group padded to its own canvas.

A bucketed pipeline (`pipeline.train_batches(..., buckets=...)`) gives every record of a split a bucket from
its image's height and width, read before decoding (`Source.image_sizes`). Each (shard, bucket) pair is its
own record stream, shuffled and split into epochs exactly as an unbucketed shard is. Which bucket step k
draws from is a pure function of (seed, k) weighted by the buckets' sizes over the whole split
(`BucketSchedule`), the same on every host, so every host's batch of a step has the same shape, the jitted
step compiles once per bucket, and a run resumed at step k skips in each stream the records of the
batches that bucket gave before k: the checkpoint still stores only the step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

_CHUNK = 1 << 16  # steps drawn per random generator


def best_canvas(sizes: np.ndarray, canvases: Sequence[tuple[int, int]]) -> np.ndarray:
  """The canvas for each image of `sizes` [n, 2] (height, width): of the canvases that hold the image
  scaled so that its shorter side is the canvas's (as resizing the shorter side to a scale does), the
  one it fills most; if none does, the one it fills most once scaled to fit inside it (its aspect
  ratio kept). Ties go to the first. With canvases that share their shorter side, as
  `configs/detection.py:aspect_buckets` makes them, that is the narrowest canvas that holds the image
  unshrunk."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  if not len(canvases):
    raise ValueError("best_canvas needs at least one canvas")
  if len(sizes) and (sizes <= 0).any():
    bad = sizes[(sizes <= 0).any(axis=1)][0]
    raise ValueError(f"an image of size {tuple(int(s) for s in bad)} (height, width) has no area")
  canvas = np.asarray(canvases, np.float64).reshape(1, -1, 2)
  h, w = sizes[:, None, 0], sizes[:, None, 1]
  ch, cw = canvas[..., 0], canvas[..., 1]
  short = np.minimum(ch, cw) / np.minimum(h, w)
  holds = (h * short <= ch + 1e-9) & (w * short <= cw + 1e-9)
  fit = np.minimum(ch / h, cw / w)
  fill = np.where(holds, 1.0 + (h * short) * (w * short) / (ch * cw), fit * fit * h * w / (ch * cw))
  return np.argmax(fill, axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """How a pipeline buckets a split: `assign(sizes [n, 2]) -> bucket [n]` in [0, len(pps)), the
  preprocessing of each bucket, and `gather_counts`, which turns this process's record counts
  [local shards, buckets] into every shard's [num_shards, buckets] (None: the process reads every shard)."""
  assign: Callable[[np.ndarray], np.ndarray]
  pps: tuple[str, ...]
  gather_counts: Callable[[np.ndarray], np.ndarray] | None = None

  def counts(self, local: np.ndarray, num_shards: int) -> np.ndarray:
    """Every shard's record count per bucket, from this process's."""
    if self.gather_counts is None:
      if local.shape[0] != num_shards:
        raise ValueError(f"this process reads {local.shape[0]} of {num_shards} shards, so "
                         "Buckets.gather_counts must give every shard's bucket counts")
      return local
    full = np.asarray(self.gather_counts(local))
    if full.shape != (num_shards, len(self.pps)):
      raise ValueError(f"Buckets.gather_counts gave counts of shape {full.shape}; expected every shard's "
                       f"counts, ({num_shards}, {len(self.pps)})")
    return full


class BucketSchedule:
  """The bucket of every training step: step k draws bucket b with probability proportional to
  `weights[b]`, from a generator seeded by (seed, k // 65536); a pure function of (seed, k)."""

  def __init__(self, weights: Sequence[float], seed: int):
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 1 or not len(weights) or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError(f"bucket weights must be non-negative with a positive sum, got {weights.tolist()}")
    self.cumulative = np.cumsum(weights / weights.sum())
    self.cumulative[np.flatnonzero(weights)[-1]:] = 1.0  # rounding never draws an empty last bucket
    self.seed = int(seed)

  def chunk(self, index: int) -> np.ndarray:
    """The buckets of steps [index * 65536, (index + 1) * 65536)."""
    key = np.array([self.seed & (2**64 - 1), index], np.uint64)  # a negative seed as its two's complement
    rng = np.random.Generator(np.random.Philox(key=key))
    u = rng.random(_CHUNK)
    return np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.cumulative) - 1)

  def buckets(self, start: int, stop: int) -> np.ndarray:
    """The buckets of steps [start, stop)."""
    if stop <= start:
      return np.zeros([0], np.int64)
    chunks = range(start // _CHUNK, (stop - 1) // _CHUNK + 1)
    steps = np.concatenate([self.chunk(c) for c in chunks])
    offset = chunks[0] * _CHUNK
    return steps[start - offset:stop - offset]

  def batches_before(self, step: int) -> np.ndarray:
    """How many batches each bucket gave in steps [0, step)."""
    counts = np.zeros(len(self.cumulative), np.int64)
    for first in range(0, step, _CHUNK):
      counts += np.bincount(self.buckets(first, min(step, first + _CHUNK)), minlength=len(counts))
    return counts

  def iterate(self, start: int):
    """The buckets of steps start, start + 1, ... (infinite)."""
    index = start // _CHUNK
    steps = self.chunk(index)[start - index * _CHUNK:]
    while True:
      yield from steps.tolist()
      index += 1
      steps = self.chunk(index)
