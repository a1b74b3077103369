"""Fingerprints of checkpointed arrays: computed on the devices, independent of the mesh.

Each element's bits (as unsigned 32-bit words; 16- and 8-bit types widened, 64-bit split in
two) and its flat position ``i`` in the global array give two sums modulo 2**32:
``a = sum(w_i * (2i + 1))`` and ``b = sum(w_i * (2i + 1) * ((i mod 4096) * M + 1))`` with an odd
constant M. Integer addition modulo 2**32 is associative and commutative, so neither the mesh,
nor the sharding, nor the reduction order changes the result, and restoring onto another mesh
gives the same fingerprint. Any change of one word changes both (every multiplier is odd); a
moved or swapped element changes ``a`` unless the products happen to cancel, and ``b`` checks
again with other multipliers.

Two ways to the same sums: on accelerators one fused pass and a reduction in the array's own
shape (each device reduces its shard, then one scalar is summed across devices); on XLA's CPU
backend, whose integer reductions run one element at a time, the weighted words are folded in
halves with element-wise adds (which it vectorises) down to one 4096-wide row before the last
small reduction. ``numpy_fingerprints`` computes the same values on the host, for files read
without JAX's devices. Each returns ``{path: "v2:xxxxxxxx-xxxxxxxx-size"}``; a saved fingerprint
without the ``v2:`` prefix was written by the first scheme, whose ``a`` was the same and whose
``b`` is not compared.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_M = 0x85EBCA6B
_ROW = 4096  # b's period; a power of two
_PREFIX = "v2:"


def _words(x, xp):
  """The array's bits as uint32 words: ``x``'s shape (64-bit types: a trailing axis of 2)."""
  x = xp.asarray(x)
  if x.dtype == bool:
    return x.astype(xp.uint32)
  size = np.dtype(x.dtype).itemsize
  if xp is np:
    raw = np.ascontiguousarray(x)
    if size == 8:
      return raw.view(np.uint32).reshape(*x.shape, 2)
    return raw.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[size]).astype(np.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size])
  return bits.astype(jnp.uint32)


def _flat_index(shape, xp):
  """Each element's row-major position, as uint32, in the array's own shape."""
  u = xp.uint32
  index = xp.zeros(shape, dtype=u)
  stride = 1
  for axis in reversed(range(len(shape))):
    along = xp.arange(shape[axis], dtype=u).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    index = index + along * u(stride & 0xFFFFFFFF)
    stride *= shape[axis]
  return index


def _weights(index, xp):
  u = xp.uint32
  first = index * u(2) + u(1)
  return first, first * ((index & u(_ROW - 1)) * u(_M) + u(1))


def _pair_direct(x, xp) -> tuple[Any, Any]:
  """(a, b) by one weighted pass and a reduction in the array's own shape."""
  w = _words(x, xp)
  first, second = _weights(_flat_index(w.shape, xp), xp)
  total = lambda v: xp.sum(v, dtype=xp.uint32)
  return total(w * first), total(w * second)


def _pair_folded(x) -> tuple[Any, Any]:
  """(a, b) as ``_pair_direct`` computes them, by folding rows of 4096 in halves (XLA CPU)."""
  u = jnp.uint32
  w = _words(x, jnp).reshape(-1)
  n = w.shape[0]
  rows = n // _ROW
  if rows < 2:
    return _pair_direct(w, jnp)
  body = w[:rows * _ROW].reshape(rows, _ROW)
  index = (jnp.arange(rows, dtype=u)[:, None] * u(_ROW) + jnp.arange(_ROW, dtype=u)[None, :])
  folded, extra = body * (index * u(2) + u(1)), []
  while folded.shape[0] > 1:
    half = folded.shape[0] // 2
    if folded.shape[0] % 2:
      extra.append(folded[2 * half])
    folded = folded[:half] + folded[half:2 * half]
  row = sum(extra, folded[0])  # sum over i of the weighted words, per i mod 4096
  column = jnp.arange(_ROW, dtype=u) * u(_M) + u(1)
  a, b = jnp.sum(row, dtype=u), jnp.sum(row * column, dtype=u)
  if n > rows * _ROW:
    tail = w[rows * _ROW:]
    first, second = _weights(jnp.arange(rows * _ROW, n, dtype=u), jnp)
    a, b = a + jnp.sum(tail * first, dtype=u), b + jnp.sum(tail * second, dtype=u)
  return a, b


def _path(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _format(a, b, size: int) -> str:
  return f"{_PREFIX}{int(a):08x}-{int(b):08x}-{size}"


def _device_pairs(tree: Any, folded: bool) -> Any:
  pair = _pair_folded if folded else (lambda x: _pair_direct(x, jnp))
  return jax.tree.map(lambda x: jnp.stack(pair(x)), tree)


_device_pairs_jit = jax.jit(_device_pairs, static_argnames="folded")


def fingerprints(tree: Any, *, folded: bool | None = None) -> dict[str, str]:
  """``{path: fingerprint}`` of every array leaf, computed where the arrays live (``folded``:
  the CPU way; by default when the arrays are on CPU devices)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if folded is None:
    devices = {d.platform for x in jax.tree.leaves(tree) for d in getattr(x, "devices", lambda: ())()}
    folded = devices <= {"cpu"} and (devices or jax.default_backend() == "cpu")
  pairs = jax.device_get(_device_pairs_jit(tree, folded=bool(folded)))
  flat_pairs = jax.tree.leaves(pairs)
  return {_path(p): _format(ab[0], ab[1], int(np.size(x)))
          for (p, x), ab in zip(leaves, flat_pairs, strict=True)}


def numpy_fingerprints(tree: Any) -> dict[str, str]:
  """The same fingerprints computed with numpy on the host."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    with np.errstate(over="ignore"):
      a, b = _pair_direct(np.asarray(x), np)
    out[_path(p)] = _format(a, b, int(np.size(x)))
  return out


def _same(saved: str, restored: str) -> bool:
  if saved.startswith(_PREFIX):
    return saved == restored
  a, _, size = saved.split("-")  # the first scheme: its a is this one's a
  ra, _, rsize = restored[len(_PREFIX):].split("-")
  return (a, size) == (ra, rsize)


def differences(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """The paths whose fingerprints differ, are missing or are unexpected, described."""
  out = []
  for k in sorted(set(saved) | set(restored)):
    if k not in restored:
      out.append(f"{k}: saved but not restored")
    elif k not in saved:
      out.append(f"{k}: restored but has no saved fingerprint")
    elif not _same(saved[k], restored[k]):
      out.append(f"{k}: fingerprint {restored[k]} != saved {saved[k]}")
  return out
