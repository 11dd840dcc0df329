"""The training loop: compiled step, accumulation, clipping, eval, checkpoints, resume.

:func:`load_run` loads everything a run needs into a :class:`Run` (its
model as a :class:`~tidpo_mlx.runtime.Runtime` from the backend registry);
:func:`train` is the loop. Randomness is a function of (seed, step): batch
order, dropout and random weights are reseeded per micro-batch and anchors
per step, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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

from tidpo_mlx import backend
from tidpo_mlx.anchors import AnchorSource, anchor_origins
from tidpo_mlx.batching import Layout, batch_order, collate, iterate_batches
from tidpo_mlx.checkpoint import (
    Existing, check_resume, checkpoint_dirs, claim_output, clear_earlier_run, fingerprint, load_checkpoint,
    restore_checkpoint, save_checkpoint, set_aside_newer,
)
from tidpo_mlx.config import Config, Switch, save_config
from tidpo_mlx.data import Dataset, Example, PairEncoder, load_dataset
from tidpo_mlx.errors import TrainingError
from tidpo_mlx.evaluation import HeldOut, pad_id_of
from tidpo_mlx.files import FileLock, atomic_write_text
from tidpo_mlx import memory, memory_guard, reporting, samples
from tidpo_mlx.interrupts import Interrupted, StopRequest, Stopped, check
from tidpo_mlx.metrics import MemoryReadings, MetricsLog, all_finite, pair_metrics
from tidpo_mlx.models import (
    adapter_config, attach_trainable, load_adapter_weights, load_base, load_tokenizer, resolve_model, save_adapters,
)
from tidpo_mlx.objective import batch_objective
from tidpo_mlx.runtime import RowLayout, Runtime
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


def compile_steps(rt: Runtime, cfg: Config, opt: optim.Optimizer) -> tuple[Callable, Callable]:
    """The compiled micro-step ``(batch, layout) -> (loss, aux, grads)`` and update ``grads -> None``.

    The micro-step differentiates ``batch_objective`` with respect to the
    trainable (LoRA) parameters, compiled once per layout (with and without
    anchor rows); the update clips the global norm to ``max_grad_norm`` and
    applies the optimizer. Both compile with the runtime's state
    (:meth:`~tidpo_mlx.runtime.Runtime.compile`).
    """
    model = rt.model
    compiled: dict[Layout, Callable] = {}

    def grad_step(batch: dict[str, mx.array], layout: Layout) -> tuple[mx.array, dict[str, mx.array], Any]:
        if layout not in compiled:
            value_and_grad = nn.value_and_grad(model, lambda b: batch_objective(rt, cfg, b, layout))

            def step(b: dict[str, mx.array]) -> tuple[mx.array, dict[str, mx.array], Any]:
                (loss, aux), grads = value_and_grad(b)
                return loss, aux, grads

            compiled[layout] = rt.compile(step)
        return compiled[layout](batch)

    @partial(rt.compile, state=[opt.state])
    def apply_step(grads: Any) -> None:
        if cfg.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(model, grads)

    return grad_step, apply_step


def _global_norm(grads: Any) -> mx.array:
    return mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))


@dataclass
class Run:
    """Everything a training run needs, loaded by :func:`load_run`."""

    cfg: Config
    world: Any
    out: Path
    model_path: Path
    rt: Runtime
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
    memory: MemoryReadings
    lock: FileLock | None
    """Rank 0's lock on ``out``, held until :meth:`close`."""

    @property
    def lead(self) -> bool:
        """Whether this process is rank 0 (writes files, logs)."""
        return self.world.rank() == 0

    def write(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl`` and the ``report_to`` reporters (rank 0)."""
        if self.metrics is not None:
            self.metrics.write(record)

    def close(self) -> None:
        """Finish the reporters and release the output folder's lock."""
        try:
            if self.metrics is not None:
                self.metrics.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def save(self, step: int) -> Path:
        """Checkpoint this step (rank 0 writes; every rank gets the path)."""
        if self.lead:
            save_checkpoint(self.out, step, self.rt.model, self.opt, self.adapter_config, self.cfg.save_total_limit,
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


def load_run(cfg: Config, resume: str | None = None, existing: Existing = "refuse", force: bool = False,
             log: Callable[[str], None] = print) -> Run:
    """Check the output folder, data and (with ``resume``) the checkpoint, then load weights and optimizer.

    Everything a user can get wrong is checked before the weights load: the
    ``report_to`` packages, the output folder (claimed and locked by
    :func:`~tidpo_mlx.checkpoint.claim_output` with ``existing``; the
    returned :class:`Run` holds the lock until :meth:`Run.close`), the data
    (encoded with the tokenizer alone) and, with ``resume`` (``""``: the
    newest checkpoint, or a checkpoint's name), the checkpoint's files and
    fingerprint (``force``: go on when keys differ).
    """
    world = mx.distributed.init()
    if cfg.batch_size % world.size():
        raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {world.size()} ranks")
    reporters = reporting.require(cfg.report_to)
    lead = world.rank() == 0
    if not lead:
        log = lambda message: None  # noqa: E731
    named, lock = Path(cfg.adapter_path), None
    out = named
    if lead:
        out, lock, note = claim_output(named, existing, resume is not None)
        if note:
            log(note)
    try:
        return _load(dataclasses.replace(cfg, adapter_path=str(out)), world, out, lock, reporters, resume, existing,
                     force, log)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _load(cfg: Config, world: Any, out: Path, lock: FileLock | None, reporters: list[str], resume: str | None,
          existing: Existing, force: bool, log: Callable[[str], None]) -> Run:
    """:func:`load_run` once the output folder is claimed."""
    lead = world.rank() == 0
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
    run_keys = fingerprint(cfg, data.train, data.valid)
    ckpt = None
    if lead and resume is not None:
        ckpt = load_checkpoint(out, resume, log)
        check_resume(ckpt, run_keys, force, log)
    if lead:
        note = set_aside_newer(out, ckpt) if ckpt is not None else clear_earlier_run(out, existing)
        if note:
            log(note)
        out.mkdir(parents=True, exist_ok=True)

    model, _, notes = load_base(model_path, Switch.TRUE if cfg.fine_tune_type == "full" else cfg.dequantize)
    reference = attach_trainable(model, cfg)
    if cfg.resume_adapter_file:
        load_adapter_weights(model, cfg.resume_adapter_file)
    rt = backend.select(model, cfg, str(model_path), reference)
    recompute = grad_checkpoint(rt, cfg, data.train, world.size())
    if recompute.on:
        rt = rt.whole_rows()
        memory.recompute_blocks(model)
    log(f"model: {cfg.model} -> {model_path}")
    for note in notes + rt.notes + [recompute.note]:
        log(f"  {note}")
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    start = restore_checkpoint(ckpt, model, opt, world) if resume is not None else 0
    metrics = None
    if lead:
        save_config(cfg, out / "config.yaml")
        sinks = reporting.open_sinks(reporters, out, cfg.project_name, cfg.to_dict(), start, log)
        metrics = MetricsLog(out / "metrics.jsonl", keep_until=start if resume is not None else None, log=log,
                             sinks=sinks)
        if cfg.sample_every:
            samples.keep_samples(out / samples.FILE, start if resume is not None else None, log)
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
        cfg, world, out, model_path, rt, tokenizer, data, PairEncoder(tokenizer, cfg), pad_id_of(tokenizer),
        opt, start, adapter_config(cfg, model_path), run_keys, metrics, log, MemoryReadings(log), lock,
    )


def grad_checkpoint(rt: Runtime, cfg: Config, train: list[Example], ranks: int) -> memory.Checkpointing:
    """Whether to recompute blocks (``memory.decide``) for the largest micro-step of the run, as ``rt`` runs it.

    Called with the trainable weights attached (their optimizer state counts).
    The micro-steps are known before training: the length-sorted batches of
    ``batch_order`` (an epoch only reorders them), each rank's share of one.
    Recomputation runs whole rows (the shared prefix would recompute the
    prompt pass apart from its keys), so ``auto`` stays off under
    ``shared_prefix: true``.
    """
    facts, model = rt.facts, rt.model
    shared = facts.layout is RowLayout.SHARED_PREFIX
    rows = 3 if cfg.triplet_on else 2
    micro = [[train[i] for i in idx[rank::ranks]]
             for idx in batch_order(train, cfg.batch_size, cfg.seed, 0) for rank in range(ranks)]
    extent = max((memory.Extent.of(m, rows, shared) for m in micro if m),
                 key=lambda e: memory.activation_bytes(model, facts.backward_blocks, e, facts.score_matrix))
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    return memory.decide(cfg.grad_checkpoint, model, facts, extent, trainable,
                         keep_shared_prefix=cfg.shared_prefix is Switch.TRUE)


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
        loss, aux, g = grad_step(*run.rt.layout_batch(collate(examples, run.pad_id, sampled)))
        mx.eval(loss, aux, g)
        check()
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
    mx.eval(run.rt.model.parameters(), run.opt.state)
    dt = time.perf_counter() - tic
    record.update(
        step=step, grad_norm=norm, lr=run.opt.learning_rate.item(), tokens_per_s=ntoks.item() / dt, step_time=dt,
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
    training callback. Ctrl-C or SIGTERM anywhere (a step, a held-out pass,
    anchor sampling, the first step's compilation) checkpoints the last
    finished step and raises :class:`~tidpo_mlx.interrupts.Interrupted`.
    """
    run = load_run(cfg, resume, existing, force, log)
    try:
        with StopRequest(run.log, run.world) as stop:
            return _train(run, stop, progress, on_step)
    finally:
        run.close()


def _train(run: Run, stop: StopRequest, progress: bool,
           on_step: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    """:func:`train` on a loaded run: held-out pass, the steps, held-out pass, the adapters."""
    cfg, model = run.cfg, run.rt.model
    held_out = HeldOut(run.rt, cfg, run.data.valid, run.pad_id, run.world)
    done = saved = run.start  # the last finished step, and the last one checkpointed
    bar = _progress(cfg.iters, run.start, progress and run.lead)
    try:
        before = _held_out(run, held_out, 0, "before") if run.start == 0 else None
        if run.start == 0:
            _samples(run, 0)
        grad_step, apply_step = compile_steps(run.rt, cfg, run.opt)
        micro_batches = run.batches(run.start * cfg.grad_accumulation_steps)
        anchors = AnchorSource(model, run.tokenizer, run.encoder, cfg, run.upcoming)
        t_train = time.perf_counter()
        with train_mode(model):
            for step in range(run.start + 1, cfg.iters + 1):
                record = optimizer_step(run, step, micro_batches, anchors, grad_step, apply_step)
                record.update(run.memory())
                memory_guard.after_step(cfg.clear_cache_threshold)
                done = step
                _report(run, bar, step, record, on_step)
                if cfg.steps_per_eval and step % cfg.steps_per_eval == 0 and step != cfg.iters:
                    _held_out(run, held_out, step, f"step {step}")
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.iters):
                    _samples(run, step)
                if (cfg.steps_per_save and step % cfg.steps_per_save == 0) or step == cfg.iters:
                    run.save(step)
                    saved = step
                if stop.agreed(run.world):
                    raise Stopped(stop.signal_name or "another rank's signal")
        seconds = time.perf_counter() - t_train
        after = _held_out(run, held_out, cfg.iters, "after")
    except Stopped as stopped:
        if done > saved:
            run.save(done)
        checkpoint = run.out / "checkpoints" / f"step-{done:06d}" if done else None
        raise Interrupted(stopped.signal_name, done, cfg.iters, checkpoint, run.out) from None
    finally:
        if bar is not None:
            bar.close()
    if run.lead:
        save_adapters(model, run.out, run.adapter_config)
        summary = {"before": before, "after": after, "train_seconds": seconds, "ranks": run.world.size(),
                   "data": run.data.summary()}
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))
    return TrainResult(run.out, run.model_path, cfg.iters, seconds, before, after)


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Run this block with the model in training mode (dropout on); its earlier mode comes back after."""
    training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(training)


def _samples(run: Run, step: int) -> None:
    """The policy's greedy answers to the first ``sample_prompts`` held-out prompts into ``samples.jsonl`` (rank 0,
    ``sample_every`` set)."""
    if run.lead and run.cfg.sample_every:
        samples.log_samples(run.rt.model, run.tokenizer, run.data.valid[:run.cfg.sample_prompts], run.cfg, step,
                            run.out / samples.FILE)


def _held_out(run: Run, held_out: HeldOut, step: int, when: str) -> dict[str, float] | None:
    """One held-out pass (``None`` when ``val_batches`` leaves no pairs, said once, before the first step)."""
    if held_out.pairs == 0:
        if when == "before":
            run.log(f"held-out: skipped (val_batches {run.cfg.val_batches}: no held-out pairs evaluated)")
        return None
    tic = time.perf_counter()
    metrics = held_out(policy_is_reference=not run.cfg.resume_adapter_file) if when == "before" else held_out()
    run.write({"step": step, "split": "valid", **metrics})
    pairs = f"{held_out.pairs} pairs, " if when == "before" else ""
    run.log(f"held-out {when} ({pairs}{time.perf_counter() - tic:.1f} s): {_fmt(metrics)}")
    return metrics


def _report(run: Run, bar: Any, step: int, record: dict[str, float],
            on_step: Callable[[int, dict[str, float]], None] | None) -> None:
    """A step's record to ``metrics.jsonl`` and the reporters, the progress bar and ``on_step``."""
    run.write(record)
    if bar is not None:
        shown = "memory/rss_gb" if "memory/rss_gb" in record else "memory/active_gb"
        bar.set_postfix({"loss": f"{record['loss']:.4f}", "acc": f"{record['rewards/accuracies']:.2f}",
                         "tok_s": f"{record['tokens_per_s']:.0f}", shown.split("/")[1]: f"{record[shown]:.2f}"})
        bar.update(1)
    if on_step is not None:
        on_step(step, record)


def _fmt(metrics: dict[str, float]) -> str:
    keys = ["policy_preference_accuracy", "rewards/accuracies", "rewards/margins"]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
