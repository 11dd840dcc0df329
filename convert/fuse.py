"""Fuse LoRA adapters into the base model and export it (flow of mlx-lm's ``fuse.py``).

By default the fused model is dequantized and written as a Hugging Face folder
(safetensors, ``config.json`` with ``rope_theta`` at top level and in
``rope_parameters``, tokenizer files) that plain
``transformers.AutoModelForCausalLM.from_pretrained`` loads. With ``quantize`` it is
re-quantized into an MLX folder instead; with ``dequantize=False`` a quantized base
stays quantized at its own bits (an MLX folder).
"""

from __future__ import annotations

from pathlib import Path

from tidpo_mlx.convert.hf import fix_rope_config
from tidpo_mlx.errors import ConvertError, MissingFileError


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir} exists and is not empty")


def fuse(model_path, adapter_path, out_dir, *, dequantize=True, quantize=None, upload_repo=None, dtype=None) -> Path:
    """Merge the LoRA adapter at ``adapter_path`` into ``model_path`` and write ``out_dir``.

    ``adapter_path`` may be ``None``: the base alone is exported (e.g. to dequantize it).
    ``dequantize`` (default True) writes full-precision weights in a Hugging Face
    folder; ``quantize={"bits": 4, "group_size": 64}`` re-quantizes the fused weights
    into an MLX folder. ``dtype`` ("float32", "float16", "bfloat16") casts the float
    parameters (quantization scales included) before fusing, default: keep the model's.
    ``upload_repo`` uploads ``out_dir`` to that Hugging Face repo.
    Raises ``ValueError`` for a non-empty ``out_dir``, bad quantize options, or a model
    whose rotary layout Hugging Face cannot represent (``rope_traditional``).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
    from mlx_lm.utils import dequantize_model, load, quantize_model, save

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if quantize is not None:
        bits, group_size = int(quantize.get("bits", 4)), int(quantize.get("group_size", 64))
        if bits not in (2, 3, 4, 6, 8) or group_size not in (32, 64, 128):
            raise ConvertError(f"quantize needs bits in 2,3,4,6,8 and group_size in 32,64,128, got {quantize}")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise ConvertError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
        raise MissingFileError(f"{Path(adapter_path) / 'adapter_config.json'} not found")

    full_precision = dequantize or quantize is not None
    model, tokenizer, config = load(
        str(model_path), adapter_path=str(adapter_path) if adapter_path else None, return_config=True
    )
    if dtype is not None:
        target = getattr(mx, dtype)
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(
            tree_map_with_path(
                lambda k, v: v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters(),
            )
        )
    fused = [(n, m.fuse(dequantize=full_precision)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))

    if full_precision:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if quantize is not None:
        model, config = quantize_model(model, config, group_size, bits)
    fix_rope_config(config)

    if dequantize and quantize is None:
        # A Hugging Face folder: make the defaults transformers would guess explicit.
        if config.get("rope_traditional"):
            raise ConvertError(
                "this model uses rope_traditional (interleaved q/k rows, e.g. straight from a GGUF): "
                "Hugging Face models cannot represent it; convert the GGUF with gguf-to-mlx first"
            )
        config.pop("rope_traditional", None)
        weights = dict(tree_flatten(model.parameters()))
        if any(k.endswith("embed_tokens.weight") for k in weights):
            config["tie_word_embeddings"] = not any(k.endswith("lm_head.weight") for k in weights)
        dtypes = {v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
        names = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
        if len(dtypes) == 1 and next(iter(dtypes)) in names:
            config["torch_dtype"] = names[next(iter(dtypes))]
        config.pop("dtype", None)

    save(out_dir, str(model_path), model, tokenizer, config, donate_model=False)
    if upload_repo:
        from tidpo_mlx.convert.hub import upload

        upload(out_dir, upload_repo)
    return out_dir
