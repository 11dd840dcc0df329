"""A llama GGUF's tensors under Hugging Face names, quantized ones kept as MLX affine groups of 32."""

from __future__ import annotations

import numpy as np

from tidpo_mlx.convert.gguf_config import LAYER_NAMES, TOP_NAMES, check_tensors, llama3_rope_scaling, model_config
from tidpo_mlx.convert.gguf_format import GROUP_SIZE, QUANTIZED_BITS, GGUFProblem, naming, read_gguf_header


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFProblem(f"GGUF tensor {gguf_name!r} has no llama counterpart (not supported)")


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation (``LlamaModel.permute``).

    llama.cpp writes ``w.reshape(n, 2, d/2, ...).swapaxes(1, 2)``, i.e. row
    ``perm[i]`` of the Hugging Face matrix lands at row ``i``; the inverse
    gathers with ``argsort(perm)``.
    """
    head_dim = rows // n_heads
    perm = np.arange(rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(perm)



def read_gguf(gguf_path, *, unpermute: bool = True) -> tuple[dict, dict]:
    """``(weights, config)``: a llama GGUF's tensors under Hugging Face names.

    Quantized tensors come as MLX affine ``weight``/``scales``/``biases``;
    ``config`` is the ``config.json`` (with ``"quantization"`` when any tensor
    is quantized, per-module overrides where a tensor's bits differ from the
    most common). ``unpermute=False`` keeps llama.cpp's q/k row order, which
    needs ``rope_traditional=True`` (for comparisons only; do not train on it).
    A malformed or unsupported file is a one-line ``ConvertError`` naming it.
    """
    metadata, tensors = read_gguf_header(gguf_path)
    with naming(gguf_path):
        return load_weights(gguf_path, metadata, tensors, unpermute)


def _quantized_parts(raw: dict, name: str, ttype: str, shape: tuple, module: str) -> tuple[dict, int]:
    """``({module}.scales / .biases: array}, bits)`` of a quantized tensor as ``mx.load`` gave it."""
    base = name.rsplit(".", 1)[0]
    w, scales = raw[name], raw[f"{base}.scales"]
    got = w.shape[-1] // scales.shape[-1] if scales.shape[-1] * GROUP_SIZE == shape[-1] else None
    if got != QUANTIZED_BITS[ttype]:
        raise GGUFProblem(
            f"GGUF tensor {name!r} ({ttype}, shape {shape}) loaded as weight {w.shape}, "
            f"scales {scales.shape}: not {QUANTIZED_BITS[ttype]}-bit groups of {GROUP_SIZE}"
        )
    return {f"{module}.scales": scales, f"{module}.biases": raw[f"{base}.biases"]}, got


def _quantization_config(bits: dict[str, int]) -> dict:
    """``quantization`` / ``quantization_config``: the most common bits, overrides for the other modules."""
    counts = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    default = max(counts, key=lambda b: (counts[b], -b))
    quant = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, b in sorted(bits.items()):
        if b != default:
            quant[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return {"quantization": quant, "quantization_config": quant}


def load_weights(gguf_path, metadata: dict, tensors: dict, unpermute: bool) -> tuple[dict, dict]:
    """``(weights, config)`` of a GGUF whose header is ``(metadata, tensors)``, checked before ``mx.load``."""
    import mlx.core as mx

    config = model_config(metadata, tensors)
    check_tensors(config, tensors)
    raw = mx.load(str(gguf_path))

    weights, bits = {}, {}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: factors, not a weight
        factors = np.array(raw.pop("rope_freqs.weight").astype(mx.float32))
        scaling = llama3_rope_scaling(factors, config["rope_theta"], config["head_dim"])
        config["rope_scaling"] = scaling
        config["rope_parameters"] = {**scaling, "rope_theta": config["rope_theta"]}
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, (ttype, shape) in tensors.items():
        if name == "rope_freqs.weight":
            continue
        hf = hf_name(name)
        module = hf.rsplit(".", 1)[0]
        parts = {hf: raw[name]}
        if ttype in QUANTIZED_BITS:
            extra, bits[module] = _quantized_parts(raw, name, ttype, shape, module)
            parts.update(extra)
        elif ttype == "BF16" and not mx.all(mx.isfinite(raw[name])).item():
            raise GGUFProblem(f"GGUF tensor {name!r} (BF16) overflows float16 when loaded")
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if unpermute and kind in n_heads:
            rows = mx.array(unpermute_rows(n_heads[kind], shape[0]))
            parts = {k: mx.take(v, rows, axis=0) for k, v in parts.items()}
        weights.update(parts)

    if bits:
        config.update(_quantization_config(bits))
    floats = [v.dtype for k, v in weights.items() if not k.endswith(("norm.weight", ".biases"))]
    config["torch_dtype"] = "float32" if all(d == mx.float32 for d in floats if d != mx.uint32) else "float16"
    return weights, config

