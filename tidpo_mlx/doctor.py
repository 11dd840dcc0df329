"""``tidpo-mlx doctor``: what MLX runs on here, how fast, and what to do when it is slow."""

from __future__ import annotations

import platform
import time
from importlib import metadata

import mlx.core as mx

from tidpo_mlx import backend

SLOW_GFLOPS = 50.0


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 ``n x n`` matmul speed on the default device, in GFLOP/s."""
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - tic) / 1e9


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[str]:
    """Lines of the doctor report."""
    device = mx.default_device()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    gflops = gemm_gflops()
    process = backend.process_status()
    lines = [
        f"platform:   {platform.system()} {platform.machine()}, Python {platform.python_version()}",
        f"mlx:        {_version('mlx')} (backend: {'metal' if mx.metal.is_available() else 'cpu'}; default device {device})",
        f"mlx-lm:     {_version('mlx-lm')}",
        f"device:     {info.get('device_name', 'unknown')} ({info.get('architecture', '?')})",
        *(f"{label + ':':<12}{text}" for label, text in process.items()),
        f"gemm fp32:  {gflops:.1f} GFLOP/s (1024 x 1024 matmul)",
    ]
    if device.type == mx.DeviceType.cpu and gflops < SLOW_GFLOPS:
        lines.append(f"slow:       matmuls run below {SLOW_GFLOPS:.0f} GFLOP/s: {backend.slow_advice()}")
    else:
        lines.append("status:     ok")
    return lines
