"""Output folders and checkpoints: one run per folder, atomic saves, checked resumes.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` (adapters, optimizer
state, ``state.json`` with the step and the run's fingerprint) written under a
temporary name, fsynced, and renamed into place, so a crash or a full disk
leaves either the complete folder or none, and the previous one intact.

A folder holds one run: a new run into a folder that holds another run's
adapters or checkpoints is refused, written to a fresh sibling, or starts
after moving (or removing) the earlier run, as ``existing`` says. A running
run holds an ``fcntl`` lock on its folder (:func:`claim_output`), so a
second run into it is refused and two bare runs started at once get
different folders; the kernel frees a killed run's lock. A resume
continues only the run that wrote the checkpoint: the fingerprint (every
config key that defines the run, with the content hashes of the training
pairs and of the held-out split) must match unless forced, and a changed
hash names the data files that changed. Under ``mlx.launch`` rank 0 reads
the files and broadcasts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from tidpo_mlx.config import Config
from tidpo_mlx.data import Example
from tidpo_mlx.errors import ModelError, TrainingError, first_line
from tidpo_mlx.files import (
    FileLock, WriteError, atomic_save_safetensors, atomic_write_text, fsync_dir, no_space, space_note,
)
from tidpo_mlx.models import load_adapter_weights, save_adapters

CHECKPOINTS = "checkpoints"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"

Existing = Literal["refuse", "fresh", "move", "remove"]
"""What a new run does with a folder that holds another run: refuse (a one-line error naming the ways
on), fresh (write to ``<folder>-2``, ``-3``, ...), move (the earlier run to ``<folder>.old-<time>``
first) or remove (it first)."""

OPERATIONAL = (
    "adapter_path", "grad_checkpoint", "steps_per_eval", "val_batches", "steps_per_save",
    "save_total_limit", "dequantize", "plain_attention", "shared_prefix", "logits_chunk",
    # the data keys change a run only through its training pairs, which ``train_pairs`` hashes
    "data", "hf_dataset", "skip_invalid", "valid_fraction", "dataset_num_proc",
    "clear_cache_threshold", "report_to", "project_name",
    # a label: the keys a preset sets are fingerprinted themselves
    "preset",
)
"""Config keys left out of a run's fingerprint: where and how it runs, not what it computes."""

FILES = {"train_pairs": "train_files", "valid_pairs": "valid_files"}
"""Fingerprint hashes and the per-file hashes beside them, which name the files behind a changed hash
(recorded, not compared: a moved data folder with the same pairs still resumes)."""

DECAYING = ("cosine", "linear")
"""Learning-rate schedules that decay to 0 at ``iters`` (so changing ``iters`` changes every later rate)."""


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE).exists())


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run's adapters or checkpoints."""
    return (folder / "adapters.safetensors").exists() or bool(checkpoint_dirs(folder))


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist."""
    n, candidate = 2, path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def lock_path(folder: Path) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it, so it stays put when ``--overwrite``
    moves the folder (a finished run removes it; a killed run's stays, unlocked)."""
    return folder.with_name(f".{folder.name}.lock")


def _take(folder: Path) -> FileLock | None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock.take(lock_path(folder))


def _in_use(folder: Path) -> TrainingError:
    return TrainingError(
        f"{folder} is in use by another run ({FileLock.holder(lock_path(folder))}): wait for it to finish or stop "
        "it, or choose another --adapter-path"
    )


def _refusal(folder: Path) -> TrainingError:
    found = checkpoint_dirs(folder)
    what = f"checkpoints up to {found[-1].name}" if found else "adapters"
    return TrainingError(
        f"{folder} holds another run ({what}): continue it with --resume, or pass --overwrite to move it to "
        f"{folder}.old-<time> first, or choose another --adapter-path"
    )


def claim_output(folder: Path, existing: Existing, resuming: bool) -> tuple[Path, FileLock, str | None]:
    """The folder this run writes to, locked for the run's life, and a note for the log when it is not ``folder``.

    Resuming, or with ``existing`` move or remove, the run takes ``folder``
    itself; with refuse a folder that holds another run is refused; with
    fresh the first of ``folder``, ``<folder>-2``, ... that holds no run and
    no other run has locked is locked and taken, so two runs started at once
    never share one. A folder another run has locked is refused (resume,
    refuse, move, remove) naming its process. The caller releases the lock
    when the run ends; a killed run's lock frees itself.
    """
    if existing == "fresh" and not resuming:
        candidate, n = folder, 2
        while True:
            if not holds_run(candidate) and (lock := _take(candidate)) is not None:
                if not holds_run(candidate):
                    break
                lock.release()
            candidate, n = folder.with_name(f"{folder.name}-{n}"), n + 1
        if candidate == folder:
            return folder, lock, None
        why = ("holds an earlier run" if holds_run(folder)
               else f"is in use by another run ({FileLock.holder(lock_path(folder))})")
        return candidate, lock, f"{folder} {why}; this run writes to {candidate}"
    lock = _take(folder)
    if lock is None:
        raise _in_use(folder)
    if existing == "refuse" and not resuming and holds_run(folder):
        lock.release()
        raise _refusal(folder)
    return folder, lock, None


def output_folder(folder: Path, existing: Existing) -> Path:
    """Where a new (not resumed) run writes, given what ``folder`` already holds.

    Raises a :class:`TrainingError` naming the ways on when ``folder`` holds
    another run and ``existing`` is ``refuse``. Nothing is changed on disk
    here; :func:`clear_earlier_run` moves or removes the earlier run.
    """
    if not holds_run(folder) or existing in ("move", "remove"):
        return folder
    if existing == "fresh":
        n = 2
        while holds_run(candidate := folder.with_name(f"{folder.name}-{n}")):
            n += 1
        return candidate
    found = checkpoint_dirs(folder)
    what = f"checkpoints up to {found[-1].name}" if found else "adapters"
    raise TrainingError(
        f"{folder} holds another run ({what}): continue it with --resume, or pass --overwrite to move it to "
        f"{folder}.old-<time> first, or choose another --adapter-path"
    )


def clear_earlier_run(folder: Path, existing: Existing) -> str | None:
    """Move (``move``) or remove (``remove``) the run ``folder`` holds; what was done, for the log."""
    if existing not in ("move", "remove") or not holds_run(folder):
        return None
    try:
        if existing == "remove":
            shutil.rmtree(folder)
            return f"{folder}: earlier run removed"
        aside = _unused(folder.with_name(f"{folder.name}.old-{_stamp()}"))
        folder.rename(aside)
        fsync_dir(folder.parent)
    except OSError as err:
        raise WriteError(f"{folder}: could not clear the earlier run ({err.strerror or err})") from None
    return f"{folder}: earlier run moved to {aside}"


def train_pairs_digest(examples: Sequence[Example]) -> str:
    """SHA-256 of pairs as tokenised (prompt, chosen, rejected, anchor ids), in file order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected, e.anchor]).encode())
    return h.hexdigest()


def source_file(example: Example) -> str:
    """The file (or split) a pair was read from: its ``source`` without the ``:line``."""
    return example.source.rsplit(":", 1)[0]


def files_digests(examples: Sequence[Example]) -> dict[str, str]:
    """:func:`train_pairs_digest` of each source file's pairs, by file."""
    by_file: dict[str, list[Example]] = {}
    for e in examples:
        by_file.setdefault(source_file(e), []).append(e)
    return {name: train_pairs_digest(group) for name, group in by_file.items()}


def fingerprint(cfg: Config, train: Sequence[Example], valid: Sequence[Example]) -> dict[str, Any]:
    """The keys that define a run: every config key but :data:`OPERATIONAL` ones (``lora_parameters.*``
    flattened), plus ``train_pairs`` and ``valid_pairs``, the content hashes of the tokenised training pairs
    and held-out split, with their per-file hashes (:data:`FILES`)."""
    keys: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if key in OPERATIONAL:
            continue
        if isinstance(value, dict):
            keys.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            keys[key] = value
    for (digest, files), examples in zip(FILES.items(), (train, valid)):
        keys[digest] = train_pairs_digest(examples)
        keys[files] = files_digests(examples)
    return json.loads(json.dumps(keys))


def _changed_files(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """What a changed ``train_pairs``/``valid_pairs`` means, naming the files whose pairs changed."""
    split = "training pairs" if key == "train_pairs" else "held-out pairs"
    before, now = old.get(FILES[key]), new[FILES[key]]
    if not isinstance(before, dict):
        return f"the {split} of {', '.join(now) or 'no file'} differ from the checkpoint's"
    changed = [f"{f} (edited)" if f in before else f"{f} (new)" for f in now if before.get(f) != now[f]]
    changed += [f"{f} (gone)" for f in before if f not in now]
    return f"the {split} differ from the checkpoint's: {', '.join(changed) or 'their order'}"


@dataclass
class Checkpoint:
    """A checkpoint read from disk (files checked), ready to be restored."""

    path: Path
    step: int
    run: dict[str, Any] | None
    optimizer: dict[str, mx.array]


def _read(path: Path) -> Checkpoint:
    """Read and check every file of one checkpoint; an exception says which file failed."""
    state_file = path / STATE
    try:
        state = json.loads(state_file.read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state_file}: {first_line(err)}") from None
    arrays = {}
    for name in ("adapters.safetensors", OPTIMIZER):
        try:
            arrays[name] = mx.load(str(path / name))
            mx.eval(arrays[name])
        except (OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path / name}: {first_line(err)}") from None
    return Checkpoint(path, step, state.get("run"), arrays[OPTIMIZER])


def _named(out: Path, name: str) -> Path:
    """The checkpoint ``--resume NAME`` means: ``step-000040``, ``40`` or a path to one in ``out``."""
    root = out / CHECKPOINTS
    given = Path(name)
    if name.isdigit():
        given = root / f"step-{int(name):06d}"
    elif len(given.parts) == 1:
        given = root / name
    if given.resolve().parent != root.resolve() or not (given / STATE).exists():
        found = ", ".join(p.name for p in checkpoint_dirs(out)) or "none"
        raise TrainingError(f"--resume {name}: no such checkpoint in {root} (there: {found})")
    return given


def load_checkpoint(out: Path, name: str | None, log: Callable[[str], None]) -> Checkpoint:
    """The checkpoint to resume from: the one named, or the newest that loads.

    A newest checkpoint whose files fail to load is named in a warning and
    the previous complete one is used; a named one that fails is an error.
    """
    if name:
        path = _named(out, name)
        try:
            return _read(path)
        except ValueError as err:
            raise TrainingError(f"--resume {name}: cannot load {err}") from None
    found = checkpoint_dirs(out)
    if not found:
        raise TrainingError(f"{out}: --resume given but there is no checkpoint in {out / CHECKPOINTS}")
    for path in reversed(found):
        try:
            return _read(path)
        except ValueError as err:
            log(f"warning: checkpoint {path} cannot be loaded ({err}); trying the previous one")
    raise TrainingError(f"{out}: no checkpoint in {out / CHECKPOINTS} can be loaded (see the warnings above)")


def check_resume(ckpt: Checkpoint, current: dict[str, Any], force: bool, log: Callable[[str], None]) -> None:
    """Stop unless ``ckpt`` was written by a run with the keys ``current`` has (``force``: log and go on).

    A longer ``iters`` passes with a constant schedule; a decaying one (cosine,
    linear: 0 at ``iters``) would change every later rate, so it needs ``force``.
    """
    if current["iters"] < ckpt.step:
        raise TrainingError(f"{ckpt.path}: the checkpoint is at step {ckpt.step}, past iters {current['iters']}")
    if ckpt.run is None:
        log(f"note: {ckpt.path} records no fingerprint (written by an older version); settings not checked")
        return
    compared = [k for k in ckpt.run if k in current and k not in FILES.values()]
    differ = {k: (ckpt.run[k], current[k]) for k in compared if ckpt.run[k] != current[k]}
    if "iters" in differ and current["lr_schedule"] not in DECAYING and "lr_schedule" not in differ:
        old, new = differ.pop("iters")
        log(f"resume: iters {old} -> {new} (constant schedule: the rate is unchanged)")
    if not differ:
        return
    listed = ", ".join(_changed_files(k, ckpt.run, current) if k in FILES else f"{k} {a!r} -> {b!r}"
                       for k, (a, b) in sorted(differ.items()))
    if "iters" in differ:
        listed += f" (lr_schedule {current['lr_schedule']} decays to 0 at iters: every later rate changes)"
    if not force:
        raise TrainingError(
            f"{ckpt.path}: --resume with settings that differ from the run that wrote it: {listed}; "
            "use that run's settings, or add --force to continue anyway"
        )
    log(f"--force: continuing {ckpt.path} with changed settings: {listed}")


def set_aside_newer(out: Path, ckpt: Checkpoint) -> str | None:
    """Move the checkpoints newer than ``ckpt`` (another branch of the run) to ``out/set-aside-<time>``."""
    newer = [p for p in checkpoint_dirs(out) if p.name > ckpt.path.name]
    if not newer:
        return None
    aside = _unused(out / f"set-aside-{_stamp()}")
    aside.mkdir()
    for p in newer:
        p.rename(aside / p.name)
    fsync_dir(out / CHECKPOINTS)
    return f"resume from {ckpt.path.name}: the newer checkpoints ({', '.join(p.name for p in newer)}) moved to {aside}"


def save_checkpoint(out: Path, step: int, model: nn.Module, opt: optim.Optimizer, config: dict[str, Any],
                    keep: int, run: dict[str, Any]) -> Path:
    """Adapters, optimizer state, step and fingerprint: written to a temp folder, fsynced, renamed into place.

    A failed write (disk full, permissions) removes the temp folder, keeps
    every complete checkpoint and raises a :class:`WriteError` naming the
    path; on a full disk it says how much the checkpoint needs and how much
    is free.
    """
    root = out / CHECKPOINTS
    needed = checkpoint_bytes(model, opt)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    replaced = root / f".step-{step:06d}.replaced"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapters(model, tmp, config)
        atomic_save_safetensors(tmp / OPTIMIZER, dict(tree_flatten(opt.state)))
        atomic_write_text(tmp / STATE, json.dumps({"step": step, "run": run}))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        fsync_dir(root)
        fsync_dir(out)
    except (OSError, RuntimeError) as err:  # mx.save_safetensors reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced.exists() and not final.exists():
            replaced.rename(final)
        last = checkpoint_dirs(out)
        where = (err.path if isinstance(err, WriteError) else getattr(err, "filename", None)) or tmp
        full = no_space(err, root if root.is_dir() else out.parent, needed)
        if full:
            detail = f"{where}: {space_note(root if root.is_dir() else out.parent, needed, 'the checkpoint')}"
        else:
            detail = first_line(err) if isinstance(err, WriteError) else f"{where}: {first_line(err)}"
        then = "; make room, then continue with --resume" if full and last else ""
        raise WriteError(
            f"checkpoint {final} not written ({detail}); last good checkpoint: {last[-1] if last else 'none'}{then}",
            full, final,
        ) from None
    shutil.rmtree(replaced, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoint_bytes(model: nn.Module, opt: optim.Optimizer) -> int:
    """About what a checkpoint takes on disk: the trainable weights, the optimizer state and a little JSON."""
    arrays = tree_flatten(model.trainable_parameters()) + tree_flatten(opt.state)
    return sum(v.nbytes for _, v in arrays if isinstance(v, mx.array)) + 16_384


def restore_checkpoint(ckpt: Checkpoint | None, model: nn.Module, opt: optim.Optimizer, world: Any) -> int:
    """Load ``ckpt`` (rank 0's; ``None`` elsewhere) into ``model`` and ``opt``; return its step.

    Rank 0 checks the optimizer state against this optimizer and broadcasts
    weights, optimizer state and step (an ``all_sum`` with zeros elsewhere),
    so other machines need no copy.
    """
    step = mx.array(0)
    if ckpt is not None:
        try:
            load_adapter_weights(model, ckpt.path)
        except ModelError as err:
            raise TrainingError(f"{ckpt.path}: {first_line(err)}") from None
        own = dict(tree_flatten(opt.state))
        shapes = {k: tuple(v.shape) for k, v in own.items()}
        if {k: tuple(v.shape) for k, v in ckpt.optimizer.items()} != shapes:
            raise TrainingError(f"{ckpt.path / OPTIMIZER}: the optimizer state does not fit this optimizer and model")
        opt.state = tree_unflatten(list(ckpt.optimizer.items()))
        step = mx.array(ckpt.step)
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
