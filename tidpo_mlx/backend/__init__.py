"""The backend registry: which implementation runs the model here, and what it sets up in the process.

A backend has two halves, registered as a :class:`Backend`:

- its process set-up (``tune``), which must run before anything imports
  mlx: :func:`tune_process` runs every backend's (``tidpo_mlx.setup`` is this
  function). This module imports no mlx, so it can;
- its runtime builder, a module with ``applies(cfg) -> bool`` and
  ``build(model, cfg, name, reference) -> Runtime``, imported when
  :func:`select` first asks it (after mlx).

:func:`select` asks the backends in order and returns the first one's
runtime (:class:`tidpo_mlx.runtime.Runtime`), checked against the model's own
forward. Only the runtime's users import this package; the portable core
(data, losses, importance, objective, runtime) never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Callable

from tidpo_mlx.backend.cpu import process as cpu_process

if TYPE_CHECKING:
    import mlx.nn as nn

    from tidpo_mlx.config import Config
    from tidpo_mlx.models import Reference
    from tidpo_mlx.runtime import Runtime


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One registered backend (see the module docstring)."""

    name: str
    builder: str
    """Module with ``applies(cfg)`` and ``build(model, cfg, name, reference)``."""
    tune: Callable[[], None] = _nothing
    """Process set-up, run before mlx is imported."""
    status: Callable[[], dict[str, str]] = field(default=dict)
    """What ``tune`` did, by ``tidpo-mlx doctor``'s line label."""
    slow_advice: Callable[[], str] | None = None
    """What to do when matmuls on MLX's CPU device run slow (doctor)."""


BACKENDS: tuple[Backend, ...] = (
    Backend("cpu", "tidpo_mlx.backend.cpu.runtime", cpu_process.tune, cpu_process.status, cpu_process.slow_advice),
    Backend("portable", "tidpo_mlx.backend.portable"),
)
"""The registry, in the order :func:`select` asks (the portable backend applies everywhere)."""


def tune_process() -> None:
    """Set this process up for MLX: every backend's ``tune`` (on Linux: the fast OpenBLAS before MLX, glibc's
    malloc tuned for MLX's allocator; elsewhere nothing). Call it before anything imports mlx; calling it again
    does nothing."""
    for backend in BACKENDS:
        backend.tune()


def process_status() -> dict[str, str]:
    """What :func:`tune_process` did, by doctor's line label (``blas``, ``malloc``)."""
    return {label: text for backend in BACKENDS for label, text in backend.status().items()}


def slow_advice() -> str:
    """What to do when matmuls on MLX's CPU device run slow."""
    return next((b.slow_advice() for b in BACKENDS if b.slow_advice is not None), "close other jobs.")


def select(model: nn.Module, cfg: Config, name: str = "model", reference: Reference | None = None) -> Runtime:
    """The runtime of ``model`` for ``cfg``: the first registered backend that applies builds it, checked
    (in eval mode) against the model's own forward.

    ``reference``: the policy's reference (``models.attach_trainable`` returns
    it); None: the model as it is (LoRA layers, if any, switched off).
    ``name`` labels error messages.
    """
    from tidpo_mlx.models import Reference, eval_mode
    from tidpo_mlx.runtime import check

    builder = next(m for m in (import_module(b.builder) for b in BACKENDS) if m.applies(cfg))
    with eval_mode(model):
        rt = builder.build(model, cfg, name, reference if reference is not None else Reference(model))
        check(rt, name)
    return rt
