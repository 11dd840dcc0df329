"""Checkpoints of a run: adapters, optimizer state and step, saved atomically and restored on resume.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary
name and renamed into place, so a crash leaves either the complete folder
or none. Under ``mlx.launch`` rank 0 reads the files and broadcasts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from tidpo_mlx.errors import TrainingError
from tidpo_mlx.files import atomic_save_safetensors, atomic_write_text, fsync_dir
from tidpo_mlx.models import load_adapter_weights, save_adapters

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: optim.Optimizer, config: dict[str, Any], keep: int) -> Path:
    """Adapters, optimizer state and step, written to a temp folder and renamed into place."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapters(model, tmp, config)
    atomic_save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(opt.state)))
    atomic_write_text(tmp / "state.json", json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)
    for old in checkpoint_dirs(out)[: -max(keep, 1)]:
        shutil.rmtree(old)
    return final


def restore_checkpoint(out: Path, model: nn.Module, opt: optim.Optimizer, world: Any) -> int:
    """Load the newest checkpoint into ``model`` and ``opt``; return its step.

    Rank 0 reads the files and broadcasts weights, optimizer state and step
    (an ``all_sum`` with zeros elsewhere), so other machines need no copy.
    """
    step = mx.array(0)
    if world.rank() == 0:
        found = checkpoint_dirs(out)
        if not found:
            raise TrainingError(f"{out}: --resume given but there is no checkpoint in {out / CHECKPOINTS}")
        last = found[-1]
        load_adapter_weights(model, last)
        opt.state = tree_unflatten(list(mx.load(str(last / "optimizer.safetensors")).items()))
        step = mx.array(int(json.loads((last / "state.json").read_text())["step"]))
    if world.size() > 1:
        def share(tree: Any) -> Any:
            """Rank 0's values everywhere, in a key order every rank agrees on."""
            flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
            return tree_unflatten([
                (k, mx.distributed.all_sum(v if world.rank() == 0 else mx.zeros_like(v), stream=mx.cpu))
                for k, v in flat
            ])

        model.update(share(model.trainable_parameters()))
        opt.state = share(opt.state)
        step = share({"step": step})["step"]
        mx.eval(model.parameters(), opt.state)
    return int(step.item())
