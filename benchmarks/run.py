"""Benchmarks of issue 6, printed as ratios measured in one run on the same batches.

    python benchmarks/run.py [--quick] [--json out.json] [--repeats N] [--only NAMES]
    python benchmarks/run.py --lengths 58,180,512,1024 --steps 6 --first 3 --only NAMES

Configuration: batch 2 pairs, LoRA rank 8 (scale 20, dropout 0; PEFT
lora_alpha = 160) on all 7 linear layers of the last 16 blocks,
SmolLM2-135M-Instruct computed in float32, ~53 tokens per templated sequence
(the 2 x steps pairs of the data closest to that), median of steps 6..N
(N = 20, --quick: 10; --first sets the 6). Every tool trains on the same
token ids in the same batch order, padded to the same length.

Each measurement runs in its own process (clean peak memory, no cross-talk);
by default they run side by side in lockstep (one tool takes one step at a
time, step k of all before step k+1 of any) so load changes hit all alike;
--sequential runs them one after the other, --threads N pins BLAS/OpenMP
threads for every tool (a loaded 2-core machine is unmeasurable otherwise).

  ours:<variant>   tidpo_mlx.trainer.train, step time from its on_step records
  mlx_lm_lora      mlx-lm-lora's train_dpo (its own compiled step; its reference is a
                   2nd model copy). Its Linux-CPU crash (KeyError
                   'max_recommended_working_set_size' from mx.device_info()) is worked
                   around by supplying that key (value 0) in a wrapper.
  mlx_lm_sft       mlx-lm's own tuner: mlx_lm.tuner.trainer.train, default_loss, LoRA via
                   linear_to_lora_layers, on prompt+chosen and prompt+rejected sequences
  trl              TRL DPOTrainer + PEFT LoRA on torch CPU, fp32, no gradient checkpointing,
                   reference = adapters off, precompute_ref_log_probs off
  quickstart       `tidpo-mlx train --quiet` with the default recipe (skipped by --quick)

--lengths 58,180,512,1024 repeats all of it per length (pairs that long are multi-turn chat
pairs from chat_data.py when the data has none) and ends with one table of every tool's s/step
and peak memory per length, and our FLOP utilisation: FLOPs per second of our DPO and TI-DPO
steps (``step_flops``: "model" counts what the method needs over full rows, "executed" what our
shared-prefix, compiled step computes) over the GEMM rate `tidpo-mlx doctor` measures, taken in
the same run before and after the steps.

The figures (see benchmarks/README.md): 1 TI-DPO step / our DPO step; 2 our
DPO / mlx-lm-lora DPO; 3 our DPO / TRL; 4 peak memory of our steps / mlx-lm
LoRA SFT; 5 quickstart wall time and tokens/s. Needs the `bench` extra
(pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import tidpo_mlx

if hasattr(tidpo_mlx, "setup"):  # older trees (compare_code.py) load the fast BLAS when tidpo_mlx is imported
    tidpo_mlx.setup()  # the fast BLAS, before the first import of mlx (every variant measured here runs after it)

from chat_data import chat_rows  # noqa: E402

HERE = Path(__file__).resolve()
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tidpo-mlx" / "bench"
LORA = dict(rank=8, scale=20.0, dropout=0.0)
NUM_LAYERS = 16
BATCH = 2
LEARNING_RATE = 1e-5
SEED = 0

# Our variants: config keys on top of the common ones (see ours_config).
OURS = {
    "dpo": dict(loss_type="dpo", weighting="none", gamma=0.0),
    "tidpo_no_triplet": dict(gamma=0.0),
    "tidpo_data_anchor": dict(),
    "tidpo_sampled": dict(anchor_every=1),
    "tidpo_amortised": dict(),  # anchor_every = --anchor-every, when the trainer has the key
}
LABELS = {
    "ours:dpo": "our DPO",
    "ours:tidpo_no_triplet": "TI-DPO, triplet off",
    "ours:tidpo_data_anchor": "TI-DPO + triplet, anchors from data",
    "ours:tidpo_sampled": "TI-DPO + triplet, anchors sampled every step",
    "ours:tidpo_amortised": "TI-DPO + triplet, anchors amortised",
    "mlx_lm_lora": "mlx-lm-lora 5.x DPO",
    "trl": "TRL DPOTrainer + PEFT (torch CPU)",
    "mlx_lm_sft": "mlx-lm LoRA SFT (same sequences)",
    "quickstart": "tidpo-mlx train --quiet (quickstart)",
}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median_tail(times: list[float], first: int = 6) -> float:
    """Median of steps ``first``..N (1-based)."""
    tail = times[first - 1:]
    return statistics.median(tail) if tail else float("nan")


def amortised_mean(times: list[float], every: int, first: int = 6) -> float:
    """Mean step time over whole sampling cycles (steps 1 + m*every ..) inside steps first..N."""
    start = next((s for s in range(1, len(times) + 1) if (s - 1) % every == 0 and s >= first), None)
    if start is None:
        return float("nan")
    cycles = (len(times) - start + 1) // every
    if cycles == 0:
        return float("nan")
    chunk = times[start - 1: start - 1 + cycles * every]
    return sum(chunk) / len(chunk)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    doctor = subprocess.run(
        [sys.executable, "-c", "import sys; from tidpo_mlx.cli import main; sys.argv=['tidpo-mlx','doctor']; main()"],
        capture_output=True, text=True,
    )
    versions = {}
    from importlib import metadata

    for name in ("mlx", "mlx-lm", "mlx-lm-lora", "torch", "transformers", "trl", "peft", "tidpo-mlx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "doctor": (doctor.stdout + doctor.stderr).strip().splitlines(),
        "versions": versions,
    }


# --------------------------------------------------------------------------- #
# the shared data: pairs, batch order, token ids
# --------------------------------------------------------------------------- #


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Arithmetic preference pairs (used only when the bundled ``arith`` data is missing)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(12, 89), rng.randint(12, 89)
        wrong = a + b + rng.choice([-10, 10, -1, 1])
        rows.append({
            "prompt": f"What is {a} + {b}?",
            "chosen": f"{a} + {b} = {a + b}.",
            "rejected": f"{a} + {b} = {wrong}.",
            "anchor": f"The sum of {a} and {b} is {a + b}.",
        })
    return rows


def ours_config(data: str, adapter_path: str, steps: int, extra: dict[str, Any]) -> Any:
    from tidpo_mlx.config import build_config

    recipe = dict(
        preset="paper", model="smollm2-135m-instruct", data=data, adapter_path=adapter_path,
        iters=steps, batch_size=BATCH, num_layers=NUM_LAYERS, lora_parameters=dict(LORA),
        learning_rate=LEARNING_RATE, warmup_steps=0, lr_schedule="constant", steps_per_save=0,
        steps_per_eval=0, val_batches=1, seed=SEED,
    )
    recipe.update(extra)
    return build_config(recipe)


def length_limits(target_tokens: float) -> dict[str, int]:
    """``max_length`` / ``max_prompt_length`` that truncate none of the pairs picked for ``target_tokens``."""
    longest = max(1024, int(2 * target_tokens))
    return dict(max_length=longest + 512, max_prompt_length=longest)


def prepare(work: Path, data: str, steps: int, target_tokens: float, shape: str | None = None) -> dict[str, Any]:
    """Pick the pairs, write the data folders our trainer reads, and record the batches it will see.

    The pairs are the data's closest to ``target_tokens`` per templated sequence; when those miss it
    by more than 15 % on average (the bundled pairs are about 58 tokens), or when ``shape`` names a
    ``chat_data.py`` preset (``chat``, ``real``), they are multi-turn chat pairs of that length and
    shape from ``chat_data.py`` instead. Returns the spec every worker reads: data
    folders, the fused float32 HF model, and the token ids of each step's batch (prompt, chosen,
    rejected per pair) in our trainer's order.
    """
    from tidpo_mlx.batching import iterate_batches
    from tidpo_mlx.data import load_dataset
    from tidpo_mlx.sources import bundled_folder, read_jsonl
    from tidpo_mlx.models import resolve_model
    from mlx_lm.utils import load_tokenizer

    try:
        folder = Path(data).expanduser()
        folder = folder if folder.is_dir() else bundled_folder(data) or folder
        rows = [r for _, r in read_jsonl(folder / "train.jsonl")]
        source = str(folder)
    except Exception:  # bundled data not there yet: a temporary folder of similar pairs
        rows = synthetic_rows(400)
        source = "synthetic arithmetic pairs (bundled data missing)"
    limits = length_limits(target_tokens)
    cfg = ours_config(data, str(work / "unused"), steps, limits)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)

    n_pairs = BATCH * steps

    def seq_len(e):
        return (2 * len(e.prompt) + len(e.chosen) + len(e.rejected)) / 2

    def closest(rows: list[dict[str, Any]]) -> list[int]:
        """Row indices by distance of their encoded sequences from the target (encoded once)."""
        scratch = work / "all"
        scratch.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            (scratch / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        encoded = load_dataset(str(scratch), tokenizer, cfg).train
        order = sorted(range(len(encoded)), key=lambda i: (abs(seq_len(encoded[i]) - target_tokens), i))
        mean = statistics.mean(seq_len(encoded[i]) for i in order[:n_pairs])
        return order if abs(mean - target_tokens) <= 0.15 * target_tokens else []

    order = [] if shape else closest(rows)
    if not order:
        rows = chat_rows(max(400, 4 * n_pairs), int(target_tokens), shape=shape or "chat")
        source = f"{shape or 'chat'}-shaped chat pairs of about {target_tokens:.0f} tokens (benchmarks/chat_data.py)"
        order = closest(rows)
    picked = sorted(order[:n_pairs])
    valid = order[n_pairs: n_pairs + BATCH]
    folders = {}
    for name, keep_anchor in (("pairs", True), ("pairs_no_anchor", False)):
        out = work / name
        out.mkdir(exist_ok=True)
        for split, idx in (("train", picked), ("valid", valid)):
            chosen_rows = [dict(rows[i]) for i in idx]
            for r in chosen_rows:
                if not keep_anchor:
                    r.pop("anchor", None)
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen_rows))
        folders[name] = str(out)
    has_anchor = all(rows[i].get("anchor") for i in picked)

    # The exact batches (and order) our trainer will draw: every other tool gets the same ones.
    train = load_dataset(folders["pairs"], tokenizer, cfg).train
    it = iterate_batches(train, BATCH, SEED)
    batches = []
    for _ in range(steps):
        batch = next(it)
        batches.append([dict(prompt=e.prompt, chosen=e.chosen, rejected=e.rejected,
                             anchor=e.anchor) for e in batch])
    lengths = [len(p["prompt"]) + len(p[k]) for b in batches for p in b for k in ("chosen", "rejected")]
    return dict(
        data_source=source,
        data=folders["pairs"] if has_anchor else folders["pairs_no_anchor"],
        data_no_anchor=folders["pairs_no_anchor"],
        data_has_anchor=has_anchor,
        model_path=str(model_path),
        batches=batches,
        tokens_per_sequence=sum(lengths) / len(lengths),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        limits=limits,
    )


def model_shape(model_path: str) -> dict[str, int]:
    """The sizes the FLOP count needs, from the model folder's ``config.json``."""
    c = json.loads((Path(model_path) / "config.json").read_text())
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"], inter=c["intermediate_size"],
                attn=heads * head_dim, kv=c.get("num_key_value_heads", heads) * head_dim, vocab=c["vocab_size"])


def step_flops(batch: list[dict[str, list[int]]], shape: dict[str, int], variant: str) -> dict[str, float]:
    """Matmul FLOPs of one of our steps on ``batch``: ``model`` (what the method needs) and ``executed``.

    Per layer a token costs 2 W (W: the block's weights, q/k/v/o and the 3 MLP matrices) and a
    sequence of S tokens 2 d_attn S^2 of causal attention (QK^T and AV over the lower triangle);
    the head costs 2 d V per response token. A backward pass computes input gradients only (the base
    is frozen; LoRA's rank-8 products are left out): 2 W per token, twice the attention. ``model``:
    the policy and the reference forward over every row in full, the loss's backward through the
    blocks with adapters (the last ``NUM_LAYERS``) and the head; TI-DPO adds the attribution's
    backward through every block from the last position's max-logit to the response embeddings
    (docs/method.md section 1: only the response tokens' importance is used, and no earlier position depends
    on them; its forward is the policy forward). ``executed``: the same with each pair's prompt
    counted once (the shared-prefix layout) and the reference forward of the blocks without
    adapters left out (the compiled step computes them once for both: same weights).
    """
    d, layers = shape["hidden"], shape["layers"]
    weights = d * (2 * shape["attn"] + 2 * shape["kv"]) + 3 * d * shape["inter"]
    response = sum(len(p["chosen"]) + len(p["rejected"]) for p in batch)
    head = 2 * d * shape["vocab"] * response
    full = sum((len(p["prompt"]) + len(p[k])) ** 2 for p in batch for k in ("chosen", "rejected"))
    prompts = sum(len(p["prompt"]) ** 2 for p in batch)
    attribution = layers * (2 * weights * response + 2 * 2 * shape["attn"] * (full - 2 * prompts))
    out = {}
    for kind in ("model", "executed"):
        tokens = sum((2 if kind == "model" else 1) * len(p["prompt"]) for p in batch) + response
        attention = 2 * shape["attn"] * (full - (0 if kind == "model" else prompts))
        block_fwd, block_bwd = 2 * weights * tokens + attention, 2 * weights * tokens + 2 * attention
        ref_layers = layers if kind == "model" else NUM_LAYERS
        flops = (layers + ref_layers) * block_fwd + 2 * head + NUM_LAYERS * block_bwd + head
        out[kind] = flops + (attribution if variant != "dpo" else 0)
    return out


def utilisation(result: dict[str, Any], spec: dict[str, Any], variant: str, gemm: float, first: int) -> dict[str, float]:
    """Median over steps ``first``..N of FLOPs per second of one of our runs, over the GEMM rate."""
    shape = model_shape(spec["model_path"])
    per_step = [step_flops(b, shape, variant) for b in spec["batches"]]
    out = {}
    for kind in ("model", "executed"):
        rates = [f[kind] / t for f, t in zip(per_step, result["step_times"])][first - 1:]
        out[f"{kind}_gflop_per_step"] = statistics.median(f[kind] for f in per_step) / 1e9
        out[f"{kind}_utilisation"] = statistics.median(rates) / 1e9 / gemm if rates else float("nan")
    return out


def padded_length(batch: list[dict[str, list[int]]]) -> int:
    """The padded length L our collate uses for this batch's chosen+rejected (multiple of 16)."""
    longest = max(len(p["prompt"]) + len(p[k]) for p in batch for k in ("chosen", "rejected"))
    return -(-longest // 16) * 16


def fused_float32(model_path: str, log: Path) -> str:
    """The built-in model dequantized to a float32 Hugging Face folder (cached): what mlx-lm,
    mlx-lm-lora and transformers load, with the same weights our loader computes with."""
    out = CACHE / f"{Path(model_path).name}-float32-hf"
    if (out / "config.json").exists():
        return str(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    code = (
        "import tidpo_mlx, sys; tidpo_mlx.setup(); from tidpo_mlx.convert.fuse import fuse; "
        "fuse(sys.argv[1], None, sys.argv[2], dtype='float32')"
    )
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-c", code, model_path, str(tmp / "m")], check=True, stdout=f, stderr=f)
    (tmp / "m").rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# --------------------------------------------------------------------------- #
# workers (each in its own process)
# --------------------------------------------------------------------------- #


class Gate:
    """Lockstep with the driver: after each step, say so and wait for the turn to take the next.

    Every tool calls ``turn()`` from its own per-step hook, outside the span it times, so the
    tools of one run take their steps in round-robin and share the machine's load alike.
    Without the driver's pipes (a worker run by hand) it does nothing.
    """

    def __init__(self) -> None:
        fds = os.environ.get("TIDPO_BENCH_GATE")
        self.go, self.done = map(int, fds.split(",")) if fds else (None, None)

    def turn(self) -> None:
        if self.go is None:
            return
        os.write(self.done, b"d")
        if os.read(self.go, 1) != b"g":
            raise SystemExit("benchmark driver went away")


GATE = Gate()


def worker_ours(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    import mlx.core as mx

    from tidpo_mlx.trainer import train

    extra = dict(OURS[variant])
    data = spec["data"]
    if variant in ("tidpo_sampled", "tidpo_amortised"):
        data = spec["data_no_anchor"]
    if variant == "tidpo_amortised":
        extra["anchor_every"] = spec["anchor_every"]
    if variant == "tidpo_sampled" and not spec["has_anchor_every"]:
        extra.pop("anchor_every")
    cfg = ours_config(data, spec["adapter_path"], spec["steps"], {**spec["limits"], **extra})
    times: list[float] = []
    tokens: list[float] = []
    peak = {}

    def on_step(step: int, record: dict[str, float]) -> None:
        times.append(record["step_time"])
        tokens.append(record["tokens_per_s"] * record["step_time"])
        if step == 1:
            mx.reset_peak_memory()
        if step == spec["steps"]:
            peak["gb"] = mx.get_peak_memory() / 1e9
        GATE.turn()

    train(cfg, log=lambda _: None, progress=False, on_step=on_step)
    return dict(step_times=times, peak_gb=peak.get("gb"), tokens_per_step=tokens)


class _Timer:
    """Collects mlx-lm style training reports (steps_per_report=1) and the peak after step 1."""

    def __init__(self, steps: int):
        import mlx.core as mx

        self.mx, self.steps, self.times, self.peak = mx, steps, [], None

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        self.times.append(1.0 / info["iterations_per_second"])
        if info["iteration"] == 1:
            self.mx.reset_peak_memory()
        if info["iteration"] == self.steps:
            self.peak = self.mx.get_peak_memory() / 1e9
        GATE.turn()

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        pass


def _padded_rows(batch: list[dict[str, list[int]]], key: str, width: int) -> tuple[Any, Any]:
    import numpy as np

    tokens = np.zeros((len(batch), width), np.int32)
    mask = np.zeros((len(batch), width), np.float32)
    for j, p in enumerate(batch):
        seq = p["prompt"] + p[key]
        tokens[j, : len(seq)] = seq
        mask[j, len(p["prompt"]): len(seq)] = 1.0
    return tokens, mask


def worker_mlx_lm_lora(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load

    # mlx-lm-lora 5.10 calls mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]);
    # MLX's Linux CPU backend has no such key (KeyError at start). Supply it (0: no wired limit).
    real_info = mx.device_info

    def device_info() -> dict[str, Any]:
        info = dict(real_info())
        info.setdefault("max_recommended_working_set_size", 0)
        return info

    mx.device_info = device_info

    from mlx_lm_lora.trainer import dpo_trainer
    from mlx_lm_lora.utils import from_pretrained

    mx.random.seed(SEED)
    model, _, _ = from_pretrained(
        model=spec["fused"], lora_config=dict(LORA, use_dora=False, num_layers=NUM_LAYERS),
    )
    reference, _ = load(spec["fused"])  # what its CLI does: a second full copy of the model
    reference.freeze()
    batches = iter(spec["batches"])

    def our_batches(**_: Any) -> Iterator[tuple[Any, ...]]:
        # Same pairs and order as ours; width L+1 so its forward (x[:, :-1]) runs on our L tokens.
        batch = next(batches)
        width = padded_length(batch) + 1
        chosen, chosen_mask = _padded_rows(batch, "chosen", width)
        rejected, rejected_mask = _padded_rows(batch, "rejected", width)
        yield mx.array(chosen), mx.array(rejected), mx.array(chosen_mask), mx.array(rejected_mask)

    dpo_trainer.iterate_dpo_batches = our_batches
    timer = _Timer(spec["steps"])
    args = dpo_trainer.DPOTrainingArgs(
        batch_size=BATCH, iters=spec["steps"], steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, adapter_file=str(Path(spec["adapter_path"]) / "adapters.safetensors"),
        max_seq_length=2048, beta=0.1,
    )
    Path(spec["adapter_path"]).mkdir(parents=True, exist_ok=True)
    dpo_trainer.train_dpo(
        model=model, ref_model=reference, optimizer=optim.AdamW(learning_rate=LEARNING_RATE),
        train_dataset=[None] * (BATCH * spec["steps"]), val_dataset=None, args=args,
        training_callback=timer, loss_type="sigmoid",
    )
    return dict(step_times=timer.times, peak_gb=timer.peak, patched="mx.device_info()['max_recommended_working_set_size'] = 0")


def worker_mlx_lm_sft(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(SEED)
    model, _ = load(spec["fused"])
    model.freeze()
    linear_to_lora_layers(model, NUM_LAYERS, dict(LORA))

    def our_batches(**_: Any) -> Iterator[tuple[Any, Any]]:
        # The chosen and rejected sequences of each step (4 rows), prompt masked out as in
        # mlx-lm's completion datasets: lengths = (prompt offset, sequence length).
        for batch in spec["batches"]:
            width = padded_length(batch) + 1
            rows, lengths = [], []
            for key in ("chosen", "rejected"):
                tokens, _ = _padded_rows(batch, key, width)
                rows.extend(tokens)
                lengths.extend([len(p["prompt"]), len(p["prompt"]) + len(p[key])] for p in batch)
            yield mx.array(np.stack(rows)), mx.array(lengths)

    timer = _Timer(spec["steps"])
    args = TrainingArgs(
        batch_size=2 * BATCH, iters=spec["steps"], steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, adapter_file=str(Path(spec["adapter_path"]) / "adapters.safetensors"),
        max_seq_length=2048,
    )
    Path(spec["adapter_path"]).mkdir(parents=True, exist_ok=True)
    train(model, optim.AdamW(learning_rate=LEARNING_RATE), train_dataset=[None] * 8, args=args,
          loss=default_loss, iterate_batches=our_batches, training_callback=timer)
    return dict(step_times=timer.times, peak_gb=timer.peak)


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(spec["fused"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["fused"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_layers = model.config.num_hidden_layers
    peft = LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["scale"] * LORA["rank"], lora_dropout=LORA["dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(n_layers - NUM_LAYERS, n_layers)), task_type="CAUSAL_LM",
    )
    rows = [dict(prompt_ids=p["prompt"], chosen_ids=p["chosen"], rejected_ids=p["rejected"])
            for batch in spec["batches"] for p in batch]

    class SameBatches(DPOTrainer):
        """Our token ids as they are (no re-tokenisation) and our batch order (no shuffling)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.tic)
            GATE.turn()

    config = DPOConfig(
        output_dir=spec["adapter_path"], per_device_train_batch_size=BATCH, max_steps=spec["steps"],
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
        precompute_ref_log_probs=False, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, pad_to_multiple_of=16, max_length=None, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        disable_tqdm=True, seed=SEED, remove_unused_columns=False,
    )
    trainer = SameBatches(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=peft, callbacks=[StepTimer()],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (approx.)
    return dict(step_times=times, peak_rss_gb=rss, torch_threads=torch.get_num_threads(),
                trainable_params=trainable)


def worker_quickstart(spec: dict[str, Any]) -> dict[str, Any]:
    out = Path(spec["adapter_path"])
    cmd = [shutil.which("tidpo-mlx") or "tidpo-mlx", "train", "--quiet", "--adapter-path", str(out)]
    if spec.get("quickstart_data"):
        cmd += ["--data", spec["quickstart_data"]]
    tic = time.perf_counter()
    with open(spec["log"], "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=f)
    wall = time.perf_counter() - tic
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "step_time" in r]
    total_time = sum(r["step_time"] for r in train)
    total_tokens = sum(r["tokens_per_s"] * r["step_time"] for r in train)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return dict(
        wall_s=wall, steps=len(train), train_seconds=summary.get("train_seconds", total_time),
        tokens_per_s=total_tokens / total_time, median_step_s=statistics.median(r["step_time"] for r in train),
        step_times=[r["step_time"] for r in train],
        peak_gb=max((r.get("peak_memory_gb") or 0) for r in train), command=" ".join(cmd[1:]),
        held_out={when: (summary.get(when) or {}).get("policy_preference_accuracy") for when in ("before", "after")},
    )


def run_worker(name: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if name.startswith("ours:"):
        result = worker_ours(spec, name.split(":", 1)[1])
    else:
        result = {
            "mlx_lm_lora": worker_mlx_lm_lora, "mlx_lm_sft": worker_mlx_lm_sft,
            "trl": worker_trl, "quickstart": worker_quickstart,
        }[name](spec)
    Path(out_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------- #
# the driver
# --------------------------------------------------------------------------- #


def worker_env(name: str, **extra: str) -> dict[str, str]:
    """The environment of one worker process.

    TRL's process runs without our OpenBLAS preload (``TIDPO_MLX_NO_OPENBLAS``):
    torch brings its own BLAS (MKL), and with cmeel's OpenBLAS loaded globally
    into the same process a TRL step measured 7x slower (8.2 vs 1.2 s here).
    """
    env = dict(os.environ, **extra)
    if name == "trl":
        env["TIDPO_MLX_NO_OPENBLAS"] = "1"
    return env


def measure(name: str, spec: dict[str, Any], work: Path, tag: str, timeout: int) -> dict[str, Any]:
    """Run one worker process; its result, the load before/after and its wall time."""
    spec = dict(spec, adapter_path=str(work / f"out-{tag}"), log=str(work / f"{tag}.log"))
    spec_path = work / f"{tag}.spec.json"
    out_path = work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    before = load_avg()
    tic = time.perf_counter()
    with open(spec["log"], "a") as log:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--worker", name, "--spec", str(spec_path), "--out", str(out_path)],
            stdout=log, stderr=log, timeout=timeout, env=worker_env(name),
        )
    wall = time.perf_counter() - tic
    if proc.returncode != 0 or not out_path.exists():
        tail = Path(spec["log"]).read_text().strip().splitlines()[-12:]
        return dict(error=f"exit {proc.returncode}", log_tail=tail, load_before=before, load_after=load_avg())
    result = json.loads(out_path.read_text())
    result.update(load_before=before, load_after=load_avg(), process_s=round(wall, 1))
    return result


def measure_lockstep(names: list[str], spec: dict[str, Any], work: Path, round_: int, timeout: int,
                     code: dict[str, str] | None = None) -> tuple[dict[str, dict[str, Any]], list[list[float]]]:
    """Run the workers side by side, their steps 2..N in round-robin (one tool steps at a time).

    All processes load and take step 1 at once (not timed in the figures); from then on the
    driver hands out one step at a time: step k of every tool, then step k+1 of every tool. A
    change of load over the run then hits every tool alike, and each process keeps its own
    clean peak memory. A name ``worker@label`` runs ``worker`` with the source tree
    ``code[label]`` first on its ``PYTHONPATH`` (another version of tidpo-mlx). Returns the
    results and the load average at each round.
    """
    import select

    procs = {}
    for name in names:
        worker, _, label = name.partition("@")
        extra = {"PYTHONPATH": code[label]} if label else {}
        tag = f"{name.replace(':', '-')}-{round_}"
        wspec = dict(spec, adapter_path=str(work / f"out-{tag}"), log=str(work / f"{tag}.log"))
        spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
        spec_path.write_text(json.dumps(wspec))
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        log = open(wspec["log"], "a")
        proc = subprocess.Popen(
            [sys.executable, str(HERE), "--worker", worker, "--spec", str(spec_path), "--out", str(out_path)],
            stdout=log, stderr=log, pass_fds=(go_r, done_w),
            env=worker_env(worker, TIDPO_BENCH_GATE=f"{go_r},{done_w}", **extra),
        )
        os.close(go_r)
        os.close(done_w)
        log.close()
        procs[name] = dict(proc=proc, go=go_w, done=done_r, out=out_path, log=wspec["log"], alive=True,
                           load_before=load_avg(), tic=time.perf_counter())

    def wait_done(name: str) -> None:
        p = procs[name]
        ready, _, _ = select.select([p["done"]], [], [], timeout)
        if not ready or os.read(p["done"], 1) != b"d":  # crashed, or hung past the timeout
            p["alive"] = False
            if not ready:
                p["proc"].kill()

    def go(name: str) -> None:
        try:
            os.write(procs[name]["go"], b"g")
        except BrokenPipeError:
            procs[name]["alive"] = False

    loads = []
    for name in names:  # step 1, all at once
        wait_done(name)
    for step in range(2, spec["steps"] + 1):
        loads.append(load_avg())
        print(f"  step {step}/{spec['steps']} (load {loads[-1][0]:.1f})", file=sys.stderr, flush=True)
        for name in names:
            if procs[name]["alive"]:
                go(name)
                wait_done(name)
    results = {}
    for name in names:  # let every tool finish (saves, final evals) and collect
        p = procs[name]
        if p["alive"]:
            go(name)
        try:
            p["proc"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p["proc"].kill()
            p["proc"].wait()
        os.close(p["go"])
        os.close(p["done"])
        if p["proc"].returncode != 0 or not p["out"].exists():
            tail = Path(p["log"]).read_text().strip().splitlines()[-12:]
            results[name] = dict(error=f"exit {p['proc'].returncode}", log_tail=tail)
            print(f"  {name} failed: {results[name]['error']}\n  " + "\n  ".join(tail), file=sys.stderr)
            continue
        results[name] = json.loads(p["out"].read_text())
        results[name].update(load_before=p["load_before"], load_after=load_avg(),
                             process_s=round(time.perf_counter() - p["tic"], 1))
    return results, loads


def summarise(name: str, runs: list[dict[str, Any]], spec: dict[str, Any], first: int, gemm: float) -> dict[str, Any]:
    """Pool the repeats of one measurement: s/step (median of steps ``first``..N, pooled), peak memory,
    and for our DPO and TI-DPO (triplet off) the FLOP utilisation against ``gemm`` GFLOP/s."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": runs}
    if not ok:
        out["error"] = runs[-1].get("error") if runs else "not run"
        return out
    if name == "quickstart":
        out.update({k: statistics.median(r[k] for r in ok) for k in ("wall_s", "tokens_per_s", "median_step_s")})
        out["steps"] = ok[0]["steps"]
        out["held_out"] = ok[-1]["held_out"]
        return out
    if name == "ours:tidpo_amortised":
        every = spec["anchor_every"]
        per_run = [amortised_mean(r["step_times"], every, first) for r in ok]
        out["step_s"] = statistics.median(per_run)
        out["statistic"] = f"mean over whole {every}-step sampling cycles inside steps {first}..N"
    else:
        pooled = [t for r in ok for t in r["step_times"][first - 1:]]
        out["step_s"] = statistics.median(pooled) if pooled else float("nan")
        out["per_run_step_s"] = [median_tail(r["step_times"], first) for r in ok]
        out["statistic"] = f"median of steps {first}..N, pooled over repeats"
    if name in ("ours:dpo", "ours:tidpo_no_triplet"):
        variant = name.split(":", 1)[1]
        parts = [utilisation(r, spec, variant, gemm, first) for r in ok]
        out.update({k: statistics.median(p[k] for p in parts) for k in parts[0]})
    peaks = [r["peak_gb"] for r in ok if r.get("peak_gb") is not None]
    if peaks:
        out["peak_gb"] = max(peaks)
    if ok[0].get("peak_rss_gb") is not None:
        out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in ok)
    return out


def figures(res: dict[str, dict[str, Any]], anchor_every: int | None) -> list[dict[str, Any]]:
    """The ratios of issue 6 with their targets."""

    def step(name: str) -> float | None:
        return res.get(name, {}).get("step_s")

    def peak(name: str) -> float | None:
        return res.get(name, {}).get("peak_gb")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b and math.isfinite(a) and math.isfinite(b) else None

    dpo = step("ours:dpo")
    rows = [
        ("1", "TI-DPO step / our DPO step, triplet off", ratio(step("ours:tidpo_no_triplet"), dpo), 1.25, "s/step"),
        ("1a", "  + triplet, anchors from data", ratio(step("ours:tidpo_data_anchor"), dpo), None, "s/step"),
        ("1b", "  + triplet, anchors sampled every step", ratio(step("ours:tidpo_sampled"), dpo), None, "s/step"),
        ("1c", f"  + triplet, anchors amortised (anchor_every {anchor_every})",
         ratio(step("ours:tidpo_amortised"), dpo) if anchor_every else None, 1.8, "s/step"),
        ("2", "our DPO step / mlx-lm-lora DPO step", ratio(dpo, step("mlx_lm_lora")), 0.6, "s/step"),
        ("3", "our DPO step / TRL DPOTrainer step", ratio(dpo, step("trl")), 1.0, "s/step"),
        ("4", "peak memory: our DPO / mlx-lm LoRA SFT", ratio(peak("ours:dpo"), peak("mlx_lm_sft")), 1.1, "GB"),
        ("4a", "peak memory: TI-DPO, triplet off / mlx-lm LoRA SFT",
         ratio(peak("ours:tidpo_no_triplet"), peak("mlx_lm_sft")), 1.2, "GB"),
        ("4b", "peak memory: TI-DPO + triplet (data anchors) / mlx-lm LoRA SFT",
         ratio(peak("ours:tidpo_data_anchor"), peak("mlx_lm_sft")), None, "GB"),
    ]
    out = []
    for key, what, value, target, unit in rows:
        out.append(dict(figure=key, what=what, ratio=value, target=target,
                        met=None if value is None or target is None else value <= target))
    return out


def print_report(report: dict[str, Any]) -> None:
    res = report["measurements"]
    print(f"\nbatch {BATCH} pairs, LoRA r{LORA['rank']} scale {LORA['scale']:g} on 7 linears x last {NUM_LAYERS} blocks, "
          f"{report['tokens_per_sequence']:.1f} tokens/sequence, steps {report['steps']}, repeats {report['repeats']}")
    print(f"load (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}; "
          f"1-min load during the timed steps {report.get('load_during_steps')} ({report.get('mode')}, "
          f"threads: {report.get('threads')})\n")
    print(f"{'measurement':48s} {'s/step':>8s} {'peak GB':>8s}  load during")
    for name, r in res.items():
        if name == "quickstart":
            continue
        if "error" in r:
            print(f"{LABELS.get(name, name):48s} {'failed: ' + str(r['error'])}")
            continue
        peak = r.get("peak_gb") or r.get("peak_rss_gb")
        mark = " RSS" if "peak_rss_gb" in r and r.get("peak_gb") is None else ""
        loads = [x["load_before"][0] for x in r["runs"] if "load_before" in x]
        print(f"{LABELS.get(name, name):48s} {r['step_s']:8.3f} {peak if peak else float('nan'):8.3f}{mark}  "
              f"{'/'.join(f'{x:.1f}' for x in loads)}")
    gemm = report["gemm_gflops"]
    print(f"\nGEMM (doctor's 1024 fp32 matmul, best of 3): {gemm['before']:.0f} GFLOP/s before, "
          f"{gemm['after']:.0f} after")
    for name in ("ours:dpo", "ours:tidpo_no_triplet"):
        r = res.get(name, {})
        if "model_utilisation" in r:
            print(f"{LABELS[name]:48s} {r['model_gflop_per_step']:7.0f} GFLOP/step (model), "
                  f"{100 * r['model_utilisation']:3.0f} % of GEMM; executed {r['executed_gflop_per_step']:7.0f}, "
                  f"{100 * r['executed_utilisation']:3.0f} %")
    print()
    print(f"{'figure':6s} {'ratio':>6s} {'target':>7s}  {'':4s} what")
    for f in report["figures"]:
        value = "-" if f["ratio"] is None else f"{f['ratio']:.2f}"
        target = "report" if f["target"] is None else f"<={f['target']:g}"
        met = "" if f["met"] is None else ("ok" if f["met"] else "MISS")
        print(f"{f['figure']:6s} {value:>6s} {target:>7s}  {met:4s} {f['what']}")
    q = res.get("quickstart")
    if q and "error" not in q:
        print(f"5      quickstart: {q['wall_s']:.0f} s wall ({q['steps']} steps), {q['tokens_per_s']:.0f} tokens/s, "
              f"median step {q['median_step_s']:.2f} s; held-out policy preference accuracy "
              f"{q['held_out']['before']} -> {q['held_out']['after']}")
    elif q:
        print(f"5      quickstart failed: {q['error']}")


def gemm_rate() -> float:
    """The GEMM rate ``tidpo-mlx doctor`` reports (GFLOP/s, 1024 fp32), best of 3 measurements."""
    from tidpo_mlx.doctor import gemm_gflops

    return max(gemm_gflops() for _ in range(3))


def measure_length(args: argparse.Namespace, names: list[str], steps: int, tokens: float,
                   info: dict[str, Any]) -> dict[str, Any]:
    """Every measurement in ``names`` on pairs of about ``tokens`` tokens per sequence: one report."""
    work = Path(tempfile.mkdtemp(prefix="tidpo-bench-"))
    load_start = load_avg()
    print(f"work folder {work}; {tokens:.0f} tokens per sequence; load {load_start}", file=sys.stderr)
    spec = prepare(work, args.data, steps, tokens, args.shape)
    spec.update(steps=steps, anchor_every=args.anchor_every, has_anchor_every=info["has_anchor_every"])
    if any(n in names for n in ("mlx_lm_lora", "trl", "mlx_lm_sft")):
        spec["fused"] = fused_float32(spec["model_path"], work / "fuse.log")
    if "bundled data missing" in spec["data_source"]:  # the default recipe's bundled data is missing
        spec["quickstart_data"] = spec["data"]
    if not spec["data_has_anchor"] and "ours:tidpo_data_anchor" in names:
        # Without an anchor field the trainer samples every step: that is ours:tidpo_sampled, not 1a.
        print("the pairs have no 'anchor' field: ours:tidpo_data_anchor left out", file=sys.stderr)
        names = [n for n in names if n != "ours:tidpo_data_anchor"]
    gemm_before = gemm_rate()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    step_loads: list[list[float]] = []
    stepped = [n for n in names if n != "quickstart"]
    for r in range(args.repeats):
        if args.sequential:
            for name in stepped:
                tag = f"{name.replace(':', '-')}-{r}"
                print(f"[{r + 1}/{args.repeats}] {name} (load {load_avg()[0]:.1f}) ...", file=sys.stderr, flush=True)
                result = measure(name, spec, work, tag, args.timeout)
                if "error" in result:
                    print(f"  failed: {result['error']}\n  " + "\n  ".join(result["log_tail"]), file=sys.stderr)
                runs[name].append(result)
        elif stepped:
            print(f"[{r + 1}/{args.repeats}] lockstep: {', '.join(stepped)} (load {load_avg()[0]:.1f})",
                  file=sys.stderr, flush=True)
            results, loads = measure_lockstep(stepped, spec, work, r, args.timeout)
            step_loads.extend(loads)
            for name in stepped:
                runs[name].append(results[name])
    if "quickstart" in names:
        print(f"quickstart (load {load_avg()[0]:.1f}) ...", file=sys.stderr, flush=True)
        runs["quickstart"].append(measure("quickstart", spec, work, "quickstart", args.timeout))
    gemm_after = gemm_rate()
    gemm = statistics.mean((gemm_before, gemm_after))
    measurements = {n: summarise(n, runs[n], spec, args.first, gemm) for n in names}
    anchor_every = args.anchor_every if info["has_anchor_every"] else None
    report = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=info, steps=steps, first_timed_step=args.first,
        repeats=args.repeats, load_start=load_start, load_end=load_avg(), data_source=spec["data_source"],
        mode="sequential" if args.sequential else "lockstep", threads=args.threads or "library default",
        load_during_steps=dict(min=min(l[0] for l in step_loads), median=statistics.median(l[0] for l in step_loads),
                               max=max(l[0] for l in step_loads)) if step_loads else None,
        gemm_gflops=dict(before=gemm_before, after=gemm_after),
        data_has_anchor=spec["data_has_anchor"], tokens_per_sequence=spec["tokens_per_sequence"],
        target_tokens=tokens, batch_shapes=sorted({padded_length(b) for b in spec["batches"]}),
        batch_lengths=[[[len(p[k]) for k in ("prompt", "chosen", "rejected")] for p in b] for b in spec["batches"]],
        config=dict(batch_pairs=BATCH, lora=LORA, num_layers=NUM_LAYERS, learning_rate=LEARNING_RATE,
                    anchor_every=anchor_every, dtype="float32", **spec["limits"]),
        measurements=measurements, figures=figures(measurements, anchor_every),
    )
    print_report(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}", file=sys.stderr)
    return report


SWEEP_TARGETS = dict(tidpo_over_dpo=1.2, dpo_over_trl=0.6, dpo_over_mlx_lm_lora=0.5, peak_over_sft=1.0,
                     utilisation=0.5)
"""Issue 16's targets at 512 tokens per sequence."""


def print_sweep(reports: list[dict[str, Any]]) -> None:
    """One line per length: every tool's s/step and peak GB, our utilisation, the ratios of the targets."""
    print("\nlength sweep (s/step, peak GB; utilisation = FLOPs/s over the GEMM rate measured in the same run)")
    names = list(dict.fromkeys(n for rep in reports for n in rep["measurements"] if n != "quickstart"))
    print(f"{'tokens':>7s} {'GEMM':>6s} " + " ".join(f"{LABELS.get(n, n).split(' (')[0][:22]:>22s}" for n in names))
    for rep in reports:
        res, gemm = rep["measurements"], statistics.mean(rep["gemm_gflops"].values())
        cells = []
        for name in names:
            r = res.get(name)
            if r is None or "error" in r:
                cells.append("-" if r is None else "failed")
                continue
            peak = r.get("peak_gb") or r.get("peak_rss_gb") or float("nan")
            cells.append(f"{r['step_s']:.2f} s {peak:.2f} GB")
        print(f"{rep['tokens_per_sequence']:7.0f} {gemm:6.0f} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"\n{'tokens':>7s} {'DPO MFU':>8s} {'exec.':>6s} {'TI MFU':>7s} {'exec.':>6s}  "
          f"{'TI/DPO':>6s} {'DPO/TRL':>7s} {'DPO/lora':>8s} {'peak/SFT':>8s}   (targets at 512: "
          + ", ".join(f"{k} <= {v:g}" if k != "utilisation" else f"{k} >= {v:g}" for k, v in SWEEP_TARGETS.items())
          + ")")
    for rep in reports:
        res = rep["measurements"]
        fig = {f["figure"]: f["ratio"] for f in rep["figures"]}

        def pct(name: str, kind: str) -> str:
            value = res.get(name, {}).get(f"{kind}_utilisation")
            return "-" if value is None else f"{100 * value:.0f} %"

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        print(f"{rep['tokens_per_sequence']:7.0f} {pct('ours:dpo', 'model'):>8s} {pct('ours:dpo', 'executed'):>6s} "
              f"{pct('ours:tidpo_no_triplet', 'model'):>7s} {pct('ours:tidpo_no_triplet', 'executed'):>6s}  "
              f"{num(fig.get('1')):>6s} {num(fig.get('3')):>7s} {num(fig.get('2')):>8s} {num(fig.get('4')):>8s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 steps, no quickstart run")
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement (default 20; --quick 10)")
    parser.add_argument("--first", type=int, default=6, help="first timed step (the ones before warm up)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every measurement (interleaved)")
    parser.add_argument("--data", default="arith", help="data folder or bundled name (pairs are picked from train)")
    parser.add_argument("--tokens", type=float, default=53.0, help="target tokens per templated sequence")
    parser.add_argument("--shape", choices=("chat", "real"), default=None,
                        help="chat_data.py pairs of this shape instead of the data's (real: long prompts, short "
                             "unequal responses, as public chat preference sets)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated targets (tokens per sequence): a length sweep, one run per length, "
                             "e.g. 58,180,512,1024 (replaces --tokens)")
    parser.add_argument("--anchor-every", type=int, default=5, help="K of the amortised-anchor variant")
    parser.add_argument("--only", default=None, help="comma-separated measurement names (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated measurement names to leave out")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS/OpenMP threads of every tool (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS); "
                             "default: the libraries' own (all cores)")
    parser.add_argument("--sequential", action="store_true",
                        help="one tool after the other (default: all side by side, steps in round-robin)")
    parser.add_argument("--keep", action="store_true", help="keep the work folders (logs, adapters)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.spec, args.out)
        return

    from tidpo_mlx.config import Config

    steps = args.steps or (10 if args.quick else 20)
    if args.threads:  # inherited by every worker process (set before any of them starts)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    has_anchor_every = "anchor_every" in Config.__dataclass_fields__
    names = ["ours:dpo", "ours:tidpo_no_triplet", "ours:tidpo_data_anchor", "ours:tidpo_sampled"]
    if has_anchor_every:
        names.append("ours:tidpo_amortised")
    names += ["mlx_lm_lora", "trl", "mlx_lm_sft"]
    if not args.quick:
        names.append("quickstart")
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    names = [n for n in names if n not in args.skip.split(",")]

    info = dict(machine(), has_anchor_every=has_anchor_every)
    lengths = [float(x) for x in args.lengths.split(",")] if args.lengths else [args.tokens]
    reports = [measure_length(args, names, steps, tokens, info) for tokens in lengths]
    if len(reports) > 1:
        print_sweep(reports)
    if args.json:
        Path(args.json).write_text(json.dumps(reports[0] if len(reports) == 1 else dict(sweep=reports), indent=2))
    for rep in reports:
        print("\n" + json.dumps({"tokens": round(rep["tokens_per_sequence"], 1),
                                 **{f["figure"]: f["ratio"] for f in rep["figures"]}}))


if __name__ == "__main__":
    main()
