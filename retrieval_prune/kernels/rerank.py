"""Int8 rerank of residual-coded candidates: decode once into int8 rows, score with the
int8 table product.

The float32 rerank (:func:`.codes.residual_rerank_kernel`) decodes every token of every
candidate and runs the float32 MaxSim micro-kernel on it: ``n_q * dim`` FMAs per document
token, the largest stage of a k=100 search. Here each decoded token is quantised to int8
with a scale of its own (its inverse norm folded in when the codec normalises), and the
candidates' rows go through the same int8 x int8 product as the stage-1 score table
(:func:`.codes.centroid_table_i8`: VNNI, AVX2 ``vpmaddubsw`` or portable, one table), then
a max over each document's rows and a sum over the query tokens
(:func:`segment_maxsum_kernel`).

The query is quantised per token as for the stage-1 table; both roundings are at most half
a step of 1/127 of a token's largest coordinate, small beside the 1- to 4-bit residuals
the tokens were stored with. Integer products are exact, so the result does not depend on
which kernel computed them.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._config import NJIT, NJIT_PARALLEL
from .codes import decode_token_raw, inv_norm
from .maxsim import NEG
from .simd import Vec, _ptr, vadd, vfma, vhadd, vload, vmax, vsplat


# -- three vector operations the quantisation needs (plain LLVM IR, as in .simd) ----------
@intrinsic
def vhmax_abs(typingctx, a):
    """Largest ``|lane|`` of a float32 vector (``fabs`` then an ``fmax`` reduction): a
    scalar ``max(m, abs(x))`` loop stays scalar in Numba (its ``max`` keeps NaN rules)."""
    if not (isinstance(a, Vec) and a.dtype == types.float32):
        return None
    sig = types.float32(a)

    def codegen(context, builder, sig, args):
        v = args[0]
        fabs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v.type, [v.type]), f"llvm.fabs.v{v.type.count}f32"
        )
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.FloatType(), [v.type]),
            f"llvm.vector.reduce.fmax.v{v.type.count}f32",
        )  # fmt: skip
        return builder.call(red, [builder.call(fabs, [v])])

    return sig, codegen


@intrinsic
def vcvt_i32(typingctx, a):
    """A float32 vector converted lane-wise to int32, truncating (``vcvttps2dq``)."""
    if not (isinstance(a, Vec) and a.dtype == types.float32):
        return None
    sig = Vec(types.int32, a.lanes)(a)

    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], ir.VectorType(ir.IntType(32), sig.args[0].lanes))

    return sig, codegen


@intrinsic
def vstore_i8(typingctx, arr, idx, v):
    """Store an int32 vector's lanes, truncated to int8, at ``arr.flat[idx:idx+lanes]``."""
    if not (isinstance(v, Vec) and v.dtype == types.int32 and arr.dtype == types.int8):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        x = builder.trunc(args[2], ir.VectorType(ir.IntType(8), sig.args[2].lanes))
        builder.store(x, builder.bitcast(p, x.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(**NJIT_PARALLEL)
def decode_rows_i8_kernel(
    codes, P1, nb, src, scale, use_scale, dim, lut, per, normalize, d_off, ids, row_off,
    R8, rscale, corr,
):  # fmt: skip
    """Decode the tokens of documents ``ids`` into int8 rows.

    Document ``ids[r]``'s tokens go to rows ``row_off[r]:row_off[r+1]`` of ``R8`` (flat
    ``(rows, dim)`` int8) with ``rscale[row]`` such that ``rscale * R8[row]`` is the decoded token
    (times its inverse norm with ``normalize``), and ``corr[row] = -128 * sum(R8[row])``
    (the VNNI table kernel's offset correction). ``P1``: the packed residuals flattened,
    ``nb`` bytes per token; ``src``/``scale``/``use_scale``/``lut``/``per`` as in
    :func:`.codes.decode_token_raw`.
    """
    n = ids.shape[0]
    nch = min(n, 64)
    max_len = 1
    for r in range(n):
        max_len = max(max_len, d_off[ids[r] + 1] - d_off[ids[r]])
    for c in prange(nch):
        buf = np.empty(max_len * dim, np.float32)
        inv_n = np.empty(max_len, np.float32)
        for r in range(c * n // nch, (c + 1) * n // nch):
            doc = ids[r]
            s = d_off[doc]
            e = d_off[doc + 1]
            # decode the whole document first: reading a token right after its wide
            # stores would stall on store forwarding
            for j in range(s, e):
                ss = decode_token_raw(
                    np.int64(codes[j]), P1, j * nb, nb, src, scale, use_scale, dim, lut, per,
                    buf, (j - s) * dim,
                )  # fmt: skip
                inv_n[j - s] = inv_norm(ss) if normalize else np.float32(1.0)
            for t in range(e - s):
                _quantize_row(buf, t * dim, dim, R8, (row_off[r] + t) * dim, rscale, corr,
                              row_off[r] + t, inv_n[t])


@njit(inline="always", **NJIT)
def _quantize_row(buf, b, dim, R8, o, rscale, corr, row, inv_norm_):
    """int8 row ``R8[o:o+dim]`` of ``buf[b:b+dim]`` with step = its largest |value| / 127,
    rounded half up (``trunc(x + 128.5) - 128``: no libm call), 16 values per vector op
    when ``dim % 16 == 0``; ``rscale[row]`` = step * ``inv_norm_``, ``corr[row]`` = -128 *
    the row's sum."""
    g16 = dim - dim % 16
    vz = vsplat(np.float32(0.0), 16)
    vm1 = vsplat(np.float32(-1.0), 16)
    acc = vz
    for d in range(0, g16, 16):  # max(x, -x) lane-wise; one reduction per row
        x = vload(buf, b + d, 16)
        acc = vmax(acc, vmax(x, vfma(x, vm1, vz)))
    m = vhmax_abs(acc)
    for d in range(g16, dim):
        m = max(m, abs(buf[b + d]))
    step = m / np.float32(127.0) if m > 0 else np.float32(1.0)
    inv = np.float32(1.0) / step
    vinv = vsplat(inv, 16)
    voff = vsplat(np.float32(128.5), 16)
    vneg = vsplat(np.int32(-128), 16)
    vtot = vsplat(np.int32(0), 16)
    for d in range(0, g16, 16):
        v = vadd(vcvt_i32(vfma(vload(buf, b + d, 16), vinv, voff)), vneg)
        vstore_i8(R8, o + d, v)
        vtot = vadd(vtot, v)
    tot = vhadd(vtot)
    for d in range(g16, dim):
        x = np.int32(buf[b + d] * inv + np.float32(128.5)) - np.int32(128)
        R8[o + d] = np.int8(x)
        tot += x
    corr[row] = np.int32(-128 * tot)
    rscale[row] = step * inv_norm_


@njit(**NJIT)
def segment_maxsum_kernel(t, W, nq, row_off, out):
    """``out[r]`` = sum over the first ``nq`` lanes of the max over rows
    ``row_off[r]:row_off[r+1]`` of ``t`` (flat ``(rows, W)`` float32); ``NEG`` for an
    empty range."""
    mx = np.empty(max(nq, 1), np.float32)
    for r in range(out.shape[0]):
        a = row_off[r]
        b = row_off[r + 1]
        if b <= a:
            out[r] = NEG
            continue
        base = a * W
        for i in range(nq):
            mx[i] = t[base + i]
        for row in range(a + 1, b):
            base = row * W
            for i in range(nq):  # branch-free: LLVM vectorises the lane loop
                mx[i] = max(mx[i], t[base + i])
        tot = np.float32(0.0)
        for i in range(nq):
            tot += mx[i]
        out[r] = tot
