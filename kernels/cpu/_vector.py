"""LLVM IR building blocks of the cpu backend's SIMD intrinsics.

Every micro-kernel (``_microkernels``, and the Winograd transforms) is a Numba intrinsic that
emits vector IR directly. The idioms they share live here, once:

* ``VBYTES`` and ``lanes`` -- the SIMD width, chosen once from the compilation target;
* ``vector_helpers`` -- one small object per code generation: the vector type of a dtype,
  full-vector loads and stores at element offsets, broadcasts, ``llvm.fmuladd``, the
  switch of a unit, constant lane masks, the intrinsic's arguments by name and a dispatch
  over compile-time cases of a run-time value;
* ``literal_int`` -- the check that an argument is a compile-time constant, as a TypingError
  that says which and why;
* ``counted_loop`` and ``transpose_block`` -- a loop with carried values, a register transpose.

Caution: Numba's on-disk cache of a kernel is invalidated by changes to the kernel's own file
only, not by changes here; clear ``__pycache__`` after editing this module.
"""

from __future__ import annotations

import llvmlite.binding as _llb
import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils, errors
from numba.np.arrayobj import make_array

I1, I32, I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)


def _has_avx512():
    """Whether Numba's compilation target has AVX-512F (honours NUMBA_CPU_NAME/FEATURES)."""
    if numba.config.CPU_FEATURES:
        return "+avx512f" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME:
        return False  # a named (e.g. generic) target: assume no AVX-512
    return bool(_llb.get_host_cpu_features().get("avx512f", False))


# Bytes per SIMD register used by the micro-kernels: 64 on AVX-512 targets, else 32 (LLVM
# splits the vectors on narrower machines, which stays correct). Numba's on-disk cache is keyed
# by CPU name and features, so a cache built on another CPU is not reused.
VBYTES = 64 if _has_avx512() else 32


def lanes(dtype):
    """Elements per SIMD vector for this dtype."""
    return VBYTES // np.dtype(dtype).itemsize


def literal_int(intrinsic, name, ty, why):
    """The value of the compile-time integer (or boolean) argument ``name`` of type ``ty``.

    Raises a TypingError naming the intrinsic, the argument and ``why`` it must be a constant
    where ``ty`` is a run-time type (Numba would otherwise report only "No implementation").
    """
    if isinstance(ty, (types.IntegerLiteral, types.BooleanLiteral)):
        return int(ty.literal_value)
    raise errors.TypingError(
        f"{intrinsic}: argument {name} must be a compile-time integer constant ({why}); got "
        f"the run-time type {ty}. Pass a literal, a module-level constant, or a value that "
        "Numba folds to one.")


def literal_ints(intrinsic, name, ty, why):
    """The values of a tuple of compile-time integers (a table such as ``PIX``), or a
    TypingError as ``literal_int``'s."""
    if isinstance(ty, types.BaseTuple) and all(isinstance(t, types.IntegerLiteral) for t in ty):
        return tuple(int(t.literal_value) for t in ty)
    raise errors.TypingError(
        f"{intrinsic}: argument {name} must be a tuple of compile-time integers ({why}); got "
        f"{ty}. Pass a module-level tuple such as PIX.")


_FLOAT_BITS = {"float": 32, "double": 64}


class VectorIR:
    """The IR idioms of one intrinsic's code generation at full vectors of one dtype.

    Attributes: ``context``, ``builder``, ``dtype`` (the Numba dtype), ``elt`` (its IR
    type), ``size`` (its bytes), ``vl`` (lanes), ``vty`` (the vector type), ``ity`` (``vl`` x
    int32, for positions and shuffle masks), ``zero`` (the float zero vector).
    """

    def __init__(self, context, builder, dtype, signature=None, args=None, vl=None):
        self.context, self.builder = context, builder
        self.dtype = dtype
        self.elt = context.get_value_type(dtype)
        self.size = context.get_abi_sizeof(self.elt)
        self.vl = vl or VBYTES // self.size
        self.vty = ir.VectorType(self.elt, self.vl)
        self.ity = ir.VectorType(I32, self.vl)
        self._signature, self._args = signature, args
        self._index = ({name: i for i, name in enumerate(signature.pysig.parameters)}
                       if signature is not None else {})

    def with_lanes(self, vl):
        """The same helpers on vectors of ``vl`` lanes (e.g. a VL x VL register transpose)."""
        return VectorIR(self.context, self.builder, self.dtype, self._signature, self._args, vl)

    # -- the intrinsic's arguments, by name ---------------------------------------------------

    def argtype(self, name):
        """The Numba type of argument ``name``."""
        return self._signature.args[self._index[name]]

    def arg(self, name, as_type=None):
        """Argument ``name``'s value, converted to the Numba type ``as_type`` if given."""
        val = self._args[self._index[name]]
        if as_type is None:
            return val
        return self.context.cast(self.builder, val, self.argtype(name), as_type)

    def int64(self, *names):
        """Arguments (offsets, strides, counts) as int64 values: one, or a list for several."""
        vals = [self.arg(name, types.int64) for name in names]
        return vals[0] if len(vals) == 1 else vals

    def data(self, *names):
        """The data pointers of the 1-d array arguments: one, or a list for several."""
        ptrs = [make_array(self.argtype(name))(self.context, self.builder, self.arg(name)).data
                for name in names]
        return ptrs[0] if len(ptrs) == 1 else ptrs

    # -- memory --------------------------------------------------------------------------------

    def vptr(self, ptr, index, vty=None):
        """A pointer to the vector (of ``vty``, default the float vector) at element ``index``."""
        addr = self.builder.gep(ptr, [index], inbounds=True)
        return self.builder.bitcast(addr, (vty or self.vty).as_pointer())

    def vload(self, ptr, index, vty=None):
        """The vector at element ``index`` of ``ptr`` (element-aligned)."""
        vty = vty or self.vty
        return self.builder.load(self.vptr(ptr, index, vty), align=self._align(vty))

    def vstore(self, val, ptr, index):
        """Store the vector ``val`` at element ``index`` of ``ptr`` (element-aligned)."""
        self.builder.store(val, self.vptr(ptr, index, val.type), align=self._align(val.type))

    def load(self, ptr, index):
        """The scalar at element ``index`` of ``ptr``."""
        return self.builder.load(self.builder.gep(ptr, [index], inbounds=True))

    def _align(self, vty):
        return self.context.get_abi_sizeof(vty.element)  # element-aligned, as Numba's arrays

    # -- values --------------------------------------------------------------------------------

    @property
    def zero(self):
        """The float vector of zeros."""
        return ir.Constant(self.vty, [0.0] * self.vl)

    def mask(self, values):
        """A constant int32 vector (shuffle masks, lane numbers)."""
        return ir.Constant(ir.VectorType(I32, len(values)), list(values))

    def splat(self, scalar):
        """``scalar`` in every lane (a float or an integer vector, by the scalar's type)."""
        vty = ir.VectorType(scalar.type, self.vl)
        undef = ir.Constant(vty, ir.Undefined)
        one = self.builder.insert_element(undef, scalar, I32(0))
        return self.builder.shuffle_vector(one, undef, self.mask([0] * self.vl))

    def fmuladd(self, a, b, c):
        """``a * b + c`` by ``llvm.fmuladd`` (fused where the target has FMA), for float
        vectors or scalars."""
        ty = a.type
        if isinstance(ty, ir.VectorType):
            name = "llvm.fmuladd.v%df%d" % (ty.count, _FLOAT_BITS[str(ty.element)])
        else:
            name = "llvm.fmuladd.f%d" % _FLOAT_BITS[str(ty)]
        fn = cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(ty, [ty] * 3),
                                            name)
        return self.builder.call(fn, [a, b, c])

    def switch(self, leak):
        """The unit switch for the scalar slope ``leak``, as a function of a vector ``z``:
        ``z`` where ``z > 0`` or ``z`` is NaN, else ``leak * z``; the plain ReLU (``leak ==
        0``) gives exactly 0 there (so -inf -> 0, not 0 * -inf = NaN)."""
        builder = self.builder
        leakv = self.splat(leak)
        zero = self.zero
        leak_zero = builder.fcmp_ordered("==", leak, ir.Constant(leak.type, 0.0))

        def apply(z):
            keep = builder.or_(builder.fcmp_ordered(">", z, zero),
                               builder.fcmp_unordered("uno", z, z))
            other = builder.select(leak_zero, zero, builder.fmul(z, leakv))
            return builder.select(keep, z, other)

        return apply

    # -- control -------------------------------------------------------------------------------

    def dispatch(self, choices, emit, chosen=()):
        """(IR) Emit ``emit(*constants)`` once per combination of compile-time ``cases``,
        under a ladder on run-time values: ``choices`` is a list of ``(value, cases,
        default)``, outermost first, each ``value`` an i64 tested ``== case`` in order; with
        ``default`` the last case takes every other value (as an ``else``), without it
        other values emit nothing. A choice whose ``value`` is None has one, constant case."""
        if not choices:
            emit(*chosen)
            return
        (value, cases, default), rest = choices[0], choices[1:]
        if value is None:
            self.dispatch(rest, emit, chosen + (cases[0],))
            return
        builder = self.builder
        done = builder.append_basic_block("case.done")
        for i, case in enumerate(cases):
            if default and i == len(cases) - 1:
                self.dispatch(rest, emit, chosen + (case,))
                break
            this = builder.append_basic_block("case.%d" % case)
            other = builder.append_basic_block("case.not%d" % case)
            builder.cbranch(builder.icmp_signed("==", value, I64(case)), this, other)
            builder.position_at_end(this)
            self.dispatch(rest, emit, chosen + (case,))
            builder.branch(done)
            builder.position_at_end(other)
        builder.branch(done)
        builder.position_at_end(done)


def vector_helpers(context, builder, dtype, signature=None, args=None, vl=None):
    """(IR) The ``VectorIR`` of one code generation: vectors of ``dtype`` (``vl`` lanes,
    default a full SIMD register) and, given the intrinsic's ``signature`` and ``args``, its
    arguments by name."""
    return VectorIR(context, builder, dtype, signature, args, vl)


def counted_loop(builder, name, start, stop, step, init, body):
    """(IR) ``for t in range(start, stop, step)`` over i64 (``step`` a positive int) with
    loop-carried values: ``body(t, values)`` emits one iteration at the builder and returns
    the next values (the types of ``init``). Leaves the builder after the loop and returns
    (the values after the loop, the final t)."""
    entry = builder.block
    head = builder.append_basic_block(name + ".head")
    blk = builder.append_basic_block(name + ".body")
    done = builder.append_basic_block(name + ".done")
    builder.branch(head)
    builder.position_at_end(head)
    t = builder.phi(I64)
    t.add_incoming(start, entry)
    carried = []
    for val in init:
        phi = builder.phi(val.type)
        phi.add_incoming(val, entry)
        carried.append(phi)
    builder.cbranch(builder.icmp_signed("<", t, stop), blk, done)
    builder.position_at_end(blk)
    new = body(t, carried)
    latch = builder.block  # the body may have added blocks
    t.add_incoming(builder.add(t, I64(step)), latch)
    for phi, val in zip(carried, new):
        phi.add_incoming(val, latch)
    builder.branch(head)
    builder.position_at_end(done)
    return carried, t


def transpose_block(builder, rows, vl):
    """(IR) The VL x VL transpose of VL vectors: log2(VL) stages of block swaps."""
    ity = ir.VectorType(I32, vl)
    width = 1
    while width < vl:  # swap the off-diagonal width x width blocks
        new = list(rows)
        for i in range(vl):
            if (i // width) % 2 == 0:
                j = i + width
                low = [l if (l // width) % 2 == 0 else vl + l - width for l in range(vl)]
                high = [l + width if (l // width) % 2 == 0 else vl + l for l in range(vl)]
                new[i] = builder.shuffle_vector(rows[i], rows[j], ir.Constant(ity, low))
                new[j] = builder.shuffle_vector(rows[i], rows[j], ir.Constant(ity, high))
        rows, width = new, 2 * width
    return rows
