"""Process set-up on Linux (``tidpo_mlx.setup()``): OpenBLAS before mlx, glibc malloc tuned, both reported by
doctor; importing the package alone changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU setup")

STATUS = "import tidpo_mlx.backend.cpu.blas as b, tidpo_mlx.backend.cpu.allocator as a; print(b.STATUS.state); print(a.STATUS)"
PROBE = f"import tidpo_mlx; tidpo_mlx.setup(); {STATUS}"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TIDPO_MLX_NO_")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True, check=True)


def test_fresh_process_gets_openblas_and_tuned_malloc():
    state, malloc = _run(PROBE).stdout.split("\n")[:2]
    assert state == "openblas"
    assert malloc.startswith("glibc: mmap threshold")


def test_importing_the_package_imports_no_mlx_and_tunes_nothing():
    out = _run(f"import sys, tidpo_mlx; print('mlx.core' in sys.modules); {STATUS}").stdout.split("\n")
    assert out[:3] == ["False", "not attempted", "not attempted"]
    out = _run("import sys, tidpo_mlx.cli; print('mlx.core' in sys.modules); import tidpo_mlx.backend.cpu.blas as b; "
               "print(b.STATUS.state)").stdout.split("\n")
    assert out[0] == "True" and out[1] in ("openblas", "unusable")  # the command line calls setup() first


def test_opt_outs_are_honoured():
    out = _run(PROBE, TIDPO_MLX_NO_OPENBLAS="1", TIDPO_MLX_NO_MALLOPT="1").stdout.split("\n")
    assert out[0] == "disabled" and out[1].startswith("off")


def test_mlx_first_warns():
    res = _run("import mlx.core; import tidpo_mlx; tidpo_mlx.setup(); import tidpo_mlx.backend.cpu.blas as b; "
               "print(b.STATUS.state)")
    assert res.stdout.strip() == "too late"
    assert "Call tidpo_mlx.setup() first" in res.stderr


def test_doctor_reports_blas_and_malloc():
    out = subprocess.run([sys.executable, "-m", "tidpo_mlx.cli", "doctor"], capture_output=True, text=True, check=True).stdout
    assert "blas:       openblas" in out or "blas:       unusable" in out
    assert "malloc:     glibc" in out and "GFLOP/s" in out


def test_openblas_build_target_is_checked_against_the_cpu():
    """cmeel-openblas wheels are single-target builds: one for SKYLAKEX kills an AVX2-only CPU with SIGILL on
    its first matmul, so preload asks the library for its target and loads it only where the CPU has the flags."""
    from tidpo_mlx.backend.cpu import blas

    assert blas.lacking("SKYLAKEX", {"avx2", "fma"}) == "avx512f and avx512bw"
    assert blas.lacking("SKYLAKEX", {"avx2", "fma", "avx512f", "avx512bw"}) == ""
    assert blas.lacking("ZEN", {"sse4_2"}) == "avx2 and fma"
    lib = blas._find("cmeel.prefix/lib/libopenblas.so.0")
    target, missing = blas._build_target(lib)
    assert target in blas.NEEDS or target == "DYNAMIC_ARCH"
    state = _run(PROBE).stdout.split("\n")[0]
    assert state == ("unusable" if missing else "openblas")
    # the loaded library runs a matmul in this process (no SIGILL)
    _run("import tidpo_mlx; tidpo_mlx.setup(); import mlx.core as mx; a = mx.ones((64, 64)); "
         "assert (a @ a).sum().item() == 64 ** 3")
