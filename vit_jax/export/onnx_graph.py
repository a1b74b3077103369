"""ONNX from the JAX computation itself: the model's jaxpr, equation by equation, as ONNX nodes::

    session = onnxruntime.InferenceSession(PATH)
    logits, = session.run(["logits"], {"images": images})

No converter package: each JAX primitive the model families use has a rule here (``RULES``)
that writes the ONNX operators computing it (``dot_general`` as ``MatMul`` with the transposes
and reshapes around it, convolutions and max pooling in ONNX's NCHW between two transposes,
which onnxruntime's transpose optimiser cancels, ``erf`` as ``Erf``, ...). Equations whose
inputs are all parameters are evaluated once here (a weight-standardised kernel is stored
standardised, a transposed kernel transposed). A symbolic batch dimension stays symbolic: shapes
that depend on it are computed in the graph from the input's shape. A primitive without a rule
is refused with its name. Needs the ``onnx`` package (``requirements-dev.txt``); models past
protobuf's 2 GB limit keep their weights in ``PATH.data``. NaN differs where ONNX's operators
differ from XLA's: a maximum or argmax over a NaN, a NaN cast to an integer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from vit_jax.export import serving as serving_lib
from vit_jax.export.preprocessing import Preprocessing
from vit_jax.export.serving import ServingConfig

OPSET = 18
IR_VERSION = 9
_FOLD_LIMIT = 1 << 16  # fold an equation of constants unless it grows them past this many elements
_EXTERNAL_BYTES = 1 << 30

ELEMENTWISE_UNARY = {"exp": "Exp", "log": "Log", "erf": "Erf", "sqrt": "Sqrt", "logistic": "Sigmoid",
                     "sin": "Sin", "cos": "Cos", "tanh": "Tanh", "neg": "Neg", "abs": "Abs",
                     "floor": "Floor", "ceil": "Ceil", "sign": "Sign"}
ELEMENTWISE_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
                      "min": "Min", "pow": "Pow", "eq": "Equal", "lt": "Less", "gt": "Greater",
                      "le": "LessOrEqual", "ge": "GreaterOrEqual"}  # and, or, not: _logical
INLINED = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "remat", "checkpoint")
IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier")


class UnsupportedPrimitive(ValueError):
  """The jaxpr has an operation this converter has no ONNX rule for."""


@dataclasses.dataclass
class _Value:
  """One jaxpr variable in the graph: an ONNX tensor name and/or a constant known here.
  ``exact``: False when the tensor is only broadcastable to the variable's shape (a
  ``broadcast_in_dim`` feeding element-wise operations, which broadcast themselves)."""
  aval: Any
  name: str | None = None
  const: np.ndarray | None = None
  exact: bool = True


class GraphBuilder:
  """Collects nodes and initialisers while the jaxpr is walked."""

  def __init__(self):
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self.helper = helper
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self.symbols: dict[str, str] = {}  # a symbolic dimension's name -> int64 [1] tensor
    self._count = 0
    self._ints: dict[tuple[int, ...], str] = {}

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> list[str]:
    outputs = [self.fresh(op.lower()) for _ in range(n_out)]
    self.nodes.append(self.helper.make_node(op, list(inputs), outputs, **attrs))
    return outputs

  def op(self, op: str, *inputs: str, **attrs) -> str:
    return self.node(op, inputs, **attrs)[0]

  def constant(self, array: np.ndarray, hint: str = "const") -> str:
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    name = self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
    return name

  def ints(self, values: Sequence[int]) -> str:
    key = tuple(int(v) for v in values)
    if key not in self._ints:
      self._ints[key] = self.constant(np.asarray(key, np.int64), "ints")
    return self._ints[key]

  # Shapes with symbolic dimensions.
  def _linear(self, dim) -> tuple[str, int, int]:
    """A symbolic dimension as (symbol, k, c): k * symbol + c."""
    names = dim._get_vars()  # pylint: disable=protected-access
    if len(names) != 1:
      raise UnsupportedPrimitive(f"dimension {dim} depends on {sorted(names)}: only one symbolic "
                                 "dimension (the batch) is supported")
    symbol, = names
    c = int(dim._evaluate({symbol: 0}))  # pylint: disable=protected-access
    k = int(dim._evaluate({symbol: 1})) - c  # pylint: disable=protected-access
    if any(int(dim._evaluate({symbol: v})) != k * v + c  # pylint: disable=protected-access
           for v in (2, 3, 7, 8, 16, 31, 64, 1000, 4096)):
      raise UnsupportedPrimitive(f"dimension {dim} is not linear in {symbol}")
    return symbol, k, c

  def dim_tensor(self, dim) -> str:
    """An int64 [1] tensor holding ``dim`` (an int or a symbolic dimension) at run time."""
    if isinstance(dim, (int, np.integer)):
      return self.ints([int(dim)])
    symbol, k, c = self._linear(dim)
    if symbol not in self.symbols:
      raise UnsupportedPrimitive(f"symbolic dimension {symbol} is not a dimension of an input")
    t = self.symbols[symbol]
    if k != 1:
      t = self.op("Mul", t, self.ints([k]))
    if c:
      t = self.op("Add", t, self.ints([c]))
    return t

  def shape_tensor(self, shape: Sequence[Any], allow_minus_one: bool = False) -> str:
    """An int64 tensor holding ``shape``; ``allow_minus_one``: for Reshape, one symbolic
    dimension may be left as -1."""
    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, (int, np.integer))]
    if not symbolic:
      return self.ints([int(d) for d in shape])
    if allow_minus_one and len(symbolic) == 1:
      return self.ints([-1 if i == symbolic[0] else int(d) for i, d in enumerate(shape)])
    return self.op("Concat", *[self.dim_tensor(d) for d in shape], axis=0)


def _same(a, b) -> bool:
  """Whether two dimensions (ints or symbolic) are the same."""
  return str(a) == str(b)


def _same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
  return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _is_static(shape: Sequence[Any]) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


def _size(shape: Sequence[Any]) -> int:
  return math.prod(int(d) for d in shape) if _is_static(shape) else -1


class Converter:
  """Walks a closed jaxpr and writes its ONNX graph into a ``GraphBuilder``."""

  def __init__(self, builder: GraphBuilder):
    self.b = builder

  # Reading values.
  def name(self, value: _Value) -> str:
    """The ONNX tensor of ``value`` with the variable's exact shape."""
    self.loose(value)
    if not value.exact:
      value.name = self.b.op("Expand", value.name, self.b.shape_tensor(value.aval.shape))
      value.exact = True
    return value.name

  def loose(self, value: _Value) -> str:
    """The ONNX tensor of ``value``, possibly only broadcastable to its shape."""
    if value.name is None:
      value.name = self.b.constant(value.const)
      value.exact = value.const.shape == tuple(value.aval.shape)
    return value.name

  def run(self, jaxpr, consts: Sequence[Any], args: Sequence[_Value]) -> list[_Value]:
    env: dict[Any, _Value] = {}

    def read(atom) -> _Value:
      if isinstance(atom, jax.extend.core.Literal):
        return _Value(atom.aval, const=np.asarray(atom.val, atom.aval.dtype))
      return env[atom]

    for var, c in zip(jaxpr.constvars, consts):
      env[var] = c if isinstance(c, _Value) else _Value(var.aval, const=np.asarray(c))
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      outs = self.equation(eqn, ins)
      for var, out in zip(eqn.outvars, outs):
        env[var] = out
    return [read(a) for a in jaxpr.outvars]

  def equation(self, eqn, ins: list[_Value]) -> list[_Value]:
    prim = eqn.primitive.name
    if prim in INLINED:
      closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
      inner, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
      return self.run(inner, consts, ins)
    if prim in IDENTITY:
      return list(ins)
    if all(v.const is not None for v in ins) and self._foldable(eqn, ins):
      try:
        return self._fold(eqn, ins)
      except Exception:  # pylint: disable=broad-except  (not evaluable here: the rule decides)
        pass
    rule = RULES.get(prim)
    if rule is None:
      raise UnsupportedPrimitive(
          f"the JAX operation {prim!r} has no ONNX rule (vit_jax/export/onnx_graph.py): this "
          "model cannot be exported to ONNX; export it as stablehlo or savedmodel")
    try:
      outs = rule(self, eqn, ins)
    except (jax.errors.InconclusiveDimensionOperation, TypeError) as e:
      raise UnsupportedPrimitive(f"the JAX operation {prim!r} on symbolic shapes has no ONNX "
                                 f"rule here ({e}); export with a fixed --batch") from None
    return [o if isinstance(o, _Value) else _Value(v.aval, name=o)
            for o, v in zip(outs, eqn.outvars)]

  @staticmethod
  def _foldable(eqn, ins: list[_Value]) -> bool:
    if not all(_is_static(v.aval.shape) for v in eqn.outvars):
      return False
    grown = sum(_size(v.aval.shape) for v in eqn.outvars)
    return grown <= max(_FOLD_LIMIT, sum(v.const.size for v in ins)) or eqn.primitive.name == "broadcast_in_dim"

  def _fold(self, eqn, ins: list[_Value]) -> list[_Value]:
    if eqn.primitive.name == "broadcast_in_dim":  # keep the small array; consumers broadcast
      shape = _broadcast_shape(eqn.params["shape"], eqn.params["broadcast_dimensions"], ins[0].const.shape)
      return [_Value(eqn.outvars[0].aval, const=ins[0].const.reshape(shape), exact=False)]
    with jax.default_device(jax.devices("cpu")[0]):
      out = eqn.primitive.bind(*[np.broadcast_to(v.const, v.aval.shape) for v in ins],
                               **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Value(v.aval, const=np.asarray(o)) for v, o in zip(eqn.outvars, outs)]


def _broadcast_shape(shape, broadcast_dimensions, in_shape) -> list[int]:
  """``broadcast_in_dim``'s operand reshaped to the output's rank with ones elsewhere."""
  out = [1] * len(shape)
  for d, size in zip(broadcast_dimensions, in_shape):
    out[d] = size
  return out


# Rules: (converter, equation, input values) -> output ONNX names or _Values.
Rule = Callable[[Converter, Any, list], list]
RULES: dict[str, Rule] = {}


def rule(*names: str):
  def register(fn: Rule) -> Rule:
    for n in names:
      RULES[n] = fn
    return fn
  return register


def _elementwise(c: Converter, eqn, ins: list, build: Callable[..., str]) -> list:
  """An element-wise operation on the inputs as they are (broadcasting in ONNX): the result is
  exact when an input of the output's full shape is, else as loose as its inputs."""
  names = [c.loose(v) for v in ins]
  shape = tuple(eqn.outvars[0].aval.shape)
  exact = any(v.exact and _same_shape(v.aval.shape, shape) for v in ins)
  return [_Value(eqn.outvars[0].aval, name=build(*names), exact=exact)]


def _unary(onnx_op: str) -> Rule:
  return lambda c, eqn, ins: _elementwise(c, eqn, ins, lambda x: c.b.op(onnx_op, x))


def _binary(onnx_op: str) -> Rule:
  return lambda c, eqn, ins: _elementwise(c, eqn, ins, lambda *xs: c.b.op(onnx_op, *xs))


for _jax_op, _onnx_op in ELEMENTWISE_UNARY.items():
  RULES[_jax_op] = _unary(_onnx_op)
for _jax_op, _onnx_op in ELEMENTWISE_BINARY.items():
  RULES[_jax_op] = _binary(_onnx_op)


@rule("rsqrt")
def _rsqrt(c, eqn, ins):
  return _elementwise(c, eqn, ins, lambda x: c.b.op("Reciprocal", c.b.op("Sqrt", x)))


@rule("square")
def _square(c, eqn, ins):
  return _elementwise(c, eqn, ins, lambda x: c.b.op("Mul", x, x))


@rule("integer_pow")
def _integer_pow(c, eqn, ins):
  y = eqn.params["y"]
  if y == 2:
    return _elementwise(c, eqn, ins, lambda x: c.b.op("Mul", x, x))
  power = c.b.constant(np.asarray(y, ins[0].aval.dtype))
  return _elementwise(c, eqn, ins, lambda x: c.b.op("Pow", x, power))


@rule("dimension_as_value", "dim_as_value")
def _dim_as_value(c, eqn, ins):
  from onnx import helper  # pylint: disable=g-import-not-at-top
  value = c.b.op("Squeeze", c.b.dim_tensor(eqn.params["dim"]), c.b.ints([0]))
  dtype = np.dtype(eqn.outvars[0].aval.dtype)
  return [value if dtype == np.int64 else
          c.b.op("Cast", value, to=helper.np_dtype_to_tensor_dtype(dtype))]


def _logical(onnx_op: str) -> Rule:
  def convert(c, eqn, ins):
    if any(np.dtype(v.aval.dtype) != np.bool_ for v in ins):
      raise UnsupportedPrimitive(f"bitwise {eqn.primitive.name!r} on integers has no ONNX rule "
                                 "(ONNX's And, Or and Not take booleans)")
    return _elementwise(c, eqn, ins, lambda *xs: c.b.op(onnx_op, *xs))
  return convert


RULES["and"], RULES["or"], RULES["not"] = _logical("And"), _logical("Or"), _logical("Not")


@rule("ne")
def _ne(c, eqn, ins):
  return _elementwise(c, eqn, ins, lambda x, y: c.b.op("Not", c.b.op("Equal", x, y)))


@rule("convert_element_type")
def _convert(c, eqn, ins):
  from onnx import helper  # pylint: disable=g-import-not-at-top
  dtype = np.dtype(eqn.params["new_dtype"])
  if dtype == np.dtype(ins[0].aval.dtype):
    return [ins[0]]
  to = helper.np_dtype_to_tensor_dtype(dtype)
  return _elementwise(c, eqn, ins, lambda x: c.b.op("Cast", x, to=to))


@rule("select_n")
def _select_n(c, eqn, ins):
  dtype = np.dtype(ins[0].aval.dtype)

  def select(pred, *cases):
    if dtype == np.bool_:
      return c.b.op("Where", pred, cases[1], cases[0])
    out = cases[0]
    for i, case in enumerate(cases[1:], start=1):
      out = c.b.op("Where", c.b.op("Equal", pred, c.b.constant(np.asarray(i, dtype))), case, out)
    return out
  return _elementwise(c, eqn, ins, select)


@rule("clamp")
def _clamp(c, eqn, ins):
  return _elementwise(c, eqn, ins, lambda lo, x, hi: c.b.op("Min", c.b.op("Max", x, lo), hi))


@rule("reshape")
def _reshape(c, eqn, ins):
  if eqn.params.get("dimensions") is not None:
    raise UnsupportedPrimitive("reshape with dimensions has no ONNX rule")
  return [c.b.op("Reshape", c.name(ins[0]), c.b.shape_tensor(eqn.params["new_sizes"], True))]


@rule("squeeze")
def _squeeze(c, eqn, ins):
  return [c.b.op("Squeeze", c.name(ins[0]), c.b.ints(eqn.params["dimensions"]))]


@rule("expand_dims")
def _expand_dims(c, eqn, ins):
  return [c.b.op("Unsqueeze", c.name(ins[0]), c.b.ints(eqn.params["dimensions"]))]


@rule("transpose")
def _transpose(c, eqn, ins):
  return [c.b.op("Transpose", c.name(ins[0]), perm=list(eqn.params["permutation"]))]


@rule("broadcast_in_dim")
def _broadcast_in_dim(c, eqn, ins):
  x = ins[0]
  shape = _broadcast_shape(eqn.params["shape"], eqn.params["broadcast_dimensions"], x.aval.shape)
  name = c.loose(x) if len(shape) == x.aval.ndim else c.b.op(
      "Reshape", c.name(x), c.b.shape_tensor(shape, True))
  return [_Value(eqn.outvars[0].aval, name=name, exact=False)]


@rule("concatenate")
def _concatenate(c, eqn, ins):
  return [c.b.op("Concat", *[c.name(v) for v in ins], axis=int(eqn.params["dimension"]))]


@rule("stack")
def _stack(c, eqn, ins):
  axis = int(eqn.params["axis"])
  parts = [c.b.op("Unsqueeze", c.name(v), c.b.ints([axis])) for v in ins]
  return [c.b.op("Concat", *parts, axis=axis)]


@rule("split")
def _split(c, eqn, ins):
  sizes, axis = eqn.params["sizes"], int(eqn.params["axis"])
  return c.b.node("Split", [c.name(ins[0]), c.b.ints(sizes)], n_out=len(sizes), axis=axis)


@rule("slice")
def _slice(c, eqn, ins):
  x = ins[0]
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(starts)
  axes, s, e, st = [], [], [], []
  for axis, (start, limit, stride, dim) in enumerate(zip(starts, limits, strides, x.aval.shape)):
    if _same(start, 0) and stride == 1 and _same(limit, dim):
      continue
    if not _is_static((start, limit)):
      raise UnsupportedPrimitive("a slice with symbolic bounds has no ONNX rule")
    axes.append(axis), s.append(int(start)), e.append(int(limit)), st.append(int(stride))
  if not axes:
    return [ins[0]]
  return [c.b.op("Slice", c.name(x), c.b.ints(s), c.b.ints(e), c.b.ints(axes), c.b.ints(st))]


@rule("pad")
def _pad(c, eqn, ins):
  x, value = ins
  config = eqn.params["padding_config"]
  if any(interior for _, _, interior in config):
    raise UnsupportedPrimitive("pad with interior padding has no ONNX rule")
  out = c.name(x)
  if any(lo < 0 or hi < 0 for lo, hi, _ in config):
    raise UnsupportedPrimitive("pad with negative padding has no ONNX rule")
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  return [c.b.op("Pad", out, c.b.ints(pads), c.name(value), mode="constant")]


def _reduce(onnx_op: str) -> Rule:
  def convert(c, eqn, ins):
    if not eqn.params["axes"]:  # ONNX would reduce every axis
      return [ins[0]]
    return [c.b.op(onnx_op, c.name(ins[0]), c.b.ints(eqn.params["axes"]), keepdims=0)]
  return convert


RULES["reduce_sum"] = _reduce("ReduceSum")
RULES["reduce_max"] = _reduce("ReduceMax")
RULES["reduce_min"] = _reduce("ReduceMin")
RULES["reduce_prod"] = _reduce("ReduceProd")


@rule("argmax")
def _argmax(c, eqn, ins):
  axis, = eqn.params["axes"]
  out = c.b.op("ArgMax", c.name(ins[0]), axis=int(axis), keepdims=0)
  from onnx import helper  # pylint: disable=g-import-not-at-top
  dtype = np.dtype(eqn.params["index_dtype"])
  return [out if dtype == np.int64 else c.b.op("Cast", out, to=helper.np_dtype_to_tensor_dtype(dtype))]


@rule("cumsum")
def _cumsum(c, eqn, ins):
  return [c.b.op("CumSum", c.name(ins[0]), c.b.ints([int(eqn.params["axis"])]),
                 reverse=int(bool(eqn.params.get("reverse", False))))]


@rule("iota")
def _iota(c, eqn, ins):
  shape, dimension = eqn.params["shape"], int(eqn.params["dimension"])
  if not _is_static(shape):
    raise UnsupportedPrimitive("iota with a symbolic shape has no ONNX rule")
  values = np.arange(shape[dimension], dtype=eqn.params["dtype"])
  return [_Value(eqn.outvars[0].aval, const=np.broadcast_to(
      values.reshape([-1 if i == dimension else 1 for i in range(len(shape))]), shape).copy())]


@rule("gather")
def _gather(c, eqn, ins):
  """The gathers that indexing writes: ``x[:, i, j]`` (points), ``x[a:a+n]`` (a constant
  start) and ``jnp.take(x, idx, axis)``."""
  x, indices = ins
  dn, slice_sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  shape, axes = x.aval.shape, list(dn.start_index_map)
  full = lambda skip: all(_same(slice_sizes[i], shape[i]) for i in range(len(shape)) if i not in skip)
  unsupported = UnsupportedPrimitive(
      f"gather with {dn} and slice sizes {slice_sizes} has no ONNX rule (only x[:, i, j], "
      "x[a:a+n] and jnp.take along one axis)")
  if dn.operand_batching_dims or indices.aval.shape[-1:] != (len(axes),):
    raise unsupported
  index_shape = tuple(indices.aval.shape[:-1])
  const = None if indices.const is None else np.broadcast_to(indices.const, indices.aval.shape)
  fill = "FILL" in str(eqn.params.get("mode", ""))
  if fill:  # out-of-bounds indices give the fill value: only constant, in-bounds ones convert
    limits = np.array([int(shape[a]) - int(slice_sizes[a]) if _is_static((shape[a],)) else -1
                       for a in axes])
    starts = None if const is None else const.reshape(-1, len(axes))
    if starts is None or (starts < 0).any() or (starts > limits).any():
      raise UnsupportedPrimitive("a gather that fills out-of-bounds indices (jnp.take's default) "
                                 "has no ONNX rule unless its indices are constant and in bounds")
  if const is not None and not fill and all(_is_static((shape[a],)) for a in axes):
    # XLA clamps each start into [0, dimension - slice size] (ONNX would wrap or fail).
    high = np.array([int(shape[a]) - int(slice_sizes[a]) for a in axes])
    const = np.clip(const, 0, high).astype(const.dtype)
    indices = _Value(indices.aval, const=const)
  if not dn.collapsed_slice_dims and not index_shape and const is not None and full(axes):
    if any(not _is_static((shape[a],)) and int(i) != 0 for i, a in zip(const, axes)):
      raise UnsupportedPrimitive("a slice along a symbolic dimension has no ONNX rule unless "
                                 "it starts at 0")
    starts = [min(max(int(i), 0), int(shape[a]) - int(slice_sizes[a]))
              if _is_static((shape[a],)) else 0 for i, a in zip(const, axes)]
    ends = [s + int(slice_sizes[a]) for s, a in zip(starts, axes)]
    return [c.b.op("Slice", c.name(x), c.b.ints(starts), c.b.ints(ends), c.b.ints(axes))]
  if (sorted(dn.collapsed_slice_dims) != sorted(axes) or not full(axes)
      or any(slice_sizes[a] != 1 for a in axes)):
    raise unsupported
  others = [i for i in range(len(shape)) if i not in axes]
  if len(axes) == 1:  # Gather: [*shape[:axis], *index_shape, *shape[axis + 1:]]
    axis = axes[0]
    idx = c.b.op("Reshape", c.name(indices), c.b.shape_tensor(index_shape, True)) \
        if index_shape else c.b.op("Squeeze", c.name(indices), c.b.ints([0]))
    out = c.b.op("Gather", c.name(x), idx, axis=int(axis))
    layout = [("o", k) for k in range(axis)] + [("i", j) for j in range(len(index_shape))] + [
        ("o", k) for k in range(axis, len(others))]
  else:  # GatherND over the indexed axes moved first: [*index_shape, *others]
    moved = c.b.op("Transpose", c.name(x), perm=axes + others)
    idx = c.b.op("Cast", c.name(indices), to=7)  # int64
    out = c.b.op("GatherND", moved, idx)
    layout = [("i", j) for j in range(len(index_shape))] + [("o", k) for k in range(len(others))]
  offsets = iter(range(len(others)))
  batch = iter(range(len(index_shape)))
  want = [("o", next(offsets)) if p in dn.offset_dims else ("i", next(batch))
          for p in range(len(index_shape) + len(others))]
  perm = [layout.index(tag) for tag in want]
  if perm != list(range(len(perm))):
    out = c.b.op("Transpose", out, perm=perm)
  return [out]


def _transposed(c: Converter, value: _Value, perm: Sequence[int]) -> _Value:
  if list(perm) == list(range(len(perm))):
    return value
  shape = tuple(value.aval.shape[p] for p in perm)
  aval = value.aval.update(shape=shape)
  if value.const is not None and value.name is None:
    return _Value(aval, const=np.transpose(np.broadcast_to(value.const, value.aval.shape), perm))
  return _Value(aval, name=c.b.op("Transpose", c.name(value), perm=list(perm)))


def _reshaped(c: Converter, value: _Value, shape: Sequence[Any]) -> _Value:
  if tuple(shape) == tuple(value.aval.shape):
    return value
  aval = value.aval.update(shape=tuple(shape))
  if value.const is not None and value.name is None:
    return _Value(aval, const=np.broadcast_to(value.const, value.aval.shape).reshape(
        [int(d) for d in shape]))
  return _Value(aval, name=c.b.op("Reshape", c.name(value), c.b.shape_tensor(shape, True)))


def _prod(dims: Sequence[Any]):
  out = 1
  for d in dims:
    out = out * d
  return out


@rule("dot_general")
def _dot_general(c, eqn, ins):
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lshape, rshape = lhs.aval.shape, rhs.aval.shape
  lf = [i for i in range(len(lshape)) if i not in lc and i not in lb]
  rf = [i for i in range(len(rshape)) if i not in rc and i not in rb]
  batch = [lshape[i] for i in lb]
  lfree, rfree = [lshape[i] for i in lf], [rshape[i] for i in rf]
  k = _prod([lshape[i] for i in lc])
  if not lc:
    raise UnsupportedPrimitive("dot_general without contracting dimensions has no ONNX rule")
  out_dtype = np.dtype(eqn.outvars[0].aval.dtype)
  if np.dtype(lhs.aval.dtype) != out_dtype or np.dtype(rhs.aval.dtype) != out_dtype:
    raise UnsupportedPrimitive(f"dot_general of {lhs.aval.dtype} and {rhs.aval.dtype} into "
                               f"{out_dtype} has no ONNX rule (mixed precision)")
  left = _transposed(c, lhs, list(lb) + lf + list(lc))
  right = _transposed(c, rhs, list(rb) + list(rc) + rf)
  if not lb:  # [*lfree, K] @ [K, N]: MatMul broadcasts over the leading dimensions
    left = _reshaped(c, left, lfree + [k])
    right = _reshaped(c, right, [k, _prod(rfree)])
    out = _Value(eqn.outvars[0].aval.update(shape=tuple(lfree) + (_prod(rfree),)),
                 name=c.b.op("MatMul", c.name(left), c.name(right)))
  else:
    left = _reshaped(c, left, batch + [_prod(lfree), k])
    right = _reshaped(c, right, batch + [k, _prod(rfree)])
    out = _Value(eqn.outvars[0].aval.update(shape=tuple(batch) + (_prod(lfree), _prod(rfree))),
                 name=c.b.op("MatMul", c.name(left), c.name(right)))
  return [_reshaped(c, out, eqn.outvars[0].aval.shape)]


@rule("conv_general_dilated")
def _conv(c, eqn, ins):
  lhs, rhs = ins
  p = eqn.params
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise UnsupportedPrimitive("transposed or batch-grouped convolution has no ONNX rule")
  if any(lo < 0 or hi < 0 for lo, hi in p["padding"]):
    raise UnsupportedPrimitive("convolution with negative padding has no ONNX rule")
  x = _transposed(c, lhs, dn.lhs_spec)
  w = _transposed(c, rhs, dn.rhs_spec)
  pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
  kernel = [int(w.aval.shape[i]) for i in range(2, w.aval.ndim)]
  y = c.b.op("Conv", c.name(x), c.name(w), kernel_shape=kernel, strides=list(p["window_strides"]),
             pads=pads, dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
  out_spec = list(dn.out_spec)
  return [c.b.op("Transpose", y, perm=[out_spec.index(j) for j in range(len(out_spec))])]


@rule("reduce_window_max")
def _max_pool(c, eqn, ins):
  x = ins[0]
  p = eqn.params
  rank = x.aval.ndim
  window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  if rank < 3 or any(window[i] != 1 or strides[i] != 1 or tuple(padding[i]) != (0, 0)
                     for i in (0, rank - 1)):
    raise UnsupportedPrimitive("max pooling over the batch or channel dimension has no ONNX rule")
  if any(d != 1 for d in p["base_dilation"]):
    raise UnsupportedPrimitive("max pooling with base dilation has no ONNX rule")
  to_nchw = [0, rank - 1] + list(range(1, rank - 1))
  spatial = list(range(1, rank - 1))
  y = c.b.op("MaxPool", c.name(_transposed(c, x, to_nchw)),
             kernel_shape=[int(window[i]) for i in spatial],
             strides=[int(strides[i]) for i in spatial],
             pads=[int(padding[i][0]) for i in spatial] + [int(padding[i][1]) for i in spatial],
             dilations=[int(p["window_dilation"][i]) for i in spatial])
  return [c.b.op("Transpose", y, perm=[to_nchw.index(j) for j in range(rank)])]


def build_model(fn: Callable[..., dict[str, jax.Array]], specs: Sequence[jax.ShapeDtypeStruct],
                input_names: Sequence[str]):
  """The ``onnx.ModelProto`` computing ``fn(*inputs)`` (a dict of named outputs)."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  closed = jax.make_jaxpr(fn)(*specs)
  if _computes_in(closed.jaxpr, np.dtype(jax.numpy.bfloat16)):
    raise ValueError("the model computes in bfloat16, which onnxruntime's CPU kernels do not "
                     "implement (MatMul, Expand, ...): export it computing in float32 "
                     "(export.py --dtype float32; the parameters are float32 either way)")
  out_tree = jax.tree_util.tree_structure(jax.eval_shape(fn, *specs))
  b = GraphBuilder()
  inputs, args = [], []
  for name, spec in zip(input_names, specs):
    dims = [d if isinstance(d, (int, np.integer)) else str(d) for d in spec.shape]
    inputs.append(helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), dims))
    for axis, d in enumerate(spec.shape):
      if not isinstance(d, (int, np.integer)) and str(d) not in b.symbols:
        b.symbols[str(d)] = b.op("Shape", name, start=axis, end=axis + 1)
    args.append(_Value(closed.jaxpr.invars[len(args)].aval, name=name))
  converter = Converter(b)
  results = converter.run(closed.jaxpr, closed.consts, args)
  keys = ["_".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(
      jax.tree_util.tree_unflatten(out_tree, range(len(results))))[0]]
  outputs = []
  for key, value, var in zip(keys, results, closed.jaxpr.outvars):
    b.nodes.append(helper.make_node("Identity", [converter.name(value)], [key]))
    dims = [d if isinstance(d, (int, np.integer)) else str(d) for d in var.aval.shape]
    outputs.append(helper.make_tensor_value_info(
        key, helper.np_dtype_to_tensor_dtype(np.dtype(var.aval.dtype)), dims))
  graph = helper.make_graph(b.nodes, "vit_jax", inputs, outputs, initializer=b.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="vit_jax")
  model.ir_version = IR_VERSION
  onnx.checker.check_model(model) if model.ByteSize() < _EXTERNAL_BYTES else None
  return model


def _computes_in(jaxpr, dtype: np.dtype) -> bool:
  """Whether any value of ``jaxpr`` (or of a jaxpr inside it) has ``dtype``."""
  for eqn in jaxpr.eqns:
    if any(np.dtype(v.aval.dtype) == dtype for v in eqn.outvars if hasattr(v.aval, "dtype")):
      return True
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if isinstance(inner, jax.extend.core.Jaxpr) and _computes_in(inner, dtype):
        return True
  return False


def op_types(model) -> list[str]:
  """The ONNX operator types of ``model``'s graph, sorted."""
  return sorted({n.op_type for n in model.graph.node})


def export_onnx(model: nnx.Module, serving: ServingConfig, out: str, *,
                batch: int | None = None, preprocessing: Preprocessing | None = None) -> list[str]:
  """Writes the ONNX model ``out`` (and ``out.data`` when past 1 GB) and ``out.json``; returns
  the paths written. ``batch=None``: a symbolic batch dimension named ``b``."""
  import onnx  # pylint: disable=g-import-not-at-top
  fn = serving_lib.serving_function(model, serving, preprocessing)
  specs = serving_lib.input_specs(serving, batch, preprocessing)
  proto = build_model(fn, specs, serving_lib.INPUT_NAMES[:len(specs)])
  out = os.fspath(out)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  written = [out]
  if sum(t.ByteSize() for t in proto.graph.initializer) >= _EXTERNAL_BYTES:
    data = os.path.basename(out) + ".data"
    onnx.save_model(proto, out, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    written.append(out + ".data")
  else:
    onnx.save_model(proto, out)
  outputs = jax.eval_shape(fn, *specs)
  sidecar = serving_lib.describe(serving, "onnx", specs, outputs, preprocessing)
  sidecar["opset"] = OPSET
  sidecar["operators"] = op_types(proto)
  with open(out + ".json", "w") as f:
    json.dump(sidecar, f, indent=2)
    f.write("\n")
  return written + [out + ".json"]
