"""Deterministic, exactly resumable training batches and padded evaluation batches.

Sharding (see `vit_jax.data.shards`): a split is cut into `num_shards` even contiguous shards
(`tfds.even_splits`); process p reads a contiguous block of them and its host-local batch concatenates its
shards' sub-batches in shard order, so the global batch depends on `num_shards` but not on the process count.

Training stream of one shard, a pure function of (seed, shard):
  * the shard's raw records, numbered by their index within the shard (and cached in memory, decoded, when
    the split is small);
  * epoch e = those records shuffled with a seed derived from (seed, shard, e) (`reshuffle_each_iteration=
    False`; with a shuffle buffer smaller than the shard the shuffle is partial, but still deterministic);
  * epochs 0, 1, 2, ... concatenated into one infinite stream, then preprocessed in a parallel, deterministic
    map where example i of epoch e gets the stateless seed derived from (seed, shard, e, i), then batched.
Only stateless random ops are used, so no TF iterator state is needed: `start_step=k` rebuilds the stream
from epoch e and skips `offset` raw records, with (e, offset) = divmod(k * sub_batch, shard_size), and yields
exactly the batches an uninterrupted run yields from step k on. The checkpoint stores only the step.
Resuming costs re-reading (and shuffling) up to one epoch's raw records of each local shard, without
decoding or preprocessing them: at most one pass over the host's share of the encoded split on disk (for
ImageNet on one host, reading up to its ~140 GB of records), and a fraction of a second for small datasets.

Note: `tf.data.Dataset.shuffle` mixes TF's global seed into its seed, so the epoch order also depends on
`tf.random.set_seed` (never called here): set it identically, or not at all, in runs that must match.

Evaluation: one pass over the split, in order, each example exactly once over all processes. Every shard is
padded with all-zero examples to the same number of batches (so all processes run the same number of steps),
and a float32 `mask` (1 real, 0 padding) is added to each batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np

from vit_jax.data import shards
from vit_jax.data.preprocess_ops import parse_pp
from vit_jax.data.sources import DatasetInfo, Source, dataset_info, open_source
from vit_jax.data.tf_runtime import import_tf

__all__ = ["DatasetInfo", "dataset_info", "train_batches", "eval_batches", "num_eval_batches"]

_MAX_EPOCHS = 2**62  # "forever"
# Salts separating the uses of one (seed, shard, epoch) key.
_SHUFFLE_SALT, _AUGMENT_SALT = 0, 1
_MAP_FN_PARALLEL_ITERATIONS = 4


def _options(tf: Any) -> Any:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _fold_in(tf: Any, key: Any, data: Any) -> Any:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _shard_key(tf: Any, seed: int, shard: int) -> Any:
  return _fold_in(tf, tf.constant([0, seed], tf.int64), shard)


def _concat_shards(tf: Any, streams: list[Any]) -> Any:
  """Zips per-shard batch streams and concatenates each step's sub-batches in shard order."""
  if len(streams) == 1:
    return streams[0]
  return tf.data.Dataset.zip(tuple(streams)).map(
      lambda *batches: tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *batches))


def _train_shard(tf: Any, source: Source, *, split: str, shard: int, num_shards: int, size: int,
                 pp_fn: Callable, seed: int, start_step: int, shard_batch: int, shuffle_buffer: int) -> Any:
  """One shard's infinite stream of sub-batches, from step `start_step` on."""
  raw, decode, cache = source.read(split, shard, num_shards)
  raw = raw.enumerate()  # (index within the shard, record)
  if cache:
    raw = raw.cache()
  buffer = max(1, min(shuffle_buffer, size))
  shard_key = _shard_key(tf, seed, shard)

  def epoch(e):
    epoch_key = _fold_in(tf, shard_key, e)
    shuffle_seed = tf.math.floormod(_fold_in(tf, epoch_key, _SHUFFLE_SALT)[0], 2**31 - 1)
    augment_key = _fold_in(tf, epoch_key, _AUGMENT_SALT)
    records = raw.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return records.map(lambda i, record: (augment_key, i, record))

  epoch = tf.autograph.experimental.do_not_convert(epoch)

  first_epoch, offset = divmod(start_step * shard_batch, size)
  ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)
  if offset:
    ds = ds.skip(offset)  # Raw records only: nothing is decoded or preprocessed.

  @tf.autograph.experimental.do_not_convert
  def process(augment_key, i, record):
    return pp_fn(decode(record) if decode else record, _fold_in(tf, augment_key, i))

  return _map_and_batch(tf, ds, process, shard_batch, batchwise=cache)


def _fully_defined(tf: Any, spec: Any) -> bool:
  return all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec) if isinstance(s, tf.TensorSpec))


def _map_and_batch(tf: Any, ds: Any, process: Callable, batch_size: int, batchwise: bool) -> Any:
  """`ds.map(process).batch(batch_size, drop_remainder=True)`, computed batch-wise for small examples.

  With `batchwise` (small cached datasets, where tf.data's per-element overhead dominates) and fixed-shape
  records, the records are batched first and `process` runs on each example of a batch with `tf.map_fn`:
  the same per-example function on the same inputs, so the same result, at much less overhead. Large
  examples are mapped one by one, which keeps the memory of batches in flight small.
  """
  if not (batchwise and _fully_defined(tf, ds.element_spec)):
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True)
  out_spec = ds.map(process).element_spec  # Traces `process` once to learn its output signature.

  @tf.autograph.experimental.do_not_convert
  def process_batch(*batch):
    return tf.map_fn(lambda args: process(*args), batch, fn_output_signature=out_spec,
                     parallel_iterations=_MAP_FN_PARALLEL_ITERATIONS)

  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.map(process_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _as_numpy_iterator(ds: Any) -> Iterator[dict[str, np.ndarray]]:
  """The batches as numpy; an input that fails to read or decode is a ValueError saying which."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  batches = iter(tfds.as_numpy(ds))
  while True:
    try:
      yield next(batches)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError) as e:
      lines = [l.strip() for l in str(e.message).splitlines() if l.strip()]
      raise ValueError(f"the input pipeline could not read an example: {' '.join(lines[:3])[:500]}"
                       ) from None


def train_batches(*, dataset: str, split: str, pp: str, batch_size: int, seed: int, start_step: int = 0,
                  data_dir: str | None = None, shuffle_buffer: int = 50_000, num_shards: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches (numpy dicts with the keys `pp` keeps), from step `start_step`.

  `batch_size` is the global batch; this process yields `batch_size * local shards / num_shards` examples
  per step. Same arguments, same batches; `start_step=k` yields what the run from 0 yields from step k on.
  """
  if not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
    raise ValueError(f"seed must be an int64 integer, got {seed!r}")
  if not isinstance(start_step, (int, np.integer)) or start_step < 0:
    raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
  plan = shards.plan_shards(batch_size, num_shards, process_index, process_count)
  tf = import_tf()
  source = open_source(dataset, data_dir)
  pp_fn = parse_pp(pp)
  sizes = source.shard_sizes(split, plan.num_shards)
  streams = []
  for shard in plan.local_shards:
    if sizes[shard] == 0:
      raise ValueError(f"shard {shard} of {plan.num_shards} of {dataset!r} split {split!r} is empty; "
                       "use fewer shards or a larger split")
    streams.append(_train_shard(tf, source, split=split, shard=shard, num_shards=plan.num_shards,
                                size=sizes[shard], pp_fn=pp_fn, seed=int(seed),
                                start_step=int(start_step), shard_batch=plan.shard_batch_size,
                                shuffle_buffer=shuffle_buffer))
  ds = _concat_shards(tf, streams).prefetch(prefetch).with_options(_options(tf))
  return _as_numpy_iterator(ds)


def _eval_plan(*, dataset: str, split: str, batch_size: int, data_dir: str | None, num_shards: int | None,
               process_index: int | None, process_count: int | None) -> tuple[Source, Any, list[int], int]:
  plan = shards.plan_shards(batch_size, num_shards, process_index, process_count)
  source = open_source(dataset, data_dir)
  sizes = source.shard_sizes(split, plan.num_shards)
  num_batches = max(math.ceil(n / plan.shard_batch_size) for n in sizes)
  return source, plan, sizes, num_batches


def num_eval_batches(*, dataset: str, split: str, pp: str, batch_size: int, data_dir: str | None = None,
                     num_shards: int | None = None, process_index: int | None = None,
                     process_count: int | None = None) -> int:
  """How many batches `eval_batches` yields (the same on every process)."""
  del pp
  return _eval_plan(dataset=dataset, split=split, batch_size=batch_size, data_dir=data_dir,
                    num_shards=num_shards, process_index=process_index, process_count=process_count)[3]


def eval_batches(*, dataset: str, split: str, pp: str, batch_size: int, data_dir: str | None = None,
                 num_shards: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` in host-local batches with a float32 `mask` (0 marks padding examples)."""
  source, plan, sizes, num_batches = _eval_plan(
      dataset=dataset, split=split, batch_size=batch_size, data_dir=data_dir, num_shards=num_shards,
      process_index=process_index, process_count=process_count)
  tf = import_tf()
  pp_fn = parse_pp(pp)
  streams = []
  for shard in plan.local_shards:
    if sizes[shard] == 0:
      raise ValueError(f"shard {shard} of {plan.num_shards} of {dataset!r} split {split!r} is empty; "
                       "use fewer shards (or processes) for this split")
    raw, decode, _ = source.read(split, shard, plan.num_shards)
    key = _shard_key(tf, 0, shard)

    @tf.autograph.experimental.do_not_convert
    def process(i, record, decode=decode, key=key):
      example = pp_fn(decode(record) if decode else record, _fold_in(tf, key, i))
      if "mask" in example:
        raise ValueError(f"preprocessing {pp!r} produces a 'mask' key, which eval_batches adds itself")
      return {**example, "mask": tf.constant(1.0, tf.float32)}

    ds = raw.enumerate().map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = ds.take(1).map(lambda ex: tf.nest.map_structure(tf.zeros_like, ex)).cache().repeat()
    ds = ds.concatenate(padding).batch(plan.shard_batch_size, drop_remainder=True).take(num_batches)
    streams.append(ds)
  ds = _concat_shards(tf, streams).prefetch(2).with_options(_options(tf))
  return _as_numpy_iterator(ds)
