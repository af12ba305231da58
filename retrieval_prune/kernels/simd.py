"""LLVM-level helpers shared by the kernels: popcount and small fixed-width SIMD vectors.

``popcount(x)``
    LLVM ``ctpop`` on an integer (``np.bitwise_count`` is rejected inside ``@njit`` in
    Numba 0.68). In a loop LLVM vectorises it to ``VPOPCNTQ`` where AVX-512 VPOPCNTDQ
    exists.

``Vec`` and the ``v*`` intrinsics
    A Numba type for an LLVM vector value (``<16 x float>``, ``<32 x i16>``, ...), kept in
    registers, plus the handful of operations the kernels need (load, store, broadcast,
    add, max, fma, xor, popcount, horizontal sums). They let a kernel pick the
    vectorisation axis itself (e.g. query tokens across lanes) where LLVM's loop
    vectoriser would pick another one, without leaving Numba. The vectors are plain LLVM
    IR, so they lower to AVX-512 here and to pairs of AVX2 registers elsewhere.

The lane count is a compile-time literal: ``vload(arr, i, 16)`` loads
``arr.flat[i:i+16]`` of a C-contiguous array as ``Vec(arr.dtype, 16)``. Indexing is
unchecked, like the rest of the kernels (the wrappers validate).

``vdpbusd`` (AVX-512 VNNI) and ``vmaddwd``/``vmaddubsw`` (AVX2) are the
exceptions to "plain LLVM IR": x86 intrinsics, compiled only where ``HAS_VNNI`` /
``HAS_AVX2`` say the host has them; their callers keep a portable kernel that computes
the same integers.

Instruction-set variants
------------------------
``ISA`` (chosen once, at import) names the register blocking the float kernels use:
``ISA_AVX512`` (32 vector registers of 16 float lanes: 8 accumulators of 16 lanes) or
``ISA_AVX2`` (16 registers of 8 lanes: a 16-lane accumulator is two registers, so the
micro-kernels keep 6 x 16 lanes = 12 registers). Both are plain LLVM IR and run on any
x86-64 CPU (they only differ in speed); the packed-query layout (16 lanes) is the same
for both. The kernels take the variant as an argument whose default is ``ISA``, so a
cached kernel compiled for one variant is never reused for the other (the default value
is part of Numba's signature) and tests can run both variants in one process.
``RETRIEVAL_PRUNE_ISA=avx2|avx512`` forces a variant (e.g. to measure the AVX2 kernels on
an AVX-512 machine); forcing ``avx2`` also turns the AVX-512 VNNI table off.
"""

import os

from llvmlite import binding as _llvm
from llvmlite import ir
from numba import config as _numba_config
from numba import errors, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = [
    "popcount",
    "Vec",
    "vload",
    "vstore",
    "vbroadcast",
    "vsplat",
    "vadd",
    "vmax",
    "vmin",
    "vfma",
    "vcvt_f32",
    "vconcat",
    "vxor",
    "vpopcount",
    "vhadd",
    "vhmin",
    "vlt_any",
    "vpairadd",
    "prefetch",
    "load_u64",
    "load_index",
    "HAS_VNNI",
    "HAS_AVX2",
    "ISA",
    "ISA_AVX2",
    "ISA_AVX512",
    "ISA_NAME",
    "cpu_features",
    "vload_i32",
    "vbroadcast_i32",
    "vdpbusd",
    "vbitcast",
    "vmaddubsw",
    "vmaddwd",
    "vbroadcast_i16x2",
    "vsadbw",
    "vload_i8_i16",
]


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an integer (LLVM ``ctpop``), as int64."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.int64(x)

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty]), f"llvm.ctpop.i{ty.width}"
        )
        r = builder.call(fn, [args[0]])
        if ty.width < 64:
            return builder.zext(r, ir.IntType(64))
        return r

    return sig, codegen


# --------------------------------------------------------------------------------------
# vector type
# --------------------------------------------------------------------------------------
class Vec(types.Type):
    """``lanes`` values of the scalar Numba type ``dtype`` in one LLVM vector."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = int(lanes)
        super().__init__(name=f"Vec({dtype}x{self.lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))


def _lanes(lanes):
    if not isinstance(lanes, types.IntegerLiteral):
        raise errors.RequireLiteralValue("the lane count must be a compile-time constant")
    return lanes.literal_value


def _ptr(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.gep(a.data, [idx], inbounds=True)


def _splat(builder, x, lanes):
    vt = ir.VectorType(x.type, lanes)
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(i32, 0))
    mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), mask)


def _is_float(vt):
    return isinstance(vt.dtype, types.Float)


def _llvm_suffix(v):
    """LLVM overload suffix of a vector value, e.g. ``v16f32`` or ``v8i64``."""
    elem = v.type.element
    if isinstance(elem, ir.FloatType):
        name = "f32"
    elif isinstance(elem, ir.DoubleType):
        name = "f64"
    else:
        name = f"i{elem.width}"
    return f"v{v.type.count}{name}"


@intrinsic
def vload(typingctx, arr, idx, lanes):
    """``arr.flat[idx:idx+lanes]`` as a vector (C-contiguous ``arr``)."""
    n = _lanes(lanes)
    vt = Vec(arr.dtype, n)
    sig = vt(arr, idx, lanes)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        lt = context.get_value_type(sig.return_type)
        return builder.load(builder.bitcast(p, lt.as_pointer()), align=1)

    return sig, codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """Store vector ``v`` at ``arr.flat[idx:idx+lanes]``."""
    sig = types.void(arr, idx, v)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vbroadcast(typingctx, arr, idx, lanes):
    """``arr.flat[idx]`` in every lane."""
    n = _lanes(lanes)
    sig = Vec(arr.dtype, n)(arr, idx, lanes)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(p), n)

    return sig, codegen


def _check_f32_source(arr, name):
    dt = arr.dtype
    if not (dt == types.float32 or (isinstance(dt, types.Integer) and dt.signed)):
        raise errors.TypingError(f"{name} reads float32 or signed integers, got {dt}")


@intrinsic
def vload_f32(typingctx, arr, idx, lanes):
    """``arr.flat[idx:idx+lanes]`` as a float32 vector: a float32 array is loaded as it is,
    a signed integer one (int8 codebooks) with one narrow load and one conversion
    (``vpmovsx`` + ``vcvtdq2ps``), so one kernel body serves both codebook precisions."""
    n = _lanes(lanes)
    _check_f32_source(arr, "vload_f32")
    sig = Vec(types.float32, n)(arr, idx, lanes)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        it = ir.VectorType(context.get_value_type(sig.args[0].dtype), n)
        v = builder.load(builder.bitcast(p, it.as_pointer()), align=1)
        if sig.args[0].dtype == types.float32:
            return v
        return builder.sitofp(v, ir.VectorType(ir.FloatType(), n))

    return sig, codegen


@intrinsic
def vbroadcast_f32(typingctx, arr, idx, lanes):
    """``float32(arr.flat[idx])`` in every lane (float32 or signed integer ``arr``)."""
    n = _lanes(lanes)
    _check_f32_source(arr, "vbroadcast_f32")
    sig = Vec(types.float32, n)(arr, idx, lanes)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        x = builder.load(p)
        if sig.args[0].dtype != types.float32:
            x = builder.sitofp(x, ir.FloatType())
        return _splat(builder, x, n)

    return sig, codegen


@intrinsic
def vsplat(typingctx, x, lanes):
    """Scalar ``x`` in every lane (the vector has ``x``'s type)."""
    n = _lanes(lanes)
    sig = Vec(x, n)(x, lanes)

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], n)

    return sig, codegen


def _binary(op):
    def impl(typingctx, a, b):
        if not isinstance(a, Vec) or a != b:
            return None
        sig = a(a, b)

        def codegen(context, builder, sig, args):
            return op(builder, sig.args[0], *args)

        return sig, codegen

    return impl


def _add(builder, vt, x, y):
    return builder.fadd(x, y) if _is_float(vt) else builder.add(x, y)


def _cmp_select(pred_float, pred_signed, pred_unsigned):
    def op(builder, vt, x, y):
        if _is_float(vt):
            c = builder.fcmp_ordered(pred_float, x, y)
        elif vt.dtype.signed:
            c = builder.icmp_signed(pred_signed, x, y)
        else:
            c = builder.icmp_unsigned(pred_unsigned, x, y)
        return builder.select(c, x, y)

    return op


vadd = intrinsic(_binary(_add))
vadd.__doc__ = "Lane-wise ``a + b`` (integers wrap)."
vmax = intrinsic(_binary(_cmp_select(">", ">", ">")))
vmax.__doc__ = "Lane-wise maximum (signedness from the element type)."
vmin = intrinsic(_binary(_cmp_select("<", "<", "<")))
vmin.__doc__ = "Lane-wise minimum (signedness from the element type)."
vxor = intrinsic(_binary(lambda builder, vt, x, y: builder.xor(x, y)))
vxor.__doc__ = "Lane-wise bitwise xor (integer vectors)."


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane-wise, fused (float vectors)."""
    if not (isinstance(a, Vec) and _is_float(a) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty, ty, ty]), f"llvm.fma.{_llvm_suffix(args[0])}"
        )
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def vcvt_f32(typingctx, a):
    """A signed integer vector converted lane-wise to float32 (``vcvtdq2ps``)."""
    if not (isinstance(a, Vec) and isinstance(a.dtype, types.Integer) and a.dtype.signed):
        return None
    sig = Vec(types.float32, a.lanes)(a)

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], ir.VectorType(ir.FloatType(), sig.args[0].lanes))

    return sig, codegen


@intrinsic
def vconcat(typingctx, a, b):
    """The lanes of ``a`` followed by those of ``b``: one vector of twice the lanes."""
    if not (isinstance(a, Vec) and a == b):
        return None
    sig = Vec(a.dtype, 2 * a.lanes)(a, b)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        n = 2 * sig.args[0].lanes
        mask = ir.Constant(ir.VectorType(i32, n), list(range(n)))
        return builder.shuffle_vector(args[0], args[1], mask)

    return sig, codegen


@intrinsic
def vpopcount(typingctx, a):
    """Lane-wise popcount of an integer vector (``VPOPCNTQ``/``VPOPCNTD`` with AVX-512)."""
    if not (isinstance(a, Vec) and isinstance(a.dtype, types.Integer)):
        return None
    sig = a(a)

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty]), f"llvm.ctpop.{_llvm_suffix(args[0])}"
        )
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def vhadd(typingctx, a):
    """Sum of all lanes: float vectors -> float64, integer vectors -> int64 (widened first,
    so ``uint8``/``int16`` lanes cannot overflow)."""
    if not isinstance(a, Vec):
        return None
    ret = types.float64 if _is_float(a) else types.int64
    sig = ret(a)

    def codegen(context, builder, sig, args):
        v = args[0]
        n = v.type.count
        if _is_float(sig.args[0]):
            wide = builder.fpext(v, ir.VectorType(ir.DoubleType(), n))
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), wide.type]),
                f"llvm.vector.reduce.fadd.v{n}f64",
            )
            return builder.call(fn, [ir.Constant(ir.DoubleType(), 0.0), wide])
        # widen narrow lanes first: 8/16-bit to 32 bits (n * 65535 fits), 32 to 64 bits
        width = v.type.element.width
        if width < 64:
            ext = builder.sext if sig.args[0].dtype.signed else builder.zext
            v = ext(v, ir.VectorType(ir.IntType(32 if width < 32 else 64), n))
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(v.type.element, [v.type]),
            f"llvm.vector.reduce.add.{_llvm_suffix(v)}",
        )
        r = builder.call(fn, [v])
        if r.type.width < 64:
            r = builder.sext(r, ir.IntType(64))  # a sum of widened lanes is in range
        return r

    return sig, codegen


@intrinsic
def vhmin(typingctx, a):
    """Minimum over all lanes of an integer vector, as int64."""
    if not (isinstance(a, Vec) and isinstance(a.dtype, types.Integer)):
        return None
    sig = types.int64(a)

    def codegen(context, builder, sig, args):
        v = args[0]
        signed = sig.args[0].dtype.signed
        red = "smin" if signed else "umin"
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(v.type.element, [v.type]),
            f"llvm.vector.reduce.{red}.{_llvm_suffix(v)}",
        )
        r = builder.call(fn, [v])
        if r.type.width < 64:
            r = builder.sext(r, ir.IntType(64)) if signed else builder.zext(r, ir.IntType(64))
        return r

    return sig, codegen


@intrinsic
def vlt_any(typingctx, a, b):
    """True if any lane of ``a`` is below the same lane of ``b``."""
    if not (isinstance(a, Vec) and a == b):
        return None
    sig = types.boolean(a, b)

    def codegen(context, builder, sig, args):
        pred = "<"
        if _is_float(sig.args[0]):
            c = builder.fcmp_ordered(pred, args[0], args[1])
        elif sig.args[0].dtype.signed:
            c = builder.icmp_signed(pred, args[0], args[1])
        else:
            c = builder.icmp_unsigned(pred, args[0], args[1])
        n = c.type.count
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.IntType(1), [c.type]),
            f"llvm.vector.reduce.or.v{n}i1",
        )
        return builder.call(fn, [c])

    return sig, codegen


@intrinsic
def vpairadd(typingctx, a, b):
    """Sums of adjacent lanes: ``[a0+a1, a2+a3, ..., b0+b1, b2+b3, ...]`` (same type).

    Deinterleaves pairs, e.g. the two 64-bit halves of 128-bit codes loaded 4 at a time.
    """
    if not (isinstance(a, Vec) and a == b and a.lanes % 2 == 0):
        return None
    sig = a(a, b)

    def codegen(context, builder, sig, args):
        n = sig.args[0].lanes
        i32 = ir.IntType(32)
        even = ir.Constant(ir.VectorType(i32, n), list(range(0, 2 * n, 2)))
        odd = ir.Constant(ir.VectorType(i32, n), list(range(1, 2 * n, 2)))
        x = builder.shuffle_vector(args[0], args[1], even)
        y = builder.shuffle_vector(args[0], args[1], odd)
        return builder.fadd(x, y) if _is_float(sig.args[0]) else builder.add(x, y)

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Software prefetch of the cache line holding ``arr.flat[idx]`` (read, keep in all
    cache levels). Never faults; ``idx`` should still lie inside the array."""
    sig = types.void(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(
            fn,
            [
                builder.bitcast(p, i8p),
                ir.Constant(i32, 0),
                ir.Constant(i32, 3),
                ir.Constant(i32, 1),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_index(typingctx, arr, idx):
    """``arr.flat[idx]`` of an unsigned integer array (codes) as int64, unchecked: no
    negative-index fix-up (Numba adds a compare and select per ``arr[j]`` where it cannot
    prove ``j >= 0``)."""
    if not (isinstance(arr.dtype, types.Integer) and not arr.dtype.signed):
        return None
    sig = types.int64(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.zext(builder.load(p), ir.IntType(64))

    return sig, codegen


@intrinsic
def load_u64(typingctx, arr, idx):
    """8 bytes at element ``idx`` of ``arr`` as a little-endian uint64, unchecked: bytes
    ``idx .. idx+7`` of a uint8 array (any alignment; one load instead of eight byte
    loads), or element ``idx`` of a uint64 array (no negative-index fix-up)."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, ir.IntType(64).as_pointer()), align=1)

    return sig, codegen


# --------------------------------------------------------------------------------------
# AVX-512 VNNI (int8 dot products), for the hosts that have it
# --------------------------------------------------------------------------------------
#: register-blocking variants of the float kernels (see the module docstring)
ISA_AVX2 = 0
ISA_AVX512 = 1
_ISA_BY_NAME = {"avx2": ISA_AVX2, "avx512": ISA_AVX512}


def _host_features() -> dict:
    """LLVM's feature flags of this host, or ``{}`` when Numba compiles for another target
    (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``: then no host-only instruction may be used)."""
    if _numba_config.CPU_NAME or _numba_config.CPU_FEATURES:  # a cross/generic target
        return {}
    try:
        return dict(_llvm.get_host_cpu_features())
    except Exception:  # pragma: no cover - feature query unavailable
        return {}


_FEATURES = _host_features()


def _select_isa() -> int:
    """``RETRIEVAL_PRUNE_ISA`` if set, else AVX-512 where the host has ``avx512f`` and AVX2
    otherwise (also for a generic target: its fewer registers suit narrow vectors)."""
    forced = os.environ.get("RETRIEVAL_PRUNE_ISA", "").strip().lower()
    if forced:
        if forced not in _ISA_BY_NAME:
            raise ValueError(
                f"RETRIEVAL_PRUNE_ISA={forced!r}: use one of {sorted(_ISA_BY_NAME)} "
                "or leave it unset to follow the CPU"
            )
        return _ISA_BY_NAME[forced]
    return ISA_AVX512 if _FEATURES.get("avx512f", False) else ISA_AVX2


#: the variant the kernels use by default (chosen once, here)
ISA = _select_isa()
#: its name, as ``RETRIEVAL_PRUNE_ISA`` spells it
ISA_NAME = {v: k for k, v in _ISA_BY_NAME.items()}[ISA]


def _host_has_vnni() -> bool:
    """True when Numba compiles for this host's CPU, the CPU has AVX-512 VNNI and the
    AVX-512 variant is selected. ``RETRIEVAL_PRUNE_VNNI=0`` turns it off (the other int8
    kernels give the same numbers)."""
    if os.environ.get("RETRIEVAL_PRUNE_VNNI", "1") == "0":
        return False
    return ISA == ISA_AVX512 and bool(_FEATURES.get("avx512vnni", False))


#: whether :func:`vdpbusd` may be compiled here; kernels using it must check this first
#: (on a CPU without VNNI, LLVM cannot select the instruction)
HAS_VNNI = _host_has_vnni()
#: whether the AVX2 integer intrinsics (:func:`vmaddwd`, :func:`vmaddubsw`) may be
#: compiled here (host target with AVX2)
HAS_AVX2 = bool(_FEATURES.get("avx2", False))


def cpu_features() -> dict:
    """What the kernels were chosen from: the SIMD flags LLVM reports for this host (empty
    for a generic target), the selected variant and the int8 table path."""
    keys = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni")
    return {
        "flags": {k: bool(_FEATURES.get(k, False)) for k in keys},
        "host_target": bool(_FEATURES),
        "isa": ISA_NAME,
        "isa_forced": bool(os.environ.get("RETRIEVAL_PRUNE_ISA", "").strip()),
        "int8_table": "avx512-vnni" if HAS_VNNI else ("avx2-maddwd" if HAS_AVX2 else "float32"),
    }


@intrinsic
def vload_i32(typingctx, arr, idx):
    """The 64 bytes at ``arr.flat[idx]`` (a uint8/int8 array, any alignment) as 16 int32."""
    sig = Vec(types.int32, 16)(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        vt = ir.VectorType(ir.IntType(32), 16)
        return builder.load(builder.bitcast(p, vt.as_pointer()), align=1)

    return sig, codegen


@intrinsic
def vbroadcast_i32(typingctx, arr, idx):
    """The 4 bytes at ``arr.flat[idx]`` (any alignment) as one int32 in all 16 lanes."""
    sig = Vec(types.int32, 16)(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        x = builder.load(builder.bitcast(p, ir.IntType(32).as_pointer()), align=1)
        return _splat(builder, x, 16)

    return sig, codegen


@intrinsic
def vdpbusd(typingctx, acc, a, b):
    """``VPDPBUSD``: lane ``i`` of ``acc`` plus the sum of the four products of the bytes
    of lane ``i`` of ``a`` (unsigned) and of ``b`` (signed); 16 int32 lanes, so 64
    multiply-adds per instruction (4x a float32 FMA). AVX-512 VNNI only: see ``HAS_VNNI``."""
    vt = Vec(types.int32, 16)
    if not (acc == vt and a == vt and b == vt):
        return None
    sig = vt(acc, a, b)

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ty, [ty, ty, ty]), "llvm.x86.avx512.vpdpbusd.512"
        )
        return builder.call(fn, args)

    return sig, codegen


# --------------------------------------------------------------------------------------
# AVX2 int8 dot products (vpmaddubsw), for the hosts that have AVX2
# --------------------------------------------------------------------------------------
_V32I8 = ir.VectorType(ir.IntType(8), 32)


def _avx2_call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name
    )
    return builder.call(fn, args)


@intrinsic
def vbitcast(typingctx, a, like):
    """The bits of vector ``a`` as the type of vector ``like`` (same total width)."""
    if not (isinstance(a, Vec) and isinstance(like, Vec)):
        return None
    if a.lanes * a.dtype.bitwidth != like.lanes * like.dtype.bitwidth:
        return None
    sig = like(a, like)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], args[1].type)

    return sig, codegen


@intrinsic
def vmaddubsw(typingctx, a, b):
    """``VPMADDUBSW``: 16 int16 lanes, lane ``i`` = ``a[2i] b[2i] + a[2i+1] b[2i+1]`` with
    ``a`` read as unsigned and ``b`` as signed bytes, saturated to int16 (the
    int8 roof of :mod:`.bench`). AVX2 only: see ``HAS_AVX2``."""
    vt = Vec(types.int8, 32)
    if not (a == vt and b == vt):
        return None
    sig = Vec(types.int16, 16)(a, b)

    def codegen(context, builder, sig, args):
        rt = ir.VectorType(ir.IntType(16), 16)
        return _avx2_call(builder, "llvm.x86.avx2.pmadd.ub.sw", rt, list(args))

    return sig, codegen


@intrinsic
def vmaddwd(typingctx, a, b):
    """``VPMADDWD``: 8 int32 lanes, lane ``i`` = ``a[2i] b[2i] + a[2i+1] b[2i+1]`` of 16
    int16 lanes each (exact: 16 multiply-adds per instruction, 2x a float32 FMA's 8).
    AVX2 only: see ``HAS_AVX2``."""
    vt = Vec(types.int16, 16)
    if not (a == vt and b == vt):
        return None
    sig = Vec(types.int32, 8)(a, b)

    def codegen(context, builder, sig, args):
        rt = ir.VectorType(ir.IntType(32), 8)
        return _avx2_call(builder, "llvm.x86.avx2.pmadd.wd", rt, list(args))

    return sig, codegen


@intrinsic
def vbroadcast_i16x2(typingctx, arr, idx):
    """The int16 pair at ``arr.flat[idx:idx+2]`` (an int16 array) repeated 8 times:
    ``Vec(int16 x 16)`` (one ``vpbroadcastd``)."""
    sig = Vec(types.int16, 16)(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        x = builder.load(builder.bitcast(p, ir.IntType(32).as_pointer()), align=1)
        return builder.bitcast(_splat(builder, x, 8), ir.VectorType(ir.IntType(16), 16))

    return sig, codegen


@intrinsic
def vload_i8_i16(typingctx, arr, idx):
    """The 16 int8 at ``arr.flat[idx]`` sign-extended to ``Vec(int16 x 16)``
    (``vpmovsxbw``)."""
    sig = Vec(types.int16, 16)(arr, idx)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        return builder.sext(v, ir.VectorType(ir.IntType(16), 16))

    return sig, codegen


@intrinsic
def vsadbw(typingctx, a):
    """``VPSADBW`` against zero: the sums of each 8 consecutive bytes of 32 uint8 lanes, as
    4 uint64 lanes (a byte popcount's per-word total). AVX2 only: see ``HAS_AVX2``."""
    if a != Vec(types.uint8, 32):
        return None
    sig = Vec(types.uint64, 4)(a)

    def codegen(context, builder, sig, args):
        rt = ir.VectorType(ir.IntType(64), 4)
        zero = ir.Constant(_V32I8, [0] * 32)
        return _avx2_call(builder, "llvm.x86.avx2.psad.bw", rt, [args[0], zero])

    return sig, codegen
