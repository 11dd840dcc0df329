"""What llama.cpp expects of each model family in a GGUF: architecture, hyperparameters, tensor layout.

Follows llama.cpp's ``convert_hf_to_gguf.py`` family by family:

- ``llama`` / ``mistral`` (llama.cpp ``llama``): interleaved RoPE, so the q/k
  rows (weights and biases) are permuted (``LlamaModel.permute``); Llama 3
  RoPE scaling becomes a ``rope_freqs`` tensor of per-frequency factors.
- ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms): NeoX RoPE, rows as they are.
- ``gemma2`` / ``gemma3_text``: norms store ``1 + w`` (llama.cpp multiplies by
  the weight as is), logit softcaps, sliding window (Gemma 3: its pattern and
  the local RoPE base).
- ``phi3``: fused ``qkv_proj`` / ``gate_up_proj`` kept fused (``attn_qkv``,
  ``ffn_up`` of twice the width), partial rotary dimension count.

Names come from the ``gguf`` package's tensor map for the architecture.
A setting llama.cpp would run differently (another RoPE scaling, a Gemma
query scale llama.cpp does not use) is refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
import numpy as np

from tidpo_mlx.errors import ConvertError

# mlx-lm model_type -> llama.cpp architecture
ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
}  # fmt: skip
NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales queries by 1/sqrt(hidden/heads) there


def architecture(config: dict) -> str:
    """The llama.cpp architecture of an mlx-lm ``config.json`` (an unsupported family is an error naming it)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConvertError(
            f"model family {model_type!r} cannot be exported to GGUF (supported: {', '.join(ARCHITECTURES)})"
        )
    return ARCHITECTURES[model_type]


def head_dim(config: dict) -> int:
    """Attention head size: ``head_dim`` when set, else hidden size / heads."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_scaling(config: dict) -> dict | None:
    """The RoPE scaling of a config (``None`` for none / ``default``)."""
    scaling = config.get("rope_scaling")
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    return scaling


def _rope_type(scaling: dict) -> str:
    return str(scaling.get("rope_type", scaling.get("type")))


def check(config: dict) -> str:
    """The architecture, after refusing what llama.cpp would run differently from mlx-lm."""
    arch = architecture(config)
    scaling = rope_scaling(config)
    allowed = {"llama": ("linear", "llama3"), "qwen2": ("linear",), "qwen3": ("linear",), "gemma3": ("linear",)}
    if scaling is not None and _rope_type(scaling) not in allowed.get(arch, ()):
        raise ConvertError(
            f"RoPE scaling {_rope_type(scaling)!r} of a {config['model_type']} model is not supported for GGUF export "
            f"(supported for it: {', '.join(allowed.get(arch, ())) or 'none'})"
        )
    if arch in GEMMA_27B_LAYERS:
        heads = config["num_attention_heads"]
        wanted = (config["hidden_size"] // heads) if config["num_hidden_layers"] == GEMMA_27B_LAYERS[arch] else head_dim(config)
        if config.get("query_pre_attn_scalar", wanted) != wanted:
            raise ConvertError(
                f"query_pre_attn_scalar {config['query_pre_attn_scalar']} is not what llama.cpp uses for this "
                f"{config['model_type']} ({wanted}): it would scale the queries differently"
            )
    if arch == "llama" and config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError("partial rotary embedding (partial_rotary_factor) is not supported for llama GGUF export")
    return arch


def write_hyperparameters(writer, arch: str, config: dict, n_vocab: int) -> None:
    """The ``{arch}.*`` metadata llama.cpp reads for this family."""
    from gguf import RopeScalingType

    heads, hd = config["num_attention_heads"], head_dim(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_vocab_size(n_vocab)
    default_theta = {"gemma3": 1_000_000.0}.get(arch, 10000.0)
    writer.add_rope_freq_base(float(config.get("rope_theta", default_theta)))
    if arch == "phi3":
        rot = int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // heads
        writer.add_rope_dimension_count(rot)
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings",
                                                            config.get("max_position_embeddings", 2048))))
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    else:
        writer.add_rope_dimension_count(hd)
    scaling = rope_scaling(config)
    if scaling is not None and _rope_type(scaling) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
        writer.add_sliding_window(int(config.get("sliding_window", 4096)))
    if arch == "gemma3":
        writer.add_sliding_window(int(config.get("sliding_window", 4096)))
        writer.add_sliding_window_pattern(int(config.get("sliding_window_pattern", 6)))
        writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face q/k rows -> interleaved-RoPE rows (axis 0)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(arch: str, config: dict) -> dict[str, int]:
    """Module suffix -> head count for the rows llama.cpp permutes (llama only)."""
    if arch != "llama":
        return {}
    heads = config["num_attention_heads"]
    return {"self_attn.q_proj": heads, "self_attn.k_proj": config.get("num_key_value_heads") or heads}


def llama3_rope_factors(config: dict, scaling: dict) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp reads for Llama 3 RoPE scaling (one factor per frequency)."""
    base, dim = float(config.get("rope_theta", 10000.0)), head_dim(config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth))
    )
    return factors.astype(np.float32)


def tensor_namer(arch: str, n_layers: int):
    """``hf_name -> gguf_name`` for ``arch`` (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    def name(hf: str) -> str:
        out = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise ConvertError(f"tensor {hf!r} has no llama.cpp {arch} counterpart")
        return out

    return name


def gguf_tensors(arch: str, config: dict, weights: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """``(gguf name, float32 array)`` for every weight (Hugging Face names), in llama.cpp's layout."""
    name = tensor_namer(arch, config["num_hidden_layers"])
    heads = permuted_heads(arch, config)
    shift = NORM_SHIFT.get(arch, 0.0)
    for hf, w in weights.items():
        module = hf.rsplit(".", 1)[0]
        for suffix, n in heads.items():
            if module.endswith(suffix):
                w = permute(w, n)
        if shift and hf.endswith("norm.weight"):
            w = w + np.float32(shift)
        yield name(hf), w
    scaling = rope_scaling(config)
    if scaling is not None and _rope_type(scaling) == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config, scaling)

