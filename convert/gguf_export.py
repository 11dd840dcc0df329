"""MLX model (+ LoRA adapter) -> a GGUF that llama.cpp, Ollama and LM Studio run.

``to_gguf`` loads the base the way training does (a built-in name, a ``.gguf``,
an MLX folder, quantized ones dequantized, or a Hugging Face folder / id),
attaches the adapter with its own settings (names and shapes checked against
the base), merges it (``W + scale * (A B)^T``, what ``convert fuse`` does) and
writes the family's GGUF layout (:mod:`gguf_families`) and tokenizer
(:mod:`gguf_vocab`) with the ``gguf`` package, as ``f16``, ``q8_0`` or ``q4_0``.

``lora_to_gguf`` writes the adapter alone as a GGUF LoRA (``llama-cli --lora``):
``lora_a`` is ``A^T`` (rank x in), ``lora_b`` is ``B^T`` (out x rank) with
the q/k rows permuted as the base export permutes them, and
``adapter.lora.alpha = scale * rank`` so llama.cpp's ``alpha / rank`` is our scale.

Either file is written under a temporary name in the output folder and renamed
when complete; on any failure the temporary file is removed, so no
half-written ``.gguf`` is ever left.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tidpo_mlx.convert.gguf_families import check, gguf_tensors, permuted_heads, permute, tensor_namer, write_hyperparameters
from tidpo_mlx.errors import ConvertError, MissingFileError, ModelError
from tidpo_mlx.files import WriteError, atomic_write

OUTTYPES = ("f16", "q8_0", "q4_0")
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2}  # gguf.LlamaFileType MOSTLY_*
BLOCK = 32  # Q8_0 / Q4_0 block size


def check_output(out_file: Path, overwrite: bool) -> Path:
    """``out_file`` as a ``.gguf`` path that may be written: refused when it exists (unless ``overwrite``)."""
    out_file = Path(out_file)
    if out_file.suffix != ".gguf":
        raise ConvertError(f"{out_file}: the output file name must end in .gguf")
    if out_file.is_dir():
        raise ConvertError(f"{out_file}: is a folder, not a file name")
    if out_file.exists() and not overwrite:
        raise ConvertError(f"{out_file} exists (pass --overwrite to replace it)")
    return out_file


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename (``files.atomic_write``); the temporary
    file never outlives a failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"{path}: cannot create its folder ({err.strerror or err})") from None
    atomic_write(path, write)


def _adapter_settings(adapter_path) -> dict:
    """``adapter_config.json`` of an mlx-lm adapter folder (missing: an error naming it)."""
    file = Path(adapter_path) / "adapter_config.json"
    if not file.is_file():
        raise MissingFileError(f"{file} not found (not an mlx-lm adapter folder)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{file}: not valid JSON ({err})") from None


def load_for_export(model_spec: str, adapter_path=None) -> tuple[Any, Any, dict, Path]:
    """``(model, tokenizer, config, folder)``: the base in float32 with the adapter attached (not merged)."""
    from tidpo_mlx.config import build_config
    from tidpo_mlx.models import load_adapted, resolve_model

    folder = resolve_model(str(model_spec))
    config = json.loads((folder / "config.json").read_text())
    check(config)
    if adapter_path is not None:
        _adapter_settings(adapter_path)
    try:
        loaded = load_adapted(str(folder), str(adapter_path) if adapter_path else None,
                              build_config({"dequantize": "true"}))
    except ModelError as err:
        if adapter_path is None:
            raise
        raise ConvertError(f"{err} (was the adapter trained on this base?)") from None
    return loaded[0], loaded[1], config, folder


def merged_weights(model) -> dict[str, np.ndarray]:
    """Every parameter as float32 numpy, LoRA merged into its linear layer (Hugging Face names)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def _tensor_type(name: str, w: np.ndarray, outtype: str, tied: bool):
    """The GGML type of one tensor: 1-D in F32; 2-D in ``outtype`` (``q4_0``: the output matrix in Q8_0)."""
    from gguf import GGMLQuantizationType as T

    if w.ndim < 2:
        return T.F32
    if outtype == "f16" or w.shape[-1] % BLOCK:
        return T.F16
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    return T.Q8_0 if outtype == "q8_0" or output else T.Q4_0


def _add_tensor(writer, name: str, w: np.ndarray, qtype) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    elif qtype == T.F16:
        writer.add_tensor(name, np.ascontiguousarray(w, np.float16))
    else:
        writer.add_tensor(name, quantize(np.ascontiguousarray(w, np.float32), qtype), raw_dtype=qtype)


def write_gguf_model(path: Path, arch: str, config: dict, weights: dict, tokenizer, outtype: str, name: str) -> None:
    """Write the GGUF of ``weights`` (merged, Hugging Face names) and ``tokenizer`` to ``path``."""
    import gguf

    from tidpo_mlx.convert.gguf_vocab import write_tokenizer

    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    tensors = list(gguf_tensors(arch, config, weights))
    tied = "output.weight" not in dict(tensors)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(FILE_TYPES[outtype])
        if outtype != "f16":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hyperparameters(writer, arch, config, n_vocab)
        write_tokenizer(writer, tokenizer, n_vocab)
        for tname, w in tensors:
            _add_tensor(writer, tname, w, _tensor_type(tname, w, outtype, tied))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(path, write)


def to_gguf(model_spec: str, out_file, *, adapter_path=None, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Merge ``adapter_path`` into ``model_spec`` and write the GGUF ``out_file`` (returned).

    ``outtype``: ``f16`` (2-D weights in float16, 1-D in float32), ``q8_0``, or
    ``q4_0`` (the output matrix, or the tied embedding, in Q8_0). Rows whose
    length is not a multiple of 32 stay in float16.
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out_file = check_output(out_file, overwrite)
    model, tokenizer, config, folder = load_for_export(model_spec, adapter_path)
    arch = check(config)
    weights = merged_weights(model)
    name = Path(str(model_spec)).stem if adapter_path is None else f"{Path(str(model_spec)).stem}-{Path(adapter_path).name}"
    write_gguf_model(out_file, arch, config, weights, tokenizer._tokenizer, outtype, name)
    return out_file


def lora_tensors(model, arch: str, config: dict) -> tuple[list[tuple[str, np.ndarray]], float]:
    """``([(gguf name, array)], alpha)`` of the LoRA layers attached to ``model``."""
    import mlx.core as mx

    from tidpo_mlx.models import SwitchableLoRALinear

    namer = tensor_namer(arch, config["num_hidden_layers"])
    heads = permuted_heads(arch, config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SwitchableLoRALinear)}
    tensors, alphas = [], set()
    for module, layer in sorted(layers.items()):
        a = np.array(layer.lora_a.astype(mx.float32)).T  # (rank, in)
        b = np.array(layer.lora_b.astype(mx.float32)).T  # (out, rank)
        for suffix, n in heads.items():
            if module.endswith(suffix):
                b = permute(b, n)
        base = namer(f"{module}.weight")
        tensors += [(f"{base}.lora_a", np.ascontiguousarray(a)), (f"{base}.lora_b", np.ascontiguousarray(b))]
        alphas.add(float(layer.scale) * a.shape[0])
    if not tensors:
        raise ConvertError("the adapter has no LoRA layers")
    if len(alphas) != 1:
        raise ConvertError(f"the adapter's LoRA layers have different scale x rank ({sorted(alphas)}): one alpha is needed")
    return tensors, alphas.pop()


def lora_to_gguf(model_spec: str, adapter_path, out_file, *, overwrite: bool = False) -> Path:
    """Write the LoRA adapter ``adapter_path`` (trained on ``model_spec``) as a GGUF LoRA ``out_file``."""
    import gguf

    out_file = check_output(out_file, overwrite)
    settings = _adapter_settings(adapter_path)
    kind = settings.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ConvertError(
            f"{Path(adapter_path) / 'adapter_config.json'}: fine_tune_type {kind!r} is not a LoRA adapter; "
            "export the merged model without --lora-only"
        )
    model, _, config, _ = load_for_export(model_spec, adapter_path)
    arch = check(config)
    tensors, alpha = lora_tensors(model, arch, config)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(Path(adapter_path).name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, w in tensors:
            writer.add_tensor(name, w.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(out_file, write)
    return out_file
