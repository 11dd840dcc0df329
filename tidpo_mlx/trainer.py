"""The training loop: compiled step, accumulation, clipping, eval, checkpoints, resume.

:func:`prepare` loads everything a run needs into a :class:`Run`;
:func:`train` is the loop. Randomness is a function of (seed, step): batch
order, dropout and random weights are reseeded per micro-batch and anchors
per step, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from tidpo_mlx.anchors import AnchorSource, anchor_origins
from tidpo_mlx.batching import Layout, batch_order, collate, iterate_batches
from tidpo_mlx.checkpoint import (
    Existing, check_resume, checkpoint_dirs, clear_earlier_run, fingerprint, load_checkpoint, output_folder,
    restore_checkpoint, save_checkpoint, set_aside_newer,
)
from tidpo_mlx.config import Config, save_config
from tidpo_mlx.data import Dataset, Example, PairEncoder, load_dataset
from tidpo_mlx.errors import TrainingError
from tidpo_mlx.evaluation import HeldOut, pad_id_of
from tidpo_mlx.files import atomic_write_text
from tidpo_mlx import memory
from tidpo_mlx.forward import Forward, make_forward
from tidpo_mlx.metrics import MetricsLog, all_finite, pair_metrics, peak_memory_gb
from tidpo_mlx.models import (
    adapter_config, attach_trainable, load_adapter_weights, load_base, load_tokenizer, on_cpu, resolve_model,
    save_adapters,
)
from tidpo_mlx.objective import batch_objective
from tidpo_mlx.seeds import MICRO_BATCH, derive_seed


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    adapter_path: Path
    model_path: Path
    steps: int
    seconds: float
    before: dict[str, float] | None
    """Held-out metrics before the first step (``None``: resumed, or ``val_batches`` 0)."""
    after: dict[str, float] | None
    """Held-out metrics after the last step (``None``: ``val_batches`` 0)."""


def learning_rate_schedule(cfg: Config) -> Callable[[mx.array], mx.array]:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` (the first step already at
    ``lr / (warmup_steps + 1)``), then constant, cosine or linear decay to 0 at ``iters``."""
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    span = max(cfg.iters - warm, 1)

    def schedule(step: mx.array) -> mx.array:
        step = mx.array(step, dtype=mx.float32)
        progress = mx.clip((step - warm) / span, 0.0, 1.0)
        if cfg.lr_schedule == "cosine":
            decayed = peak * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif cfg.lr_schedule == "linear":
            decayed = peak * (1.0 - progress)
        else:
            decayed = mx.array(peak, dtype=mx.float32)
        return mx.where(step < warm, peak * (step + 1.0) / (warm + 1.0), decayed)

    return schedule


def build_optimizer(cfg: Config) -> optim.Optimizer:
    """The configured optimizer with the configured schedule (MLX's defaults otherwise)."""
    lr = learning_rate_schedule(cfg)
    if cfg.optimizer == "rmsprop":
        return optim.RMSprop(learning_rate=lr)
    if cfg.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)
    return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)


def compile_steps(fwd: Forward, cfg: Config, opt: optim.Optimizer) -> tuple[Callable, Callable]:
    """The compiled micro-step ``(batch, layout) -> (loss, aux, grads)`` and update ``grads -> None``.

    The micro-step differentiates ``batch_objective`` with respect to the
    trainable (LoRA) parameters, compiled once per layout (with and without
    anchor rows); the update clips the global norm to ``max_grad_norm`` and
    applies the optimizer.
    """
    model = fwd.model
    reference = model.__dict__.get("_reference_weights", {})
    compiled: dict[Layout, Callable] = {}

    def grad_step(batch: dict[str, mx.array], layout: Layout) -> tuple[mx.array, dict[str, mx.array], Any]:
        if layout not in compiled:
            value_and_grad = nn.value_and_grad(model, lambda b: batch_objective(fwd, cfg, b, layout))

            @partial(mx.compile, inputs=[model.state, mx.random.state, reference], outputs=[model.state, mx.random.state])
            def step(b: dict[str, mx.array]) -> tuple[mx.array, dict[str, mx.array], Any]:
                (loss, aux), grads = value_and_grad(b)
                return loss, aux, grads

            compiled[layout] = step
        return compiled[layout](batch)

    @partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
    def apply_step(grads: Any) -> None:
        if cfg.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(model, grads)

    return grad_step, apply_step


def _global_norm(grads: Any) -> mx.array:
    return mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped the run after a completed step, which was checkpointed."""

    def __init__(self, signal_name: str, step: int, iters: int, checkpoint: Path, folder: Path):
        self.summary = f"stopped by {signal_name} after step {step} of {iters}; checkpoint {checkpoint}"
        super().__init__(f"{self.summary}; continue with --resume {checkpoint.name} --adapter-path {folder}")
        self.signal_name, self.step, self.checkpoint, self.folder = signal_name, step, checkpoint, folder

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that signal ended (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + (signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM)


class StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step; a second one exits at once.

    Python runs signal handlers only between MLX evaluations, so the first
    signal only sets a flag that the loop reads after each step; the second
    calls ``os._exit`` (the last complete checkpoint stays, every file being
    written atomically). Handlers are installed only in the main thread and
    restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.log(f"\n{self.signal_name}: stopping after this step and writing a checkpoint (again: quit at once)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, world: Any) -> bool:
        """Whether any rank was asked to stop: an ``all_sum`` of the flags, so every rank stops at one step."""
        asked = self.signal_name is not None
        if world.size() > 1:
            return mx.distributed.all_sum(mx.array(int(asked)), stream=mx.cpu).item() > 0
        return asked


@dataclass
class Run:
    """Everything a training run needs, loaded by :func:`prepare`."""

    cfg: Config
    world: Any
    out: Path
    model_path: Path
    fwd: Forward
    tokenizer: Any
    data: Dataset
    encoder: PairEncoder
    pad_id: int
    opt: optim.Optimizer
    start: int
    adapter_config: dict[str, Any]
    fingerprint: dict[str, Any]
    metrics: MetricsLog | None
    log: Callable[[str], None]

    @property
    def lead(self) -> bool:
        """Whether this process is rank 0 (writes files, logs)."""
        return self.world.rank() == 0

    def write(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl`` (rank 0)."""
        if self.metrics is not None:
            self.metrics.write(record)

    def save(self, step: int) -> Path:
        """Checkpoint this step (rank 0 writes; every rank gets the path)."""
        if self.lead:
            save_checkpoint(self.out, step, self.fwd.model, self.opt, self.adapter_config, self.cfg.save_total_limit,
                            self.fingerprint)
        return self.out / "checkpoints" / f"step-{step:06d}"

    def batches(self, micro: int) -> Iterator[list[Example]]:
        """This rank's share of the micro-batches from micro-batch ``micro`` on."""
        rank, size = self.world.rank(), self.world.size()
        return (b[rank::size] for b in iterate_batches(self.data.train, self.cfg.batch_size, self.cfg.seed, start=micro))

    def upcoming(self, micro: int, count: int) -> list[list[Example]]:
        """The next ``count`` micro-batches of this rank from ``micro`` (for amortised anchors)."""
        ahead = self.batches(micro)
        return [next(ahead) for _ in range(count)]


def prepare(cfg: Config, resume: str | None = None, existing: Existing = "refuse", force: bool = False,
            log: Callable[[str], None] = print) -> Run:
    """Check the output folder, data and (with ``resume``) the checkpoint, then load weights and optimizer.

    Everything a user can get wrong is checked before the weights load: the
    output folder (:func:`~tidpo_mlx.checkpoint.output_folder` with
    ``existing``), the data (encoded with the tokenizer alone) and, with
    ``resume`` (``""``: the newest checkpoint, or a checkpoint's name), the
    checkpoint's files and fingerprint (``force``: go on when keys differ).
    """
    world = mx.distributed.init()
    if cfg.batch_size % world.size():
        raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {world.size()} ranks")
    lead = world.rank() == 0
    if not lead:
        log = lambda message: None  # noqa: E731
    named = Path(cfg.adapter_path)
    out = named if resume is not None or not lead else output_folder(named, existing)
    if out != named:
        log(f"{named} holds an earlier run; this run writes to {out}")
    cfg = dataclasses.replace(cfg, adapter_path=str(out))
    mx.random.seed(cfg.seed)

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    data = load_dataset(cfg.data, tokenizer, cfg)
    log(
        f"data: {cfg.data}: {len(data.train)} train, {len(data.valid)} valid pairs; "
        f"truncated: {data.truncated_prompts} prompts ({data.pairs_with_dropped_turns} lost earliest turns), "
        f"{data.truncated_responses} responses; skipped invalid: {data.skipped}"
    )
    for note in data.notes:
        log(f"  {note}")
    run_keys = fingerprint(cfg, data.train)
    ckpt = None
    if lead and resume is not None:
        ckpt = load_checkpoint(out, resume, log)
        check_resume(ckpt, run_keys, force, log)
    if lead:
        note = set_aside_newer(out, ckpt) if ckpt is not None else clear_earlier_run(out, existing)
        if note:
            log(note)
        out.mkdir(parents=True, exist_ok=True)

    dequantize = "true" if cfg.fine_tune_type == "full" else cfg.dequantize
    model, _, notes = load_base(model_path, dequantize)
    fwd, forward_notes = make_forward(model, cfg, str(model_path))
    attach_trainable(model, cfg)
    if cfg.resume_adapter_file:
        load_adapter_weights(model, cfg.resume_adapter_file)
    recompute, recompute_note = grad_checkpoint(cfg, fwd, data.train, world.size())
    if recompute:
        fwd = fwd.whole_rows()
        memory.recompute_blocks(model)
    log(f"model: {cfg.model} -> {model_path}")
    for note in notes + forward_notes + [recompute_note]:
        log(f"  {note}")
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    start = restore_checkpoint(ckpt, model, opt, world) if resume is not None else 0
    metrics = None
    if lead:
        save_config(cfg, out / "config.yaml")
        metrics = MetricsLog(out / "metrics.jsonl", keep_until=start if resume is not None else None, log=log)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    resumed = f" (from {ckpt.path})" if ckpt is not None else ""
    log(f"trainable: {n_train / 1e6:.3f} M parameters ({cfg.fine_tune_type}); start at step {start} of {cfg.iters}{resumed}")
    log(f"output: {out} (resolved config in {out / 'config.yaml'})")
    if cfg.triplet_on:
        given, sampled = anchor_origins(data.train, cfg)
        every = "every step" if cfg.anchor_every == 1 else f"{cfg.anchor_every} steps' pairs at a time"
        log(f"triplet (gamma {cfg.gamma:g}): {given} anchors from the data, {sampled} sampled from the policy ({every})")
    if world.size() > 1:
        log(f"distributed: {world.size()} ranks, each {cfg.batch_size // world.size()} of the {cfg.batch_size} pairs of a batch")
    return Run(
        cfg, world, out, model_path, fwd, tokenizer, data, PairEncoder(tokenizer, cfg), pad_id_of(tokenizer),
        opt, start, adapter_config(cfg, model_path), run_keys, metrics, log,
    )


def grad_checkpoint(cfg: Config, fwd: Forward, train: list[Example], ranks: int) -> tuple[bool, str]:
    """Whether to recompute blocks (``memory.decide``) for the largest micro-step of the run, and the log line.

    Called with the trainable weights attached (their optimizer state counts).
    The micro-steps are known before training: the length-sorted batches of
    ``batch_order`` (an epoch only reorders them), each rank's share of one.
    Recomputation runs whole rows (the shared prefix would recompute the
    prompt pass apart from its keys), which the log line says, so ``auto``
    stays off under ``shared_prefix: true``.
    """
    shared = fwd.kind == "shared-prefix"
    rows = 3 if cfg.triplet_on else 2
    blocks = memory.backward_blocks(fwd.model, cfg.num_layers, cfg.uses_attribution)
    plain = on_cpu() and cfg.plain_attention != "false"
    micro = [[train[i] for i in idx[rank::ranks]]
             for idx in batch_order(train, cfg.batch_size, cfg.seed, 0) for rank in range(ranks)]
    extent = max((memory.Extent.of(m, rows, shared) for m in micro if m),
                 key=lambda e: memory.activation_bytes(fwd.model, blocks, e, plain))
    trainable = sum(v.nbytes for _, v in tree_flatten(fwd.model.trainable_parameters()))
    on, note = memory.decide(cfg.grad_checkpoint, fwd.model, blocks, extent, plain, trainable)
    if on and shared and cfg.shared_prefix == "true":
        return False, note.replace("auto: on", "auto: off", 1) + "; kept off for shared_prefix: true"
    return on, note + ("; whole rows instead of the shared prefix" if on and shared else "")


def optimizer_step(run: Run, step: int, micro_batches: Iterator[list[Example]], anchors: AnchorSource,
                   grad_step: Callable, apply_step: Callable) -> dict[str, float]:
    """One optimizer step: ``grad_accumulation_steps`` micro-batches, all-reduce, clip, update; its metrics."""
    cfg, size = run.cfg, run.world.size()
    tic = time.perf_counter()
    grads, pairs, ntoks, sources = None, [], mx.array(0.0), []
    for j in range(cfg.grad_accumulation_steps):
        micro = (step - 1) * cfg.grad_accumulation_steps + j
        examples = next(micro_batches)
        sources.append(f"{examples[0].source}..")
        sampled = anchors.for_batch(step, micro, examples) if cfg.triplet_on else None
        mx.random.seed(derive_seed(cfg.seed, micro, MICRO_BATCH))
        loss, aux, g = grad_step(*run.fwd.prepare(collate(examples, run.pad_id, sampled)))
        mx.eval(loss, aux, g)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        ntoks = ntoks + aux.pop("ntoks")
        pairs.append(aux)
    if cfg.grad_accumulation_steps > 1:
        grads = tree_map(lambda x: x / cfg.grad_accumulation_steps, grads)
    per_pair = {k: mx.concatenate([a[k] for a in pairs]) for k in pairs[0]}
    if size > 1:
        grads = average_gradients(grads)
        per_pair = {k: mx.distributed.all_gather(v, stream=mx.cpu) for k, v in per_pair.items()}
        ntoks = mx.distributed.all_sum(ntoks, stream=mx.cpu)
    norm = _global_norm(grads).item()
    record = pair_metrics(per_pair)
    if not (all_finite(record) and math.isfinite(norm)):
        last = checkpoint_dirs(run.out)
        kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written"
        raise TrainingError(
            f"non-finite loss or gradient at step {step} (batch starting at {sources[0]}); "
            f"nothing saved for this step, {kept}"
        )
    apply_step(grads)
    mx.eval(run.fwd.model.parameters(), run.opt.state)
    dt = time.perf_counter() - tic
    record.update(
        step=step, grad_norm=norm, lr=run.opt.learning_rate.item(), tokens_per_s=ntoks.item() / dt, step_time=dt,
        peak_memory_gb=peak_memory_gb(),
    )
    return record


def train(
    cfg: Config,
    resume: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    existing: Existing = "refuse",
    force: bool = False,
) -> TrainResult:
    """Run a full training job as configured; return where the adapters are and what was measured.

    ``resume``: ``None`` starts a new run (``existing`` says what happens to a
    run already in the folder), ``""`` continues from the newest checkpoint,
    a name (``step-000040``) from that one; ``force`` continues one written
    with other settings. ``on_step(step, metrics)`` is called after every
    optimizer step (before that step's eval and checkpoint), like mlx-lm's
    training callback. Ctrl-C or SIGTERM checkpoints the step in progress
    and raises :class:`Interrupted`.
    """
    run = prepare(cfg, resume, existing, force, log)
    cfg, log, model = run.cfg, run.log, run.fwd.model
    t = time.perf_counter()
    held_out = HeldOut(run.fwd, cfg, run.data.valid, run.pad_id, run.world)
    evaluate = held_out.pairs > 0
    if not evaluate:
        log(f"held-out: skipped (val_batches {cfg.val_batches}: no held-out pairs evaluated)")
    before = None
    if run.start == 0 and evaluate:
        before = held_out(policy_is_reference=not cfg.resume_adapter_file)
        log(f"held-out before ({held_out.pairs} pairs, {time.perf_counter() - t:.1f} s): {_fmt(before)}")
        run.write({"step": 0, "split": "valid", **before})
    grad_step, apply_step = compile_steps(run.fwd, cfg, run.opt)
    micro_batches = run.batches(run.start * cfg.grad_accumulation_steps)
    anchors = AnchorSource(model, run.tokenizer, run.encoder, cfg, run.upcoming)
    bar = _progress(cfg.iters, run.start, progress and run.lead)
    t_train = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        with StopRequest(log) as stop:
            for step in range(run.start + 1, cfg.iters + 1):
                record = optimizer_step(run, step, micro_batches, anchors, grad_step, apply_step)
                run.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                if on_step is not None:
                    on_step(step, record)
                if evaluate and cfg.steps_per_eval and step % cfg.steps_per_eval == 0 and step != cfg.iters:
                    val = held_out()
                    run.write({"step": step, "split": "valid", **val})
                    log(f"step {step} held-out: {_fmt(val)}")
                due = (cfg.steps_per_save and step % cfg.steps_per_save == 0) or step == cfg.iters
                checkpoint = run.save(step) if due else None
                if stop.agreed(run.world):
                    checkpoint = checkpoint or run.save(step)
                    raise Interrupted(stop.signal_name or "another rank's signal", step, cfg.iters, checkpoint, run.out)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_train
    t = time.perf_counter()
    after = None
    if evaluate:
        after = held_out()
        run.write({"step": cfg.iters, "split": "valid", **after})
        log(f"held-out after ({time.perf_counter() - t:.1f} s): {_fmt(after)}")
    if run.lead:
        save_adapters(model, run.out, run.adapter_config)
        summary = {"before": before, "after": after, "train_seconds": seconds, "ranks": run.world.size(),
                   "data": run.data.summary()}
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))
    return TrainResult(run.out, run.model_path, cfg.iters, seconds, before, after)


def _fmt(metrics: dict[str, float]) -> str:
    keys = ["policy_preference_accuracy", "rewards/accuracies", "rewards/margins"]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
