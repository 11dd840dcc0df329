"""The CPU backend's process set-up: the fast BLAS and glibc's malloc tuning, before mlx is imported.

Imports no mlx (the BLAS takes effect only when loaded before MLX is). The
registry (``tidpo_mlx.backend.tune_process``) calls :func:`tune`;
``tidpo-mlx doctor`` reports :func:`status` and :func:`slow_advice`.
"""

from __future__ import annotations

from tidpo_mlx.backend.cpu import allocator, blas


def tune() -> None:
    """Load OpenBLAS before MLX and tune malloc for MLX's allocator (each once; no-ops where they do not apply)."""
    blas.preload()
    allocator.tune()


def status() -> dict[str, str]:
    """What :func:`tune` did, by doctor's line label."""
    state = blas.STATUS
    return {"blas": f"{state.state}{': ' + state.detail if state.detail else ''}", "malloc": allocator.STATUS}


def slow_advice() -> str:
    """What to do when MLX's CPU matmuls run slow, given what :func:`tune` did."""
    state = blas.STATUS.state
    if state == "not attempted":
        return "tidpo_mlx.setup() was not called: call it first, before anything imports mlx."
    if state == "too late":
        return "mlx was imported before tidpo_mlx.setup(): call it first, before anything imports mlx."
    if state == "disabled":
        return f"unset {blas.OPT_OUT_ENV} to load the fast OpenBLAS."
    if state == "unusable":
        return f"{blas.REINSTALL}, then rerun doctor."
    if state in ("missing", "failed"):
        return "pip install cmeel-openblas (a Linux dependency of tidpo-mlx), then rerun doctor."
    return "the machine is busy or has few cores; close other jobs."
