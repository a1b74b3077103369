"""Fingerprints of checkpointed arrays: computed on the devices, independent of the mesh.

Each element's bits (as unsigned 32-bit words; 16- and 8-bit types widened, 64-bit split in
two) and its flat position ``i`` in the global array give two order-free sums modulo 2**32:
``a = sum(w_i * (2i + 1))`` and ``b = sum((w_i ^ K) * (i * M + 1) + w_i)`` with odd constants.
Integer addition modulo 2**32 is associative and commutative, so neither the mesh, nor the
sharding, nor the reduction order changes the result, and restoring onto another mesh gives the
same fingerprint. Any change of one word changes ``a`` (its multiplier is odd), a moved or
swapped element changes it unless the products happen to cancel, and ``b`` checks again with
other multipliers. It costs a few integer operations per element, one pass over the state
(measured: docs/benchmarks.md).

``fingerprints(tree)`` (jittable, on the devices) and ``numpy_fingerprints`` (the same values on
the host, for files read without JAX's devices) return ``{path: "xxxxxxxx-xxxxxxxx-size"}``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_K, _M = 0x9E3779B9, 0x85EBCA6B


def _words(x, xp):
  """The array's bits as a flat uint32 vector (``xp``: numpy or jax.numpy)."""
  x = xp.asarray(x)
  if x.dtype == bool:
    return x.reshape(-1).astype(xp.uint32)
  size = np.dtype(x.dtype).itemsize
  if xp is np:
    raw = np.ascontiguousarray(x).reshape(-1)
    if size == 8:
      return raw.view(np.uint32)
    return raw.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[size]).astype(np.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x.reshape(-1), jnp.uint32).reshape(-1)
  bits = jax.lax.bitcast_convert_type(x.reshape(-1), {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size])
  return bits.astype(jnp.uint32)


def _pair(x, xp) -> tuple[Any, Any]:
  w = _words(x, xp)
  u = xp.uint32
  index = xp.arange(w.shape[0], dtype=xp.uint32)
  a = w * (index * u(2) + u(1))
  b = (w ^ u(_K)) * (index * u(_M) + u(1)) + w
  total = lambda v: xp.sum(v, dtype=xp.uint32)
  return total(a), total(b)


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
  return f"{int(a):08x}-{int(b):08x}-{size}"


@jax.jit
def _device_pairs(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.stack(_pair(x, jnp)), tree)


def fingerprints(tree: Any) -> dict[str, str]:
  """``{path: fingerprint}`` of every array leaf, computed where the arrays live."""
  pairs = jax.device_get(_device_pairs(tree))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_pairs = jax.tree.leaves(pairs)
  return {_path(p): _format(ab[0], ab[1], int(np.size(x)))
          for (p, x), ab in zip(leaves, flat_pairs, strict=True)}


def numpy_fingerprints(tree: Any) -> dict[str, str]:
  """The same fingerprints computed with numpy on the host."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    with np.errstate(over="ignore"):
      a, b = _pair(np.asarray(x), np)
    out[_path(p)] = _format(a, b, int(np.size(x)))
  return out


def differences(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """The paths whose fingerprints differ, are missing or are unexpected, described."""
  out = []
  for k in sorted(set(saved) | set(restored)):
    if k not in restored:
      out.append(f"{k}: saved but not restored")
    elif k not in saved:
      out.append(f"{k}: restored but has no saved fingerprint")
    elif saved[k] != restored[k]:
      out.append(f"{k}: fingerprint {restored[k]} != saved {saved[k]}")
  return out
