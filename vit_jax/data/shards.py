"""Which data shards a process reads, and how large each shard's part of a batch is.

A split is cut into `num_shards` even, contiguous parts. Each shard yields its own deterministic stream of
sub-batches of `batch_size // num_shards` examples. Process p of P owns the contiguous block of shards
`[p * num_shards / P, (p + 1) * num_shards / P)` and its host-local batch is the concatenation of its shards'
sub-batches in shard order. So the global batch (all hosts' batches concatenated in process order) is the
shards' sub-batches in shard order 0..num_shards-1, whatever the process count: with a fixed `num_shards`, a
run on one host and a run on several see exactly the same global batches, and the host-local batch is the
block of global rows that `jax.make_array_from_process_local_data` expects from that process.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  num_shards: int
  process_index: int
  process_count: int
  shard_batch_size: int  # examples per shard per step
  local_shards: tuple[int, ...]  # shards this process reads, in order

  @property
  def local_batch_size(self) -> int:
    return self.shard_batch_size * len(self.local_shards)


def plan_shards(batch_size: int, num_shards: int | None = None, process_index: int | None = None,
                process_count: int | None = None) -> ShardPlan:
  """Resolves the defaults (jax's process index/count; one shard per process) and checks divisibility."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count); got process_index={process_index}, "
                     f"process_count={process_count}")
  num_shards = process_count if num_shards is None else num_shards
  if num_shards < 1 or num_shards % process_count:
    raise ValueError(f"num_shards={num_shards} must be a positive multiple of process_count={process_count}")
  if batch_size < 1 or batch_size % num_shards:
    raise ValueError(f"the global batch_size={batch_size} must be a positive multiple of "
                     f"num_shards={num_shards}")
  per_process = num_shards // process_count
  first = process_index * per_process
  return ShardPlan(num_shards=num_shards, process_index=process_index, process_count=process_count,
                   shard_batch_size=batch_size // num_shards,
                   local_shards=tuple(range(first, first + per_process)))
