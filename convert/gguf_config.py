"""A llama GGUF's metadata as the mlx-lm / Hugging Face ``config.json``, and the tensors it must hold."""

from __future__ import annotations

import numpy as np

from tidpo_mlx.convert.gguf_format import FLOAT_TYPES, QUANTIZED_BITS, SUPPORTED, GGUFProblem, meta_float, meta_int, meta_str, show

# GGUF tensor name (inside blk.N) -> Hugging Face module name (inside model.layers.N)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _attention(metadata: dict) -> dict:
    """Head counts and head size of a llama GGUF, checked to fit together."""
    p = "llama.attention."
    hidden = meta_int(metadata, "llama.embedding_length")
    n_heads = meta_int(metadata, p + "head_count")
    n_kv = meta_int(metadata, p + "head_count_kv", n_heads)
    head_dim = meta_int(metadata, p + "key_length", hidden // n_heads)
    if head_dim < 2 or head_dim % 2 or n_heads % n_kv:
        raise GGUFProblem(
            f"GGUF attention does not fit together: {n_heads} heads, {n_kv} KV heads, head size {head_dim} "
            "(need an even head size and heads a multiple of KV heads)"
        )
    if meta_int(metadata, p + "value_length", head_dim) != head_dim:
        raise GGUFProblem("GGUF key_length != value_length is not supported for llama")
    if meta_int(metadata, "llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFProblem("GGUF partial rotary embedding (rope.dimension_count != head_dim) is not supported")
    return {"hidden_size": hidden, "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim}


def _rope(metadata: dict) -> dict:
    """``rope_theta``, ``rope_parameters`` and (linear scaling) ``rope_scaling`` of a llama GGUF."""
    theta = meta_float(metadata, "llama.rope.freq_base", 10000.0)
    scaling = meta_str(metadata, "llama.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    if scaling != "linear":
        raise GGUFProblem(f"GGUF RoPE scaling {scaling!r} is not supported (only linear)")
    factor = meta_float(metadata, "llama.rope.scaling.factor", 1.0)
    return {
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "linear", "rope_theta": theta, "factor": factor},
        "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": factor},
    }


def model_config(metadata: dict, tensors: dict) -> dict:
    """The mlx-lm / Hugging Face ``config.json`` of a llama GGUF."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFProblem(f"GGUF architecture {show(arch)} is not supported (only 'llama')")
    p = "llama."
    if meta_int(metadata, p + "expert_count", 0, minimum=0) > 0:
        raise GGUFProblem("GGUF llama mixture-of-experts models are not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFProblem("GGUF has no tensor 'token_embd.weight'")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **_attention(metadata),
        "num_hidden_layers": meta_int(metadata, p + "block_count"),
        "intermediate_size": meta_int(metadata, p + "feed_forward_length"),
        "rms_norm_eps": meta_float(metadata, p + "attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": tensors["token_embd.weight"][1][0],
        "max_position_embeddings": meta_int(metadata, p + "context_length", 2048),
        **_rope(metadata),
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "hidden_act": "silu",
    }
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = meta_int(metadata, key, minimum=0)
    return config


def _expected_shapes(config: dict, tensors: dict) -> dict[str, tuple[int, ...]]:
    """The row-major shape of every tensor a llama GGUF with ``config`` holds."""
    h, hd, ffn, vocab = config["hidden_size"], config["head_dim"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    layer = {
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q), "ffn_gate": (ffn, h),
        "ffn_up": (ffn, h), "ffn_down": (h, ffn), "attn_norm": (h,), "ffn_norm": (h,),
    }  # fmt: skip
    biases = ["attn_q", "attn_k", "attn_v", "attn_output"] * config["attention_bias"]
    biases += ["ffn_gate", "ffn_up", "ffn_down"] * config["mlp_bias"]
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (vocab, h)
    if "rope_freqs.weight" in tensors:
        shapes["rope_freqs.weight"] = (hd // 2,)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{short}.weight": shape for short, shape in layer.items()})
        shapes.update({f"blk.{i}.{short}.bias": layer[short][:1] for short in biases})
    return shapes


def check_tensors(config: dict, tensors: dict) -> None:
    """Every tensor a llama of ``config`` needs, no other, each of its shape and a supported type.

    Run before ``mx.load``: what the (slow, C++) load gives back then fits the model.
    """
    n_layers = config["num_hidden_layers"]
    if n_layers * len(LAYER_NAMES) > len(tensors):
        raise GGUFProblem(f"GGUF block_count is {n_layers}, but the file has only {len(tensors)} tensors")
    want = _expected_shapes(config, tensors)
    for name, (ttype, shape) in tensors.items():
        if name not in want:
            raise GGUFProblem(f"GGUF tensor {name!r} has no llama counterpart (not supported)")
        if shape != want[name]:
            raise GGUFProblem(f"GGUF tensor {name!r} has shape {shape}, the metadata needs {want[name]}")
        if ttype not in QUANTIZED_BITS and ttype not in FLOAT_TYPES:
            raise GGUFProblem(
                f"GGUF tensor {name!r} has type {ttype}, which is not supported (supported: {', '.join(SUPPORTED)})"
            )
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise GGUFProblem(f"GGUF has no tensor {missing[0]!r} ({len(missing)} missing)")


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Llama 3.1+ ``rope_scaling`` recovered from llama.cpp's ``rope_freqs`` tensor.

    The file stores only the per-frequency factors; we try the usual
    parameters and keep the ones that reproduce them (else a clear error).
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    for original in (8192, 4096, 16384, 32768, 2048, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            smooth = (original / wavelen - low) / (high - low)
            want = np.where(
                wavelen < original / high,
                1.0,
                np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if want.shape == factors.shape and np.allclose(want, factors, rtol=1e-4, atol=1e-6):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise GGUFProblem("GGUF rope_freqs tensor does not match Llama 3 RoPE scaling (not supported)")

