"""Where the time of our compiled DPO step goes on CPU: GEMMs, attention core, element-wise work, head.

    python benchmarks/chat_data.py /tmp/chat512 --tokens 512
    python benchmarks/op_split.py --data /tmp/chat512 --tokens 512 [--reps 5]

Same configuration as benchmarks/run.py (batch 2 pairs, LoRA r8 on 7 linears
of the last 16 blocks, float32, the CPU backend's shared-prefix layout). On
the step's own shapes it times, compiled, one adapted block's forward and
backward (input gradient, ``vjp - forward``) for the prompt pass (each pair's
prompt once) and for the response pass (each row's chunk over the prompt's
keys), and inside that block three parts at the same shapes:

  gemm         the 7 projections (base weights and LoRA) on the block's tokens
  attention    scores, mask, softmax, probabilities x values (no projections)
  element-wise the rest of the block: norms, RoPE, SwiGLU, residuals, reshapes,
               the prompt keys repeated per row (block minus the two above)

and the head (tied embedding, ``logits_chunk`` positions at a time, log-prob of
the target). It composes them as the executed DPO step runs them (policy
forward through every block, the reference through the adapted blocks only
since the others are shared, backward through the adapted blocks, head twice
forward and once backward), compares the sum with the measured compiled step
on the same batch, and prints each part's share and its GFLOP/s against the
GEMM rate ``tidpo-mlx doctor`` measures in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import tidpo_mlx

tidpo_mlx.setup()  # before mlx: the fast BLAS

import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import closest_pairs, config, lora_model, median_s  # noqa: E402
from run import NUM_LAYERS, load_avg  # noqa: E402

from tidpo_mlx.backend.cpu.attention import PrefixContext, PromptKV, _attend  # noqa: E402
from tidpo_mlx.backend.cpu.prefix import prompt_pass  # noqa: E402
from tidpo_mlx.batching import collate  # noqa: E402
from tidpo_mlx.config import Switch  # noqa: E402
from tidpo_mlx.doctor import gemm_gflops  # noqa: E402
from tidpo_mlx.logprobs import Head, head_parameters, token_logprobs  # noqa: E402
from tidpo_mlx.trainer import build_optimizer, compile_steps  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms of ``reps`` evaluated calls of ``fn`` after two warm-up calls."""
    return 1000 * median_s(lambda: mx.eval(fn()), reps)


def fwd_bwd(fn: Callable[..., mx.array], inputs: list[mx.array], reps: int) -> tuple[float, float]:
    """(forward ms, backward ms) of ``fn`` compiled, with respect to ``inputs``: backward = (outputs and
    input gradients together) minus forward (a linear op's gradient alone would skip its forward)."""
    f = mx.compile(fn)
    cotangent = mx.ones_like(f(*inputs))
    g = mx.compile(lambda *xs: mx.vjp(fn, list(xs), [cotangent]))
    forward = median_ms(lambda: f(*inputs), reps)
    return forward, max(0.0, median_ms(lambda: g(*inputs), reps) - forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder (e.g. from benchmarks/chat_data.py)")
    parser.add_argument("--tokens", type=float, default=512.0, help="target tokens per templated sequence")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    cfg = config(Switch.TRUE, loss_type="dpo", weighting="none", gamma=0.0)
    rt, tok = lora_model(cfg)
    model = rt.model
    rows = collate(closest_pairs(args.data, tok, cfg, args.tokens), tok.pad_token_id if tok.pad_token_id is not None else 0)
    batch, layout = rt.layout_batch(rows)  # the shared-prefix layout (DPO weights nothing)
    gemm = gemm_gflops()
    print(f"whole rows {tuple(rows.arrays['tokens'].shape)}; prompt pass {tuple(batch['prompt_tokens'].shape)}, "
          f"response pass {tuple(batch['tokens'].shape)}; GEMM {gemm:.0f} GFLOP/s; load {load_avg()}")

    layers = model.model.layers
    block = layers[-1]
    attn, mlp = block.self_attn, block.mlp
    dim = block.input_layernorm.weight.shape[0]
    kv = prompt_pass(model, rt.embed_tokens(batch["prompt_tokens"]))[-1]
    mx.eval(kv.keys, kv.values)
    ctx = PrefixContext(kv, batch["positions"], batch["attn_mask"])
    b, p = batch["prompt_tokens"].shape
    n, rc = batch["tokens"].shape
    widths = {name: getattr(attn if hasattr(attn, name) else mlp, name) for name in PROJECTIONS}
    shapes = {k: getattr(m, "linear", m).weight.shape for k, m in widths.items()}  # (out, in), LoRA's base
    inter, attn_dim = int(shapes["down_proj"][1]), int(shapes["o_proj"][1])
    weights = sum(int(o) * int(i) for o, i in shapes.values())
    heads, kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn_dim // attn.n_heads
    no_out_proj = SimpleNamespace(n_heads=heads, n_kv_heads=kv_heads, scale=attn.scale, o_proj=lambda t: t)

    def projections(x: mx.array, a: mx.array, m: mx.array) -> mx.array:
        outs = [widths[k](x) for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
        outs += [widths["o_proj"](a), widths["down_proj"](m)]
        return mx.concatenate([o.reshape(-1) for o in outs])

    parts: dict[str, tuple[float, float]] = {}
    flops: dict[str, float] = {}
    for name, tokens, kv_len, call in (
        ("prompt", (b, p), p, lambda h: block(h, "causal", PromptKV())),
        ("response", (n, rc), p + rc, lambda h: block(h, None, ctx)),
    ):
        h = mx.random.normal((*tokens, dim))
        parts[f"{name} block"] = fwd_bwd(call, [h], args.reps)
        x, a, m = (mx.random.normal((*tokens, w)) for w in (dim, attn_dim, inter))
        parts[f"{name} gemm"] = fwd_bwd(projections, [x, a, m], args.reps)
        q = mx.random.normal((tokens[0], heads, tokens[1], head_dim))
        k, v = (mx.random.normal((tokens[0], kv_heads, kv_len, head_dim)) for _ in range(2))
        if name == "prompt":
            mask = mx.triu(mx.full((p, p), -1e9), k=1)
        else:
            mask = batch["attn_mask"][:, None, None]

        def core(q: mx.array, k: mx.array, v: mx.array, mask: mx.array = mask) -> mx.array:
            return _attend(no_out_proj, q, k, v, mask)

        parts[f"{name} attention"] = fwd_bwd(core, [q, k, v], args.reps)
        count = tokens[0] * tokens[1]
        flops[f"{name} gemm"] = 2 * weights * count
        flops[f"{name} attention"] = 4 * heads * head_dim * count * kv_len

    resp = int(batch["resp_mask"].sum())
    head = Head(rt.logits, model, head_parameters(model))
    hidden = mx.random.normal((n, batch["resp_pos"].shape[1], dim))
    targets = mx.zeros(hidden.shape[:2], dtype=mx.int32)
    parts["head"] = fwd_bwd(lambda h: token_logprobs(head, h, targets, cfg.logits_chunk), [hidden], args.reps)
    vocab = int(rt.logits(mx.zeros((1, dim))).shape[-1])
    flops["head"] = 2 * dim * vocab * hidden.shape[0] * hidden.shape[1]

    opt = build_optimizer(cfg)
    opt.init(model.trainable_parameters())
    grad_step, _ = compile_steps(rt, cfg, opt)
    step = median_ms(lambda: grad_step(batch, layout)[2], args.reps)

    total, adapted = len(layers), NUM_LAYERS
    forward_blocks = total + adapted
    counts = {"rt": forward_blocks, "bwd": adapted}
    composed: dict[str, float] = {}
    for name in ("prompt", "response"):
        blk_f, blk_b = parts[f"{name} block"]
        g_f, g_b = parts[f"{name} gemm"]
        a_f, a_b = parts[f"{name} attention"]
        composed[f"{name}: gemm"] = counts["rt"] * g_f + counts["bwd"] * g_b
        composed[f"{name}: attention core"] = counts["rt"] * a_f + counts["bwd"] * a_b
        composed[f"{name}: element-wise"] = (counts["rt"] * max(0.0, blk_f - g_f - a_f)
                                             + counts["bwd"] * max(0.0, blk_b - g_b - a_b))
    h_f, h_b = parts["head"]
    composed["head (2 forward, 1 backward)"] = 2 * h_f + h_b
    whole = sum(composed.values())

    print(f"\n{'part (one call)':26s} {'rt ms':>8s} {'bwd ms':>8s} {'rt GFLOP/s':>12s}")
    for name, (f_ms, b_ms) in parts.items():
        rate = f"{flops[name] / f_ms / 1e6:12.0f}" if name in flops else " " * 12
        print(f"{name:26s} {f_ms:8.1f} {b_ms:8.1f} {rate}")
    print(f"\nDPO step as composed: {forward_blocks} block forwards ({total} policy + {adapted} reference), "
          f"{adapted} block backwards, head x3; {resp} response tokens")
    print(f"{'part of the step':34s} {'ms':>8s} {'share':>7s}")
    for name, ms in composed.items():
        print(f"{name:34s} {ms:8.0f} {ms / whole:7.0%}")
    print(f"{'composed sum':34s} {whole:8.0f}\n{'measured compiled DPO grad step':34s} {step:8.0f} "
          f"(composed / measured {whole / step:.2f}); load {load_avg()}")


if __name__ == "__main__":
    main()
