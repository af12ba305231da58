"""The portable kernels and the other instruction-set variant, tested on purpose on every
host.

``RETRIEVAL_PRUNE_VNNI=0`` turns the AVX-512 VNNI int8 table off; the flag is read once,
when ``retrieval_prune.kernels.simd`` is imported (``HAS_VNNI``), so the kernel tests run
again in a child interpreter with it set. On a host without VNNI this is the path the
default run takes anyway; on a VNNI host it is the only run of the portable dispatch.

``RETRIEVAL_PRUNE_ISA`` forces the kernels' register-blocking variant, also read once at
import: the kernel and index tests run again with the variant this host would not pick
(AVX-512 blocking on an AVX2 host, AVX2 blocking on an AVX-512 one), so the defaults the
index code reaches the kernels with are exercised for both. Either variant is plain LLVM
IR and runs on any x86-64 CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the tests of the float32 / int8 kernels (the int8 table's dispatch included)
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_ivf.py"]


def _probe(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _pytest_passes(env: dict, tests: list[str], timeout: int) -> None:
    """Run ``tests`` in a child pytest under ``env``; they must all pass."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_isa_override_is_read_at_import_and_checked():
    code = (
        "from retrieval_prune.kernels import simd, ops; "
        "print(simd.ISA_NAME, ops.current_isa(), simd.HAS_VNNI, simd.cpu_features()['isa'])"
    )
    for name in ("avx2", "avx512"):
        probe = _probe({**os.environ, "RETRIEVAL_PRUNE_ISA": name}, code)
        assert probe.returncode == 0, probe.stderr
        isa, current, vnni, recorded = probe.stdout.split()
        assert isa == current == recorded == name
        if name == "avx2":
            assert vnni == "False"  # forcing AVX2 also leaves the AVX-512 VNNI table out
    bad = _probe({**os.environ, "RETRIEVAL_PRUNE_ISA": "avx1024"}, code)
    assert bad.returncode != 0 and "RETRIEVAL_PRUNE_ISA='avx1024'" in bad.stderr


def test_a_cached_kernel_is_not_reused_for_the_other_variant():
    """Numba's on-disk cache keys a kernel by its signature; the variant is a defaulted
    argument whose default (``simd.ISA``) is part of that signature, so the index code's
    calls (which omit it) get the forced variant's own compiled kernel."""
    code = (
        "import numpy as np; from retrieval_prune.kernels import codes, simd; "
        "out = np.empty(2 * 16, np.float32); "
        "codes.centroid_table_kernel(np.zeros(16 * 4, np.float32), 1, 4, "
        "np.ones(8, np.float32), 2, out); "
        "print(simd.ISA, codes.centroid_table_kernel.signatures[-1][-1])"
    )
    for name, isa in (("avx512", 1), ("avx2", 0), ("avx512", 1)):  # the last one: cached
        probe = _probe({**os.environ, "RETRIEVAL_PRUNE_ISA": name}, code)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == [str(isa), f"omitted(default={isa})"]


def test_kernel_and_index_tests_pass_with_the_other_isa_variant():
    """The kernels (and the index code, which calls them with their import-time default)
    under the variant this host does not choose by itself."""
    from retrieval_prune.kernels.simd import ISA_NAME

    other = "avx512" if ISA_NAME == "avx2" else "avx2"
    env = {**os.environ, "RETRIEVAL_PRUNE_ISA": other}
    _pytest_passes(env, [*KERNEL_TESTS, "tests/test_compressed_index.py"], 900)


def test_kernel_tests_pass_with_vnni_disabled():
    env = {**os.environ, "RETRIEVAL_PRUNE_VNNI": "0"}
    probe = _probe(env, "from retrieval_prune.kernels.simd import HAS_VNNI; print(HAS_VNNI)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"  # the flag is honoured
    _pytest_passes(env, KERNEL_TESTS, 300)


#: a baseline x86-64 target: SSE2 only (4 float lanes, no FMA), whatever the host has
NARROW = {"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": "+sse2,-avx,-avx2,-fma,-avx512f",
          "RETRIEVAL_PRUNE_NUMBA_CACHE": "0"}  # compiled fresh: no host code from the cache


def test_kernel_tests_pass_with_narrower_lanes():
    """The kernels compiled for 4-lane SSE2 without FMA (another summation order than this
    host's AVX2 or AVX-512) still meet the operand-derived tolerances of the kernel tests."""
    env = {**os.environ, **NARROW}
    probe = _probe(env, "from numba.core import config; from retrieval_prune.kernels.simd "
                        "import HAS_VNNI; print(config.CPU_NAME, HAS_VNNI)")
    assert probe.stdout.split() == ["x86-64", "False"], probe.stdout + probe.stderr
    _pytest_passes(env, KERNEL_TESTS, 600)
