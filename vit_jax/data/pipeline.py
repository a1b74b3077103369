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

Shape buckets (`buckets=`, see `vit_jax.data.buckets`): each record gets a bucket from its image size, and
each (shard, bucket) pair is a stream of its own, built as above with the bucket's preprocessing (its
epochs and skips count that pair's records, its keys fold in the bucket). Training step k takes its batch
from the bucket `BucketSchedule` draws for k, the same on every host; resuming at step k skips in each
stream the records of the batches its bucket gave before k. Every shard gives the same share of each
batch, so a shard holding fewer of a bucket's images than the others repeats them more often. Evaluation
goes through the buckets in order, each shard padded within each bucket. Every bucketed stream reads all of
its shard's records and keeps its bucket's, so reading a split costs as many passes as there are buckets.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import numpy as np

from vit_jax.data import shards
from vit_jax.data.buckets import Buckets, BucketSchedule
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


def _bucket_records(tf: Any, raw: Any, bucket: tuple[np.ndarray, int] | None) -> Any:
  """(index within the shard, record) pairs, only those of `bucket` = (bucket of each record, bucket)."""
  raw = raw.enumerate()
  if bucket is None:
    return raw
  table = tf.constant(bucket[0], tf.int64)
  return raw.filter(lambda i, record: tf.gather(table, i) == bucket[1])


def _train_shard(tf: Any, source: Source, *, split: str, shard: int, num_shards: int, size: int,
                 pp_fn: Callable, seed: int, start_batch: int, shard_batch: int, shuffle_buffer: int,
                 bucket: tuple[np.ndarray, int] | None = None) -> Any:
  """One shard's (or one (shard, bucket) pair's) infinite stream of sub-batches, after skipping the
  `start_batch` sub-batches it gave before; `size` counts its records."""
  raw, decode, cache = source.read(split, shard, num_shards)
  raw = _bucket_records(tf, raw, bucket)
  if cache:
    raw = raw.cache()
  buffer = max(1, min(shuffle_buffer, size))
  shard_key = _shard_key(tf, seed, shard)
  if bucket is not None:
    shard_key = _fold_in(tf, shard_key, -1 - bucket[1])  # Epochs fold in 0, 1, ...

  def epoch(e):
    epoch_key = _fold_in(tf, shard_key, e)
    shuffle_seed = tf.math.floormod(_fold_in(tf, epoch_key, _SHUFFLE_SALT)[0], 2**31 - 1)
    augment_key = _fold_in(tf, epoch_key, _AUGMENT_SALT)
    records = raw.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return records.map(lambda i, record: (augment_key, i, record))

  epoch = tf.autograph.experimental.do_not_convert(epoch)

  first_epoch, offset = divmod(start_batch * shard_batch, size)
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


def _bucket_plan(source: Source, split: str, plan: Any, buckets: Buckets, training: bool
                 ) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """The bucket of every record of the local shards, and every shard's record count per bucket (in
  training, every bucket that has images must have some in every shard)."""
  tables = {}
  for shard in plan.local_shards:
    table = np.asarray(buckets.assign(source.image_sizes(split, shard, plan.num_shards)), np.int64)
    if len(table) and (table.min() < 0 or table.max() >= len(buckets.pps)):
      raise ValueError(f"bucket assignment gave buckets outside [0, {len(buckets.pps)})")
    tables[shard] = table
  local = np.stack([np.bincount(tables[s], minlength=len(buckets.pps)) for s in plan.local_shards])
  counts = buckets.counts(local, plan.num_shards)
  if training:
    for b in np.flatnonzero(counts.sum(0)):
      empty = np.flatnonzero(counts[:, b] == 0)
      if len(empty):
        raise ValueError(f"shape bucket {b} holds {int(counts[:, b].sum())} training images, none of them in "
                         f"shard {int(empty[0])} of {plan.num_shards}, which must give it batches too; use "
                         "fewer data shards or fewer buckets")
  return tables, counts


def train_batches(*, dataset: str, split: str, pp: str, batch_size: int, seed: int, start_step: int = 0,
                  data_dir: str | None = None, shuffle_buffer: int = 50_000, num_shards: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  prefetch: int = 2, buckets: Buckets | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local training batches (numpy dicts with the keys `pp` keeps), from step `start_step`.

  `batch_size` is the global batch; this process yields `batch_size * local shards / num_shards` examples
  per step. Same arguments, same batches; `start_step=k` yields what the run from 0 yields from step k on.
  With `buckets` each batch comes from one shape bucket, preprocessed by its spec in `buckets.pps` (`pp`
  is then unused; module docstring).
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
  sizes = source.shard_sizes(split, plan.num_shards)
  for shard in plan.local_shards:
    if sizes[shard] == 0:
      raise ValueError(f"shard {shard} of {plan.num_shards} of {dataset!r} split {split!r} is empty; "
                       "use fewer shards or a larger split")
  stream = functools.partial(_train_shard, tf, source, split=split, num_shards=plan.num_shards,
                             seed=int(seed), shard_batch=plan.shard_batch_size, shuffle_buffer=shuffle_buffer)
  if buckets is None:
    pp_fn = parse_pp(pp)
    ds = _concat_shards(tf, [stream(shard=shard, size=sizes[shard], pp_fn=pp_fn, start_batch=int(start_step))
                             for shard in plan.local_shards])
  else:
    tables, counts = _bucket_plan(source, split, plan, buckets, training=True)
    schedule = BucketSchedule(counts.sum(0), seed)
    before = schedule.batches_before(int(start_step))
    per_bucket = {}
    for b in map(int, np.flatnonzero(counts.sum(0))):  # An empty bucket is never drawn.
      pp_fn = parse_pp(buckets.pps[b])
      per_bucket[b] = _concat_shards(tf, [
          stream(shard=shard, size=int(counts[shard, b]), pp_fn=pp_fn, start_batch=int(before[b]),
                 bucket=(tables[shard], b)) for shard in plan.local_shards])
    any_bucket = next(iter(per_bucket.values()))
    per_bucket = [per_bucket.get(b, any_bucket.take(0)) for b in range(len(buckets.pps))]
    choice = tf.data.Dataset.from_generator(lambda: schedule.iterate(int(start_step)),
                                            output_signature=tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.choose_from_datasets(per_bucket, choice, stop_on_empty_dataset=True)
  ds = ds.prefetch(prefetch).with_options(_options(tf))
  return _as_numpy_iterator(ds)


def _eval_plan(*, dataset: str, split: str, batch_size: int, data_dir: str | None, num_shards: int | None,
               process_index: int | None, process_count: int | None, buckets: Buckets | None = None
               ) -> tuple[Source, Any, list[int], list[int], dict[int, np.ndarray]]:
  """The source, the shard plan, every shard's size, the batches of each bucket (one entry without
  buckets) and the local shards' bucket of every record."""
  plan = shards.plan_shards(batch_size, num_shards, process_index, process_count)
  source = open_source(dataset, data_dir)
  sizes = source.shard_sizes(split, plan.num_shards)
  if buckets is None:
    return source, plan, sizes, [max(math.ceil(n / plan.shard_batch_size) for n in sizes)], {}
  tables, counts = _bucket_plan(source, split, plan, buckets, training=False)
  per_bucket = [int(math.ceil(counts[:, b].max() / plan.shard_batch_size)) for b in range(len(buckets.pps))]
  return source, plan, sizes, per_bucket, tables


def num_eval_batches(*, dataset: str, split: str, pp: str, batch_size: int, data_dir: str | None = None,
                     num_shards: int | None = None, process_index: int | None = None,
                     process_count: int | None = None, buckets: Buckets | None = None) -> int:
  """How many batches `eval_batches` yields (the same on every process)."""
  del pp
  return sum(_eval_plan(dataset=dataset, split=split, batch_size=batch_size, data_dir=data_dir,
                        num_shards=num_shards, process_index=process_index, process_count=process_count,
                        buckets=buckets)[3])


def eval_batches(*, dataset: str, split: str, pp: str, batch_size: int, data_dir: str | None = None,
                 num_shards: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, buckets: Buckets | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` in host-local batches with a float32 `mask` (0 marks padding examples). With
  `buckets`, the buckets one after the other, each preprocessed by its spec (`pp` is then unused)."""
  source, plan, sizes, num_batches, tables = _eval_plan(
      dataset=dataset, split=split, batch_size=batch_size, data_dir=data_dir, num_shards=num_shards,
      process_index=process_index, process_count=process_count, buckets=buckets)
  tf = import_tf()
  for shard in plan.local_shards:
    if sizes[shard] == 0:
      raise ValueError(f"shard {shard} of {plan.num_shards} of {dataset!r} split {split!r} is empty; "
                       "use fewer shards (or processes) for this split")
  specs = [pp] if buckets is None else list(buckets.pps)
  per_bucket = []
  for b, spec in enumerate(specs):
    if not num_batches[b]:
      continue
    pp_fn = parse_pp(spec)
    streams = []
    for shard in plan.local_shards:
      raw, decode, _ = source.read(split, shard, plan.num_shards)
      key = _shard_key(tf, 0, shard)

      @tf.autograph.experimental.do_not_convert
      def process(i, record, decode=decode, key=key, pp_fn=pp_fn, spec=spec):
        example = pp_fn(decode(record) if decode else record, _fold_in(tf, key, i))
        if "mask" in example:
          raise ValueError(f"preprocessing {spec!r} produces a 'mask' key, which eval_batches adds itself")
        return {**example, "mask": tf.constant(1.0, tf.float32)}

      records = _bucket_records(tf, raw, None if buckets is None else (tables[shard], b))
      ds = records.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      # The padding: any record of the shard, preprocessed as this bucket's, zeroed.
      padding = raw.enumerate().take(1).map(process).map(lambda ex: tf.nest.map_structure(tf.zeros_like, ex))
      ds = ds.concatenate(padding.cache().repeat())
      streams.append(ds.batch(plan.shard_batch_size, drop_remainder=True).take(num_batches[b]))
    per_bucket.append(_concat_shards(tf, streams))
  ds = per_bucket[0]
  for more in per_bucket[1:]:
    ds = ds.concatenate(more)
  ds = ds.prefetch(2).with_options(_options(tf))
  return _as_numpy_iterator(ds)
