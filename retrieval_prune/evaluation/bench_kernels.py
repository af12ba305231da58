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
from numba import njit, prange

from retrieval_prune.kernels._config import NJIT_PARALLEL

__all__ = ["run", "main", "machine_info"]

# workload of the MaxSim-family kernels (design.md section 5)
NQ, T, DIM = 32, 128, 128
K_CENTROIDS = 256
READ_BYTES = 1 << 30  # read-bandwidth roof array: 1 GiB
N_HAMMING = 1 << 25  # 32 Mi 128-bit codes = 512 MiB, far beyond the L3


# --------------------------------------------------------------------------------------
# measuring instruments
# --------------------------------------------------------------------------------------
@njit(**NJIT_PARALLEL)
def _sum_u64(a, n_chunks):
    """Parallel sum of a uint64 array (vectorised loads: the read-bandwidth roof)."""
    n = a.shape[0]
    part = np.zeros(n_chunks, np.uint64)
    for c in prange(n_chunks):
        s = np.uint64(0)
        for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            s += a[i]
        part[c] = s
    return part.sum()


# no fastmath: the adds must stay one dependent chain (3-cycle FADD latency on Zen 4)
@njit(**{**NJIT_PARALLEL, "fastmath": False})
def _add_chain(n, n_threads):
    out = np.zeros(n_threads)
    for t in prange(n_threads):
        x = 0.0
        y = 1e-9 * (t + 1)
        for _ in range(n):
            x = x + y
        out[t] = x
    return out


def _best_time(fn: Callable[[], object], repeats: int = 5, min_total: float = 0.0) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls (at least ``min_total`` seconds)."""
    best = float("inf")
    spent = 0.0
    i = 0
    while i < repeats or spent < min_total:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        i += 1
        if i >= 50 * repeats:
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
    _sum_u64(arr[:1024], chunks)
    dt = _best_time(lambda: _sum_u64(arr, chunks), repeats=5)
    return arr.nbytes / dt / 1e9


def clock_ghz(t: int) -> float:
    """Core clock estimate: a dependent float64 add chain runs at one add per 3 cycles
    (FADD latency on Zen 4 / most x86 cores); ``t`` threads run one chain each."""
    numba.set_num_threads(t)
    n = 50_000_000
    _add_chain(1000, t)
    dt = _best_time(lambda: _add_chain(n, t), repeats=3)
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
# kernel benchmarks: each returns (throughput, unit, ratio_to_roof)
# --------------------------------------------------------------------------------------
MAXSIM_BATCH = 4  # queries per maxsim_search call (the kernel scores a document for all)


def bench_maxsim_f32(data: _Data, t: int, roof: dict) -> tuple[float, str, float]:
    """Exact MaxSim top-10, GFLOP = 2 * 32 * 128 * 128 * n_docs per query."""
    from retrieval_prune.index.ops import maxsim_search

    d, off = data.docs_f32()
    q, qoff = data.queries(MAXSIM_BATCH)
    maxsim_search(q, qoff, d[: 4 * T], off[:5], 10)  # compile
    dt = _best_time(lambda: maxsim_search(q, qoff, d, off, 10), repeats=3)
    gflops = MAXSIM_BATCH * 2.0 * NQ * T * DIM * data.n_docs / dt / 1e9
    return gflops, "GFLOP/s", gflops / roof["sgemm_gflops"]


#: name -> benchmark function, in report order
BENCHES: dict[str, Callable[[_Data, int, dict], tuple[float, str, float]]] = {
    "maxsim_f32": bench_maxsim_f32,
}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def run(
    threads: Sequence[int] = (1, 2),
    n_docs: int = 10_000,
    seed: int = 0,
    progress: bool = True,
    kernels: Sequence[str] | None = None,
) -> dict:
    """Measure roofs and kernels for every thread count; returns the JSON-ready dict.

    Parameters
    ----------
    threads : thread counts to measure (each >= 1)
    n_docs : documents of the MaxSim workloads (32 query x 128 document tokens, d=128)
    seed : seed of the synthetic data
    progress : print progress lines to stderr
    kernels : subset of :data:`BENCHES` names (default: all)
    """
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
    machine["data"] = "synthetic: normalised standard-normal vectors, seeded"
    machine["workload"] = {
        "query_tokens": NQ,
        "doc_tokens": T,
        "dim": DIM,
        "n_docs": n_docs,
        "maxsim_batch_queries": MAXSIM_BATCH,
        "centroids": K_CENTROIDS,
        "hamming_codes": N_HAMMING,
    }
    machine["clock_ghz_est"] = {}
    out: dict = {"machine": machine, "roofs": {}, "kernels": {n: {} for n in names}}
    data = _Data(n_docs, seed)
    rng = np.random.default_rng(seed + 1)
    say("allocating the 1 GiB read-bandwidth array")
    big = np.ones(READ_BYTES // 8, np.uint64)
    try:
        for t in threads:
            key = str(t)
            numba.set_num_threads(t)
            say(f"roofs, {t} thread(s)")
            roof = {"sgemm_gflops": roof_sgemm(t, rng), "read_gbps": roof_read(t, big)}
            machine["clock_ghz_est"][key] = clock_ghz(t)
            out["roofs"][key] = roof
            say(f"  sgemm {roof['sgemm_gflops']:.1f} GFLOP/s, read {roof['read_gbps']:.1f} GB/s")
            for name in names:
                numba.set_num_threads(t)
                env = {**roof, "clock_ghz": machine["clock_ghz_est"][key]}
                thr, unit, ratio = BENCHES[name](data, t, env)
                out["kernels"][name][key] = {
                    "throughput": float(thr),
                    "unit": unit,
                    "ratio_to_roof": float(ratio),
                }
                say(f"  {name:18s} {thr:14.4g} {unit:8s} ratio {ratio:.3f}")
    finally:
        numba.set_num_threads(prev_threads)
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
    a = p.parse_args(argv)
    res = run(a.threads, a.n_docs, a.seed, progress=not a.quiet, kernels=a.kernels)
    text = json.dumps(res, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
