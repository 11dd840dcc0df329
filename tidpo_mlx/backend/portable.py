"""The portable backend: mlx-lm's own forward with its fused kernels, whole rows (used on Metal).

Its runtime is :class:`tidpo_mlx.runtime.Runtime` itself; it runs every
model and config, so the registry asks it last.
"""

from __future__ import annotations

import mlx.nn as nn

from tidpo_mlx.config import Config
from tidpo_mlx.models import Reference
from tidpo_mlx.runtime import Facts, RowLayout, Runtime

NAME = "portable"


def applies(cfg: Config) -> bool:
    """Always: the fallback of the registry."""
    return True


def build(model: nn.Module, cfg: Config, name: str, reference: Reference) -> Runtime:
    """The portable runtime of ``model`` (fused attention keeps no score matrix)."""
    return Runtime(model, reference, Facts.of(model, cfg, NAME, RowLayout.ROWS, score_matrix=False))
