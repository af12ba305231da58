"""Kernel benchmarks against roofs measured in the same run.

``run()`` measures, for every thread count, the machine's roofs (numpy sgemm GFLOP/s
with BLAS limited to that many threads; read bandwidth of a Numba parallel sum over a
1 GiB array; a clock estimate) and then every kernel on synthetic normalised random data
(labelled synthetic in the output), reporting each throughput with its ratio to the
relevant roof. Timings on a shared machine drift by 10-15 %: compare ratios from one run,
never numbers from different runs.

Output shape (thread counts are string keys)::

    {"machine": {...},
     "roofs": {"1": {"sgemm_gflops": .., "read_gbps": ..}, "2": {...}},
     "kernels": {"maxsim_f32": {"1": {"throughput": .., "unit": "GFLOP/s",
                                      "ratio_to_roof": ..}, "2": {...}}, ...}}

Run it with ``python -m retrieval_prune.evaluation.bench_kernels --json PATH`` (or
``retrieval-prune bench kernels --json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numba
import numpy as np

from retrieval_prune.kernels.bench import (
    _i8_chain1,
    _i16_chain1,
    add_chain,
    avx2_i8_chain,
    avx2_i16_chain,
    sum_u64,
    vnni_chain,
)
from retrieval_prune.kernels.simd import HAS_AVX2, HAS_VNNI, cpu_features

__all__ = ["run", "main", "machine_info"]

# workload of the MaxSim-family kernels (design.md section 5)
NQ, T, DIM = 32, 128, 128
K_CENTROIDS = 256
READ_BYTES = 1 << 30  # read-bandwidth roof array: 1 GiB
N_HAMMING = 1 << 25  # 32 Mi 128-bit codes = 512 MiB, far beyond the L3


# --------------------------------------------------------------------------------------
# measuring instruments
# --------------------------------------------------------------------------------------
class _Timer:
    """The clock of every measurement in a run (see ``run(timer=...)``)."""

    now: Callable[[], float] = time.perf_counter
    div: float = 1.0  # "cpu" mode: process CPU seconds per thread = wall-equivalent


_TIMER = _Timer()


def _best_time(fn: Callable[[], object], repeats: int = 5, min_total: float = 0.0) -> float:
    """Best time of ``fn()`` over ``repeats`` calls (at least ``min_total`` seconds)."""
    best = float("inf")
    spent = 0.0
    i = 0
    while i < repeats or spent < min_total:
        t0 = _TIMER.now()
        fn()
        dt = (_TIMER.now() - t0) / _TIMER.div
        best = min(best, dt)
        spent += dt
        i += 1
        if i >= max(50 * repeats, 2000):
            break
    return best


def machine_info() -> dict:
    """CPU model, core count, SIMD flags, library versions, BLAS, OPENBLAS_CORETYPE."""
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": None,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = sorted(
                    f for f in flags if f.startswith(("avx", "fma", "sse4", "popcnt"))
                )
                break
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: d.get(k) for k in ("internal_api", "version", "architecture", "filepath")}
            for d in threadpool_info()
            if d.get("user_api") == "blas"
        ]
    except Exception:  # pragma: no cover - optional
        info["blas"] = None
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except Exception:  # pragma: no cover - optional
        info["faiss"] = None
    return info


def _blas_limit(t: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=t, user_api="blas")


def roof_sgemm(t: int, rng: np.random.Generator) -> float:
    """Best numpy float32 matmul GFLOP/s with BLAS limited to ``t`` threads."""
    shapes = [(4096, 128, 4096), (2048, 2048, 2048)]
    best = 0.0
    with _blas_limit(t):
        for m, k, n in shapes:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            c = np.empty((m, n), np.float32)
            np.matmul(a, b, out=c)
            dt = _best_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), repeats=5)
            best = max(best, 2.0 * m * k * n / dt / 1e9)
    return best


def roof_read(t: int, arr: np.ndarray) -> float:
    """Best GB/s of a Numba parallel sum over ``arr`` (>= 1 GiB) on ``t`` threads."""
    numba.set_num_threads(t)
    chunks = 8 * t
    sum_u64(arr[:1024], chunks)
    dt = _best_time(lambda: sum_u64(arr, chunks), repeats=5)
    return arr.nbytes / dt / 1e9


def roof_vnni(t: int) -> float:
    """Peak int8 GOP/s (2 per multiply-add) of ``vpdpbusd`` on ``t`` threads: 12
    independent register chains each, no memory traffic (AVX-512 VNNI hosts only)."""
    numba.set_num_threads(t)
    n = 200_000
    vnni_chain(100, t)
    dt = _best_time(lambda: vnni_chain(n, t), repeats=10, min_total=0.3)
    return 2.0 * 64 * 12 * n * t / dt / 1e9


def roof_avx2_int8(t: int) -> tuple[float, float]:
    """Peak GOP/s (2 per multiply-add) on ``t`` threads of the AVX2 int8 instructions, 12
    independent register chains each, no memory traffic (AVX2 hosts): ``vpmaddubsw`` +
    ``vpmaddwd`` + ``vpaddd`` (32 int8 multiply-adds: the int8 roof without VNNI) and
    ``vpmaddwd`` + ``vpaddd`` (16 int16 multiply-adds: the AVX2 int8 table's own
    instructions). For one thread the chains also run outside a parallel region (a
    prange body measured up to 1/3 lower here) and the higher figure counts."""
    numba.set_num_threads(t)
    n = 200_000
    out = []
    for chain, one, macs in ((avx2_i8_chain, _i8_chain1, 32), (avx2_i16_chain, _i16_chain1, 16)):
        chain(100, t)
        dt = _best_time(lambda c=chain: c(n, t), repeats=10, min_total=0.3)
        if t == 1:
            one(100, 0)
            dt = min(dt, _best_time(lambda o=one: o(n, 0), repeats=10, min_total=0.3))
        out.append(2.0 * macs * 12 * n * t / dt / 1e9)
    return out[0], out[1]


def clock_ghz(t: int) -> float:
    """Core clock estimate: a dependent float64 add chain runs at one add per 3 cycles
    (FADD latency on Zen 4 / most x86 cores); ``t`` threads run one chain each."""
    numba.set_num_threads(t)
    n = 2_000_000  # ~2 ms: many short runs, the best one saw a core to itself
    add_chain(1000, t)
    dt = _best_time(lambda: add_chain(n, t), repeats=20, min_total=0.5)
    return 3.0 * n / dt / 1e9


# --------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------
def _normed(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class _Data:
    """Synthetic workloads shared by every thread count (built lazily)."""

    def __init__(self, n_docs: int, seed: int):
        self.n_docs = n_docs
        self.rng = np.random.default_rng(seed)
        self._cache: dict[str, object] = {}

    def get(self, name: str, build: Callable[[], object]):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def queries(self, n_q: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = self.get("q", lambda: _normed(self.rng, 8 * NQ, DIM))
        return q[: n_q * NQ], np.arange(n_q + 1, dtype=np.int64) * NQ

    def docs_f32(self) -> tuple[np.ndarray, np.ndarray]:
        def build():
            d = _normed(self.rng, self.n_docs * T, DIM)
            return d, np.arange(self.n_docs + 1, dtype=np.int64) * T

        return self.get("docs_f32", build)


# --------------------------------------------------------------------------------------
# kernel benchmarks: each returns (throughput, unit, bound) where bound(roofs) is the
# roof expressed in the kernel's unit (ratio_to_roof = throughput / bound(roofs), with the
# best roofs of the whole section, measured before and after the kernels)
# --------------------------------------------------------------------------------------
Result = tuple[float, str, Callable[[dict], float]]
MAXSIM_BATCH = 4  # queries per maxsim_search call (the kernel scores a document for all)


def bench_maxsim_f32(data: _Data, t: int, roof: dict) -> Result:
    """Exact MaxSim top-10, GFLOP = 2 * 32 * 128 * 128 * n_docs per query."""
    from retrieval_prune.kernels.ops import maxsim_search

    d, off = data.docs_f32()
    q, qoff = data.queries(MAXSIM_BATCH)
    maxsim_search(q, qoff, d[: 4 * T], off[:5], 10)  # compile
    dt = _best_time(lambda: maxsim_search(q, qoff, d, off, 10), repeats=3)
    gflops = MAXSIM_BATCH * 2.0 * NQ * T * DIM * data.n_docs / dt / 1e9
    return gflops, "GFLOP/s", lambda r: r["sgemm_gflops"]


# ---- centroid codes -------------------------------------------------------------------
# The cheap kernels scan n_docs documents (a few ms) many times and keep the best run: on
# a shared machine short runs are the likeliest to see a core to themselves.
CODE_DOCS_FACTOR = 1

# L1-load-bound estimate of code MaxSim: every document token loads one table row of
# NQ entries (NQ * 4 B float32, NQ * 1 B uint8); a Zen 4 core loads at most 64 B/cycle
# from L1 (2 x 256-bit), so docs/s <= clock * 64 / (T * NQ * bytes) per core
# (~14M/s float32 and ~57M/s uint8 at 3.6 GHz). Code loads and address arithmetic are
# not counted, so the bound is optimistic.
L1_BYTES_PER_CYCLE = 64


def _code_data(data: _Data):
    def build():
        n = data.n_docs * CODE_DOCS_FACTOR
        cent = _normed(data.rng, K_CENTROIDS, DIM)
        codes = data.rng.integers(0, K_CENTROIDS, n * T).astype(np.uint8)
        return cent, codes, np.arange(n + 1, dtype=np.int64) * T

    return data.get("codes", build)


def _bench_code(data: _Data, t: int, roof: dict, quant: bool) -> Result:
    from retrieval_prune.kernels.ops import code_table, maxsim_code_scores, quantize_table

    cent, codes, off = _code_data(data)
    q, _ = data.queries(1)
    table = code_table(cent, q)
    if quant:
        table = quantize_table(table)
    n = off.shape[0] - 1
    maxsim_code_scores(table, codes[: 4 * T], off[:5])
    dt = _best_time(lambda: maxsim_code_scores(table, codes, off), repeats=7, min_total=1.0)
    docs_s = n / dt
    per_doc = T * NQ * (1 if quant else 4)
    return docs_s, "docs/s", lambda r: r["clock_ghz"] * 1e9 * L1_BYTES_PER_CYCLE * t / per_doc


def bench_maxsim_code_f32(data, t, roof):
    """Code MaxSim with a float32 table, K=256, uint8 codes."""
    return _bench_code(data, t, roof, quant=False)


def bench_maxsim_code_u8(data, t, roof):
    """Code MaxSim with a per-query uint8 table, K=256, uint8 codes."""
    return _bench_code(data, t, roof, quant=True)


# ---- residuals ------------------------------------------------------------------------
RESIDUAL_NBITS = 2


def bench_maxsim_residual(data: _Data, t: int, roof: dict) -> Result:
    """Residual decode (K=256, nbits=2, renormalised) + exact MaxSim of every document;
    roof: the float32 MaxSim compute bound sgemm_gflops / (2 * 32 * 128 * 128)."""
    from retrieval_prune.kernels.ops import maxsim_residual_rerank

    def build():
        n = data.n_docs
        cent = _normed(data.rng, K_CENTROIDS, DIM)
        codes = data.rng.integers(0, K_CENTROIDS, n * T).astype(np.uint8)
        packed = data.rng.integers(0, 256, (n * T, DIM * RESIDUAL_NBITS // 8)).astype(np.uint8)
        bv = np.array([-0.03, -0.01, 0.01, 0.03], np.float32)
        return cent, codes, packed, bv, np.arange(n + 1, dtype=np.int64) * T

    cent, codes, packed, bv, off = data.get("residual", build)
    q, _ = data.queries(1)

    def go(o=off, c=codes, p=packed):
        return maxsim_residual_rerank(q, c, p, o, cent, bv, RESIDUAL_NBITS, None, True)

    go(off[:5], codes[: 4 * T], packed[: 4 * T])
    dt = _best_time(go, repeats=3)
    docs_s = data.n_docs / dt
    return docs_s, "docs/s", lambda r: r["sgemm_gflops"] * 1e9 / (2.0 * NQ * T * DIM)


# ---- the score table of staged search -------------------------------------------------
TABLE_CENTROIDS = 16384  # the codebook of the SciFact `default` index (k_scale=2)


def _table_data(data: _Data, dim: int = DIM):
    def build():
        from retrieval_prune.compress.kmeans import _quantize_int8
        from retrieval_prune.kernels.ops import _pack

        cent = _normed(data.rng, TABLE_CENTROIDS, dim)
        c8, scale = _quantize_int8(cent)
        q = _normed(data.rng, NQ, dim)
        qp = _pack(q, np.array([0, NQ], np.int64))[0]
        corr = (-128 * c8.astype(np.int32).sum(axis=1)).astype(np.int32)
        return cent.reshape(-1), c8.reshape(-1), scale, corr, qp

    return data.get(f"table{dim}", build)


def _bench_table(data: _Data, int8: bool, dim: int = DIM) -> float:
    from retrieval_prune.kernels.codes import centroid_table_i8, centroid_table_kernel

    cent, c8, scale, corr, qp = _table_data(data, dim)
    nv = -(-NQ // 16)
    out = np.empty(TABLE_CENTROIDS * nv * 16, np.float32)
    if int8:

        def go():
            centroid_table_i8(qp, nv, dim, c8, corr, scale, TABLE_CENTROIDS, out)
    else:

        def go():
            centroid_table_kernel(qp, nv, dim, cent, TABLE_CENTROIDS, out)

    go()
    dt = _best_time(go, repeats=20, min_total=0.5)
    return 2.0 * NQ * dim * TABLE_CENTROIDS / dt / 1e9


def _int8_roof(dim: int) -> Callable[[dict], float]:
    """The roof of the int8 table kernel that runs for ``dim`` on this host: ``vpdpbusd``
    (VNNI), the AVX2 ``vpmaddubsw`` chain, or sgemm (the portable float32 kernel)."""
    from retrieval_prune.kernels.codes import int8_table_path

    key = {"vnni": "vnni_gops", "avx2": "avx2_i8_gops"}.get(int8_table_path(dim))
    return lambda r: r[key] if key in r else r["sgemm_gflops"]


def bench_score_table_f32(data: _Data, t: int, roof: dict) -> Result:
    """Stage-1 score table (32 query tokens x 16384 float32 centroids, d=128, stored
    lane-padded) in GFLOP/s; roof: sgemm."""
    return _bench_table(data, False), "GFLOP/s", lambda r: r["sgemm_gflops"]


def bench_score_table_i8(data: _Data, t: int, roof: dict) -> Result:
    """The same table from an int8 codebook with the query quantised per token (the
    ``centroid_bits=8`` path), GOP/s with 2 per multiply-add; roof: the register-only
    ``vpdpbusd`` peak where the CPU has VNNI, the AVX2 ``vpmaddubsw`` + ``vpmaddwd`` peak
    where it has AVX2, else sgemm (the portable kernel)."""
    return _bench_table(data, True), "GOP/s", _int8_roof(DIM)


def bench_score_table_f32_d384(data: _Data, t: int, roof: dict) -> Result:
    """:func:`bench_score_table_f32` at d=384 (the zero-shot MiniLM width: 3x the work)."""
    return _bench_table(data, False, 384), "GFLOP/s", lambda r: r["sgemm_gflops"]


def bench_score_table_i8_d384(data: _Data, t: int, roof: dict) -> Result:
    """:func:`bench_score_table_i8` at d=384."""
    return _bench_table(data, True, 384), "GOP/s", _int8_roof(384)


# ---- sign bits ------------------------------------------------------------------------
def _bits_data(data: _Data):
    def build():
        n = data.n_docs * CODE_DOCS_FACTOR
        bits = data.rng.integers(0, 256, (n * T, DIM // 8)).astype(np.uint8)
        return bits, np.arange(n + 1, dtype=np.int64) * T

    return data.get("bits", build)


def bench_maxsim_binary_asym(data: _Data, t: int, roof: dict) -> Result:
    """Asymmetric float-query vs sign-bit MaxSim (int16 byte LUT, 256 KiB, L2-resident).

    Roof: every document token adds DIM/8 LUT rows of 64 B (32 int16 lanes) streamed
    from L2 at <= 64 B/cycle: docs/s <= clock / (T * DIM / 8) per core (~1.8M at 3.6 GHz).
    """
    from retrieval_prune.kernels.ops import binary_lut, maxsim_binary

    bits, off = _bits_data(data)
    q, _ = data.queries(1)
    lut = binary_lut(q)
    maxsim_binary(lut, bits[: 4 * T], off[:5])
    dt = _best_time(lambda: maxsim_binary(lut, bits, off), repeats=5, min_total=1.0)
    docs_s = (off.shape[0] - 1) / dt
    return docs_s, "docs/s", lambda r: r["clock_ghz"] * 1e9 * t / (T * DIM / 8)


# Hamming MaxSim ALU estimate: per query token and 8 document tokens (one uint64 x 8
# vector per 64-bit word): per word xor + popcount, one add, one min = 6 vector ops for
# d = 128; Zen 4 retires about 2 such 512-bit integer ops per cycle.
HAMMING_OPS_PER_8_PAIRS = 6
VEC_OPS_PER_CYCLE = 2


def bench_maxsim_binary(data: _Data, t: int, roof: dict) -> Result:
    """Binary MaxSim: sign bits of the query against sign bits of the documents
    (Hamming, planar word arrays -- the design.md section 5 "binary MaxSim" row); roof:
    the ALU estimate above (~2.3M docs/s per core at 3.6 GHz)."""
    from retrieval_prune.kernels.ops import maxsim_hamming, to_planar

    bits, off = _bits_data(data)
    planar = data.get("planar", lambda: to_planar(bits, off, DIM))
    small = to_planar(bits[: 4 * T], off[:5], DIM)
    q, _ = data.queries(1)
    maxsim_hamming(q, small)
    dt = _best_time(lambda: maxsim_hamming(q, planar), repeats=5, min_total=1.0)
    docs_s = (off.shape[0] - 1) / dt
    ops_per_doc = NQ * T / 8 * HAMMING_OPS_PER_8_PAIRS
    return docs_s, "docs/s", lambda r: r["clock_ghz"] * 1e9 * VEC_OPS_PER_CYCLE * t / ops_per_doc


def _hamming_codes(data: _Data) -> np.ndarray:
    return data.get("h128", lambda: data.rng.integers(0, 256, (N_HAMMING, 16), dtype=np.uint8))


def bench_hamming_scan_128(data: _Data, t: int, roof: dict) -> Result:
    """One 128-bit query vs 32 Mi codes, top-10 fused; ratio = bytes read/s / read_gbps."""
    from retrieval_prune.kernels.ops import hamming_scan_128

    codes = _hamming_codes(data).view("<u8")
    q = codes[123].copy()
    hamming_scan_128(q, codes[:4096], 10)
    dt = _best_time(lambda: hamming_scan_128(q, codes, 10), repeats=5, min_total=1.0)
    return N_HAMMING / dt, "codes/s", lambda r: r["read_gbps"] * 1e9 / 16


def bench_faiss_binary_flat(data: _Data, t: int, roof: dict) -> Result:
    """The peer: faiss IndexBinaryFlat(128), one query, k=10, faiss limited to t threads."""
    import faiss

    codes = _hamming_codes(data)

    def build():
        index = faiss.IndexBinaryFlat(128)
        index.add(codes)
        return index

    index = data.get("faiss_bin", build)
    q = codes[123:124].copy()
    faiss.omp_set_num_threads(t)
    index.search(q, 10)
    dt = _best_time(lambda: index.search(q, 10), repeats=5, min_total=1.0)
    return N_HAMMING / dt, "codes/s", lambda r: r["read_gbps"] * 1e9 / 16


#: name -> benchmark function, in report order
BENCHES: dict[str, Callable[[_Data, int, dict], Result]] = {
    "maxsim_f32": bench_maxsim_f32,
    "maxsim_code_f32": bench_maxsim_code_f32,
    "maxsim_code_u8": bench_maxsim_code_u8,
    "maxsim_residual": bench_maxsim_residual,
    "score_table_f32": bench_score_table_f32,
    "score_table_i8": bench_score_table_i8,
    "score_table_f32_d384": bench_score_table_f32_d384,
    "score_table_i8_d384": bench_score_table_i8_d384,
    "maxsim_binary": bench_maxsim_binary,
    "maxsim_binary_asym": bench_maxsim_binary_asym,
    "hamming_scan_128": bench_hamming_scan_128,
    "faiss_binary_flat": bench_faiss_binary_flat,
}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _measure_roofs(t: int, rng: np.random.Generator, big: np.ndarray) -> dict:
    # the clock is measured on one thread and scaled by t in the bounds: a t-thread chain
    # needs t cores free at once and reads far too low on a shared machine (all-core
    # boost may be a little lower, which only makes the t-thread ratios conservative)
    roofs = {
        "sgemm_gflops": roof_sgemm(t, rng),
        "read_gbps": roof_read(t, big),
        "clock_ghz": clock_ghz(1),
    }
    if HAS_VNNI:
        roofs["vnni_gops"] = roof_vnni(t)
    if HAS_AVX2:
        roofs["avx2_i8_gops"], roofs["avx2_i16_gops"] = roof_avx2_int8(t)
    numba.set_num_threads(t)
    return roofs


def run(
    threads: Sequence[int] = (1, 2),
    n_docs: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    kernels: Sequence[str] | None = None,
    timer: str = "wall",
) -> dict:
    """Measure roofs and kernels for every thread count; returns the JSON-ready dict.

    Parameters
    ----------
    threads : thread counts to measure (each >= 1)
    n_docs : documents of the MaxSim workloads (32 query x 128 document tokens, d=128)
    seed : seed of the synthetic data
    progress : print progress lines to stderr
    kernels : subset of :data:`BENCHES` names (default: all)
    timer : ``"wall"`` (default: wall-clock seconds) or ``"cpu"``: process CPU seconds
        divided by the thread count, for an oversubscribed machine where other processes
        take the cores away mid-run. CPU mode estimates what the kernels (and roofs)
        reach with ``t`` cores of their own. It is sound for 1 thread; above, it counts
        a thread spinning at a barrier as busy (pessimistic for millisecond-long calls)
        and misses the bandwidth the threads share when the OS runs them one after the
        other (optimistic for memory-bound kernels): prefer wall time on a quiet host.
    """
    if timer not in ("wall", "cpu"):
        raise ValueError(f"timer={timer!r}: use 'wall' or 'cpu'")
    threads = [int(t) for t in threads]
    if not threads or min(threads) < 1:
        raise ValueError(f"threads={threads!r}: give thread counts >= 1, e.g. (1, 2)")
    if n_docs < 16:
        raise ValueError(f"n_docs={n_docs} is too small to time; use >= 16 (default 10000)")
    if max(threads) > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"threads={threads!r} exceeds the {numba.config.NUMBA_NUM_THREADS} threads Numba "
            "can use here (NUMBA_NUM_THREADS); ask for fewer"
        )
    names = list(BENCHES) if kernels is None else list(kernels)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; choose from {list(BENCHES)}")

    def say(msg: str) -> None:
        if progress:
            print(f"[bench_kernels] {msg}", file=sys.stderr, flush=True)

    prev_threads = numba.get_num_threads()
    machine = machine_info()
    # the kernel variant and int8 path this run measured, and the flags they came from
    machine["kernels"] = cpu_features()
    machine["data"] = "synthetic: normalised standard-normal vectors, seeded"
    machine["workload"] = {
        "query_tokens": NQ,
        "doc_tokens": T,
        "dim": DIM,
        "n_docs": n_docs,
        "maxsim_batch_queries": MAXSIM_BATCH,
        "centroids": K_CENTROIDS,
        "table_centroids": TABLE_CENTROIDS,
        "table_dims": [DIM, 384],
        "hamming_codes": N_HAMMING,
    }
    machine["clock_ghz_est"] = {}
    machine["timer"] = timer
    out: dict = {"machine": machine, "roofs": {}, "kernels": {n: {} for n in names}}
    data = _Data(n_docs, seed)
    rng = np.random.default_rng(seed + 1)
    say("allocating the 1 GiB read-bandwidth array")
    big = np.ones(READ_BYTES // 8, np.uint64)
    try:
        if timer == "cpu":
            _TIMER.now = time.process_time
        for t in threads:
            key = str(t)
            _TIMER.div = float(t) if timer == "cpu" else 1.0
            numba.set_num_threads(t)
            say(f"roofs, {t} thread(s)")
            roof = _measure_roofs(t, rng, big)
            say(f"  sgemm {roof['sgemm_gflops']:.1f} GFLOP/s, read {roof['read_gbps']:.1f} GB/s")
            results = {}
            for name in names:
                numba.set_num_threads(t)
                results[name] = BENCHES[name](data, t, roof)
                say(f"  {name:18s} {results[name][0]:14.4g} {results[name][1]}")
            # roofs again after the kernels: keep the best of both (load drifts)
            again = _measure_roofs(t, rng, big)
            roof = {m: max(roof[m], again[m]) for m in roof}
            machine["clock_ghz_est"][key] = roof["clock_ghz"]
            kept = ("sgemm_gflops", "read_gbps", "vnni_gops", "avx2_i8_gops", "avx2_i16_gops")
            out["roofs"][key] = {m: roof[m] for m in kept if m in roof}
            say(f"  best roofs: sgemm {roof['sgemm_gflops']:.1f}, read {roof['read_gbps']:.1f}")
            for name, (thr, unit, bound) in results.items():
                ratio = thr / bound(roof)
                out["kernels"][name][key] = {
                    "throughput": float(thr),
                    "unit": unit,
                    "ratio_to_roof": float(ratio),
                }
                say(f"  {name:18s} {thr:14.4g} {unit:8s} ratio {ratio:.3f}")
    finally:
        numba.set_num_threads(prev_threads)
        _TIMER.now, _TIMER.div = time.perf_counter, 1.0
    try:
        machine["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region ran
        pass
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m retrieval_prune.evaluation.bench_kernels",
        description="Kernel throughput vs roofs measured in the same run (synthetic data).",
    )
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-docs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", nargs="+", default=None, help=f"subset of {list(BENCHES)}")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall clock (default) or process CPU time per thread (oversubscribed machines)",
    )
    a = p.parse_args(argv)
    res = run(a.threads, a.n_docs, a.seed, progress=not a.quiet, kernels=a.kernels, timer=a.timer)
    text = json.dumps(res, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
