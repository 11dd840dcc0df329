"""The training loop: compiled step, accumulation, clipping, eval, checkpoints, resume.

Randomness is a function of (seed, step): batch order, dropout and random
weights are reseeded per micro-batch and anchors per step, so a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tidpo_mlx.anchors import AnchorSource
from tidpo_mlx.config import Config, save_config
from tidpo_mlx.data import Dataset, Example, PairEncoder, collate, eval_batches, iterate_batches, load_dataset
from tidpo_mlx.metrics import MetricsLog, all_finite, pair_metrics, peak_memory_gb, preference_metrics
from tidpo_mlx.models import (
    adapter_config,
    reference_mode,
    atomic_save_safetensors,
    atomic_write_text,
    attach_trainable,
    embed,
    load_adapter_weights,
    load_base,
    resolve_model,
    save_adapters,
)
from tidpo_mlx.objective import batch_logprobs, batch_objective, to_mx
from tidpo_mlx.prefix import active as shared_prefix_active

CHECKPOINTS = "checkpoints"


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, bad resume state); the message says where."""


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    adapter_path: Path
    model_path: Path
    steps: int
    seconds: float
    before: dict[str, float] | None
    after: dict[str, float]


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


def micro_seed(seed: int, micro: int) -> int:
    """Seed of the global RNG (dropout, random weights) for micro-batch ``micro``."""
    return (seed * 7_919 + micro * 104_729 + 17) % (2**31)


class HeldOut:
    """Held-out metrics from summed response log-probs; reference log-probs computed once.

    Not compiled: held-out batches come in many lengths, and tracing the model
    once per shape costs more than the compiled forward saves.
    """

    def __init__(
        self, model: nn.Module, cfg: Config, examples: list[Example], pad_id: int, world: Any, shared_prefix: bool
    ):
        self.model = model
        self.cfg = cfg
        self.world = world
        self.batches = []
        self.pairs = 0
        for k, b in enumerate(eval_batches(examples, 2 * cfg.batch_size, cfg.val_batches)):
            if k % world.size() == world.rank():
                batch = to_mx(collate(b, pad_id, shared_prefix=shared_prefix))
                self.batches.append((batch, np.arange(self.pairs, self.pairs + len(b))))
            self.pairs += len(b)
        self.ref = None
        if cfg.uses_reference:
            with reference_mode(model):
                self.ref = self._run(self._sums)

    def _sums(self, batch: dict[str, mx.array]) -> mx.array:
        logp, _ = batch_logprobs(self.model, batch, embed(self.model, batch["tokens"]), [slice(None)], full=False)
        return logp.sum(axis=-1)

    def _run(self, fn: Callable[[dict[str, mx.array]], mx.array]) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probs of every held-out pair (each rank does its batches, then all_sum)."""
        training = self.model.training
        self.model.eval()
        sums = np.zeros((2, self.pairs), dtype=np.float32)
        for batch, positions in self.batches:
            values = np.array(fn(batch))
            sums[0, positions] = values[: len(positions)]
            sums[1, positions] = values[len(positions):]
        self.model.train(training)
        if self.world.size() > 1:
            sums = np.array(mx.distributed.all_sum(mx.array(sums), stream=mx.cpu))
        return sums[0], sums[1]

    def __call__(self, policy_is_reference: bool = False) -> dict[str, float]:
        """Metrics of the current policy; ``policy_is_reference`` reuses the reference sums
        (fresh LoRA: lora_b is 0, so the policy computes exactly the reference)."""
        if policy_is_reference and self.ref is not None:
            chosen, rejected = self.ref
        else:
            chosen, rejected = self._run(self._sums)
        ref = self.ref or (None, None)
        beta = self.cfg.beta
        return preference_metrics(chosen, rejected, ref[0], ref[1], beta)


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
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
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


def compile_steps(model: nn.Module, cfg: Config, opt: optim.Optimizer) -> tuple[Callable, Callable]:
    """The compiled micro-step ``batch -> (loss, aux, grads)`` and update ``grads -> None``.

    The micro-step differentiates ``batch_objective`` with respect to the
    trainable (LoRA) parameters; the update clips the global norm to
    ``max_grad_norm`` and applies the optimizer.
    """
    value_and_grad = nn.value_and_grad(model, lambda batch: batch_objective(model, cfg, batch))
    reference = model.__dict__.get("_reference_weights", {})

    @partial(mx.compile, inputs=[model.state, mx.random.state, reference], outputs=[model.state, mx.random.state])
    def grad_step(batch: dict[str, mx.array]) -> tuple[mx.array, dict[str, mx.array], Any]:
        (loss, aux), grads = value_and_grad(batch)
        return loss, aux, grads

    @partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])
    def apply_step(grads: Any) -> None:
        if cfg.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(model, grads)

    return grad_step, apply_step


def _global_norm(grads: Any) -> mx.array:
    return mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))


def train(
    cfg: Config,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run a full training job as configured; return where the adapters are and what was measured.

    ``on_step(step, metrics)`` is called after every optimizer step (before
    that step's eval and checkpoint), like mlx-lm's training callback.
    """
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if cfg.batch_size % size:
        raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {size} ranks")
    lead = rank == 0
    if not lead:
        log, progress = (lambda message: None), False
    out = Path(cfg.adapter_path)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(cfg.seed)

    model_path = resolve_model(cfg.model)
    dequantize = "true" if cfg.fine_tune_type == "full" else cfg.dequantize
    model, tokenizer, notes = load_base(model_path, dequantize, cfg.plain_attention)
    log(f"model: {cfg.model} -> {model_path}")
    for note in notes:
        log(f"  {note}")
    data: Dataset = load_dataset(cfg.data, tokenizer, cfg)
    log(
        f"data: {cfg.data}: {len(data.train)} train, {len(data.valid)} valid pairs; "
        f"truncated: {data.truncated_prompts} prompts, {data.truncated_responses} responses"
    )
    encoder = PairEncoder(tokenizer, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    attach_trainable(model, cfg)
    if cfg.resume_adapter_file:
        load_adapter_weights(model, cfg.resume_adapter_file)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    start = restore_checkpoint(out, model, opt, world) if resume else 0
    config = adapter_config(cfg, model_path)
    metrics_log = None
    if lead:
        save_config(cfg, out / "config.yaml")
        metrics_log = MetricsLog(out / "metrics.jsonl", keep_until=start if resume else None)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"trainable: {n_train / 1e6:.3f} M parameters ({cfg.fine_tune_type}); start at step {start} of {cfg.iters}")
    if size > 1:
        log(f"distributed: {size} ranks, each {cfg.batch_size // size} of the {cfg.batch_size} pairs of a batch")

    def write(record: dict[str, Any]) -> None:
        if metrics_log is not None:
            metrics_log.write(record)

    t = time.perf_counter()
    shared_prefix = shared_prefix_active(model, cfg)
    if shared_prefix:
        log("  shared prefix: each pair's prompt runs once for its chosen/rejected/anchor rows")
    held_out = HeldOut(model, cfg, data.valid, pad_id, world, shared_prefix)
    before = None
    if start == 0:
        before = held_out(policy_is_reference=not cfg.resume_adapter_file)
        log(f"held-out before ({held_out.pairs} pairs, {time.perf_counter() - t:.1f} s): {_fmt(before)}")
        write({"step": 0, "split": "valid", **before})

    model.train()
    grad_step, apply_step = compile_steps(model, cfg, opt)

    accum = cfg.grad_accumulation_steps
    batches = (b[rank::size] for b in iterate_batches(data.train, cfg.batch_size, cfg.seed, start=start * accum))

    def upcoming(micro: int, count: int) -> list[list[Example]]:
        ahead = iterate_batches(data.train, cfg.batch_size, cfg.seed, start=micro)
        return [next(ahead)[rank::size] for _ in range(count)]

    anchor_source = AnchorSource(model, tokenizer, encoder, cfg, upcoming)
    bar = _progress(cfg.iters, start, progress)
    t_train = time.perf_counter()
    for step in range(start + 1, cfg.iters + 1):
        tic = time.perf_counter()
        grads, pairs, ntoks, sources = None, [], mx.array(0.0), []
        for j in range(accum):
            micro = (step - 1) * accum + j
            examples = next(batches)
            sources.append(f"{examples[0].source}..")
            anchors = None
            if cfg.uses_triplet and cfg.anchor == "sample":
                anchors = anchor_source.for_batch(step, micro, examples)
            mx.random.seed(micro_seed(cfg.seed, micro))
            loss, aux, g = grad_step(to_mx(collate(examples, pad_id, anchors, shared_prefix=shared_prefix)))
            mx.eval(loss, aux, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            ntoks = ntoks + aux.pop("ntoks")
            pairs.append(aux)
        grads = tree_map(lambda x: x / accum, grads) if accum > 1 else grads
        per_pair = {k: mx.concatenate([a[k] for a in pairs]) for k in pairs[0]}
        if size > 1:
            grads = average_gradients(grads)
            per_pair = {k: mx.distributed.all_gather(v, stream=mx.cpu) for k, v in per_pair.items()}
            ntoks = mx.distributed.all_sum(ntoks, stream=mx.cpu)
        norm = _global_norm(grads).item()
        record = pair_metrics(per_pair)
        if not (all_finite(record) and math.isfinite(norm)):
            last = checkpoint_dirs(out)
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written"
            raise TrainingError(
                f"non-finite loss or gradient at step {step} (batch starting at {sources[0]}); "
                f"nothing saved for this step, {kept}"
            )
        apply_step(grads)
        mx.eval(model.parameters(), opt.state)
        lr = opt.learning_rate.item()
        dt = time.perf_counter() - tic
        record.update(
            step=step, grad_norm=norm, lr=lr, tokens_per_s=ntoks.item() / dt, step_time=dt, peak_memory_gb=peak_memory_gb()
        )
        write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        if on_step is not None:
            on_step(step, record)
        if cfg.steps_per_eval and step % cfg.steps_per_eval == 0 and step != cfg.iters:
            val = held_out()
            write({"step": step, "split": "valid", **val})
            log(f"step {step} held-out: {_fmt(val)}")
        if lead and ((cfg.steps_per_save and step % cfg.steps_per_save == 0) or step == cfg.iters):
            save_checkpoint(out, step, model, opt, config, cfg.save_total_limit)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_train
    t = time.perf_counter()
    after = held_out()
    write({"step": cfg.iters, "split": "valid", **after})
    log(f"held-out after ({time.perf_counter() - t:.1f} s): {_fmt(after)}")
    if lead:
        save_adapters(model, out, config)
        summary = {"before": before, "after": after, "train_seconds": seconds, "ranks": size}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return TrainResult(out, model_path, cfg.iters, seconds, before, after)


def _fmt(metrics: dict[str, float]) -> str:
    keys = ["policy_preference_accuracy", "rewards/accuracies", "rewards/margins"]
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
