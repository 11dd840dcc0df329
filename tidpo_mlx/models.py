"""Models: resolve and load, dequantize for CPU, LoRA with an off switch, adapters I/O.

The policy ``pi`` is the base model with trainable LoRA adapters; the reference
``ref`` (:class:`Reference`, returned by :func:`attach_trainable`) is the very
same module with the adapters switched off (one copy in memory). The switch is
a Python flag read while a function is traced, so it works inside
``mx.compile``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from tidpo_mlx.config import Config, LoRAParameters, Switch
from tidpo_mlx.errors import ModelError, first_line
from tidpo_mlx.files import atomic_save_safetensors, atomic_write_text


class SwitchableLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear (same parameters, same file format) with an off switch.

    ``enabled = False`` makes the layer compute the frozen base ``W x`` only: the
    reference model ``ref`` (docs/method.md).
    """

    enabled: bool = True

    @staticmethod
    def wrap(linear: nn.Module, rank: int, scale: float, dropout: float) -> "SwitchableLoRALinear":
        """LoRA around a Linear or QuantizedLinear (lora_b starts at zero)."""
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        layer = SwitchableLoRALinear(in_dims, out_dims, r=rank, dropout=dropout, scale=scale)
        layer.linear = linear
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        """``W x + scale * B A x`` (LoRALinear's function), or ``W x`` when switched off.

        The scale multiplies ``lora_b``, not the activations: MLX 0.32's
        ``mx.compile`` fails (``IndexError: _Map_base::at``) on a nested
        gradient through an activation scaled by a constant and then split,
        as fused ``qkv_proj`` / ``gate_up_proj`` layers (phi3) are.
        """
        y = self.linear(x)
        if not self.enabled:
            return y
        z = (self.dropout(x) @ self.lora_a) @ (self.scale * self.lora_b)
        return y + z.astype(x.dtype)


def lora_layers(model: nn.Module) -> list[SwitchableLoRALinear]:
    """Every switchable LoRA layer of ``model``."""
    return [m for _, m in model.named_modules() if isinstance(m, SwitchableLoRALinear)]


class Reference:
    """The reference model ``ref`` of a policy (docs/method.md, Notation): its switch and its compiled state.

    LoRA: the policy's own module with every adapter switched off (one copy in
    memory). Full fine-tuning: the trained blocks' original ``weights`` swapped
    in (arrays are immutable, so the copy costs memory only once the weights
    have changed). A model without adapters is its own reference.
    """

    def __init__(self, model: nn.Module, weights: dict[str, mx.array] | None = None):
        self.model = model
        self.weights = weights

    @property
    def state(self) -> dict[str, mx.array]:
        """The arrays a compiled function must take as inputs so it never bakes them in (full fine-tuning)."""
        return self.weights if self.weights is not None else {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the reference inside this block (read while a function is traced, so it works in ``mx.compile``)."""
        if self.weights is not None:
            current = self.model.trainable_parameters()
            self.model.update(tree_unflatten(list(self.weights.items())))
            try:
                yield
            finally:
                self.model.update(current)
            return
        layers = lora_layers(self.model)
        for layer in layers:
            layer.enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.enabled = True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run this block with the model in eval mode (no dropout); its earlier mode comes back after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def resolve_model(spec: str) -> Path:
    """A local MLX/HF folder for a built-in name, a .gguf file, a folder or a Hub id.

    A folder whose ``config.json`` mlx-lm would misread comes back as its
    :func:`corrected_folder`, so whatever is printed or saved with this path
    (``mlx_lm.generate --model``, ``adapter_config.json``) loads the same model.
    """
    from tidpo_mlx import builtin

    if spec in builtin.BUILTIN_MODELS:
        return builtin.fetch_builtin(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        from tidpo_mlx.convert.gguf import cached_mlx_folder

        return cached_mlx_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec}: folder has no config.json (not a Hugging Face/MLX model)")
        return corrected_folder(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"{spec}: not a model folder, .gguf file, Hugging Face id or built-in name "
            f"({', '.join(builtin.BUILTIN_MODELS)})"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                spec,
                allow_patterns=["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"],
            )
        )
    except Exception as err:  # the Hub client raises many types; the message is what matters
        raise ModelError(
            f"{spec}: not cached and could not be downloaded from the Hugging Face Hub ({first_line(err)})"
        ) from None
    return corrected_folder(folder)


def _read_config(path: Path) -> dict[str, Any]:
    with open(path / "config.json") as f:
        return json.load(f)


def _rope_keys(params: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's top-level keys for one flat ``rope_parameters`` object (theta, scaling, partial rotary factor)."""
    out: dict[str, Any] = {}
    if params.get("rope_theta") is not None:
        out["rope_theta"] = params["rope_theta"]
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        out["rope_scaling"] = {**scaling, "type": rope_type, "rope_type": rope_type}
    return out


def rope_fix(config: dict[str, Any]) -> dict[str, Any]:
    """Config overrides so mlx-lm reads the rope settings transformers 5 writes only under ``rope_parameters``.

    mlx-lm 0.32 reads top-level ``rope_theta`` / ``rope_scaling`` (and
    ``partial_rotary_factor``; Gemma 3: ``rope_local_base_freq``) and would
    silently fall back to its defaults. ``rope_parameters`` is flat (one
    object: theta plus Llama-3 / YaRN / linear / longrope scaling) or per
    layer type (Gemma 3: ``full_attention`` / ``sliding_attention``). As in
    transformers, ``rope_parameters`` wins over top-level keys; the scaling
    carries both ``type`` and ``rope_type`` (mlx-lm's phi3 reads the first).
    Returns only the keys whose value differs from ``config``'s.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return {}
    if all(isinstance(v, dict) for v in params.values()):
        found = _rope_keys(params.get("full_attention") or {})
        local = params.get("sliding_attention") or {}
        if local.get("rope_theta") is not None:
            found["rope_local_base_freq"] = local["rope_theta"]
    else:
        found = _rope_keys(params)
    return {k: v for k, v in found.items() if config.get(k) != v}


FIXED_VERSION = 1
"""Bump when :func:`rope_fix` changes what it writes (invalidates the cached corrected folders)."""


def corrected_folder(path: Path) -> Path:
    """``path`` itself when mlx-lm reads its ``config.json`` right, else a cached copy it reads right.

    The copy (under the tidpo-mlx cache, ``fixed/``) holds ``config.json``
    with :func:`rope_fix` applied and links to every other file, so
    ``mlx_lm.generate --model <copy>`` loads the model tidpo-mlx trains.
    Keyed by the folder's resolved path and its config's content.
    """
    from tidpo_mlx.convert.gguf import cache_root

    config = _read_config(path)
    fix = rope_fix(config)
    if not fix:
        return path
    source = path.resolve()
    digest = hashlib.sha256(f"{source}:{json.dumps(config, sort_keys=True)}:{FIXED_VERSION}".encode()).hexdigest()
    folder = cache_root() / "fixed" / f"{source.name}-{digest[:12]}"
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (tmp / item.name).symlink_to(item.resolve())
    atomic_write_text(tmp / "config.json", json.dumps({**config, **fix}, indent=2))
    try:
        tmp.rename(folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (Linux CPU wheel, or forced)."""
    return mx.default_device().type == mx.DeviceType.cpu


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a model folder, with the eos ids of its ``config.json`` (no weights read)."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(path, eos_token_ids=_read_config(path).get("eos_token_id"))


def load_base(path: Path, dequantize: Switch = Switch.AUTO) -> tuple[nn.Module, Any, list[str]]:
    """Load model + tokenizer with mlx-lm; return (model, tokenizer, notes for the log).

    MLX's CPU ``quantized_matmul`` is far slower than its fp32 GEMM (numbers in
    ``benchmarks/RESULTS.md``), so ``dequantize: auto`` dequantizes the frozen
    base to float32 on the CPU; on a GPU it stays quantized unless forced. How
    the model then runs is its runtime's business (``backend.select``).
    """
    from mlx_lm.utils import dequantize_model, load_model

    try:
        model, _ = load_model(path, model_config=rope_fix(_read_config(path)))
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise ModelError(f"{path}: mlx-lm cannot load this model ({err})") from None
    tokenizer = load_tokenizer(path)
    notes = []
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if quantized and dequantize.resolve(on_cpu()):
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        notes.append("frozen base dequantized to float32 for compute (dequantize: false keeps it quantized)")
    return model, tokenizer, notes


LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def attach_lora(model: nn.Module, cfg: Config) -> Reference:
    """Freeze the base and put LoRA on the last ``num_layers`` blocks; return the reference (adapters off).

    On ``cfg.lora_parameters.keys``, or with no keys on every Linear /
    QuantizedLinear of each block, fused ones (``qkv_proj``, ``gate_up_proj``)
    included, as mlx-lm does. A key that names no linear layer of those
    blocks is an error listing the ones they have.
    """
    lp = cfg.lora_parameters
    model.freeze()
    blocks = model.layers if cfg.num_layers < 0 else model.layers[-cfg.num_layers:]
    if cfg.num_layers > len(model.layers):
        raise ModelError(f"num_layers={cfg.num_layers} but the model has {len(model.layers)} blocks")
    found, linear = set(), set()
    for block in blocks:
        layers = {key: m for key, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
        linear.update(layers)
        keys = [key for key in layers if not lp.keys or key in lp.keys]
        found.update(keys)
        block.update_modules(
            tree_unflatten([(key, SwitchableLoRALinear.wrap(layers[key], lp.rank, lp.scale, lp.dropout)) for key in keys])
        )
    missing = set(lp.keys) - found
    if missing or not found:
        raise ModelError(
            f"lora_parameters.keys: {', '.join(sorted(missing)) or 'the default'} names no linear layer of the "
            f"blocks; they have: {', '.join(sorted(linear)) or 'none'}"
        )
    return Reference(model)


def lora_keys(model: nn.Module) -> list[str]:
    """The paths inside a block of every LoRA layer (mlx-lm's ``lora_parameters.keys``)."""
    return sorted({key for block in model.layers for key, m in block.named_modules() if isinstance(m, SwitchableLoRALinear)})


def attach_full(model: nn.Module, cfg: Config) -> Reference:
    """Make every parameter of the last ``num_layers`` blocks trainable (mlx-lm's full fine-tuning).

    Returns the reference: the original weights of those blocks.
    """
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ModelError("fine_tune_type full needs an unquantized base: set 'dequantize: true'")
    if cfg.num_layers > len(model.layers):
        raise ModelError(f"num_layers={cfg.num_layers} but the model has {len(model.layers)} blocks")
    model.freeze()
    for block in model.layers if cfg.num_layers < 0 else model.layers[-cfg.num_layers:]:
        block.unfreeze()
    return Reference(model, dict(tree_flatten(model.trainable_parameters())))


def attach_trainable(model: nn.Module, cfg: Config) -> Reference:
    """LoRA or full fine-tuning, as ``cfg.fine_tune_type`` says; returns the reference of the policy."""
    if cfg.fine_tune_type == "full":
        return attach_full(model, cfg)
    return attach_lora(model, cfg)


def adapter_config(cfg: Config, model_path: Path) -> dict[str, Any]:
    """``adapter_config.json``: mlx-lm's keys (so ``--adapter-path`` loads it) plus the run's config."""
    from tidpo_mlx import builtin

    hf_id = builtin.BUILTIN_MODELS[cfg.model].hf_id if cfg.model in builtin.BUILTIN_MODELS else cfg.model
    lp = cfg.lora_parameters
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": {"rank": lp.rank, "scale": lp.scale, "dropout": lp.dropout, "keys": list(lp.keys)},
        "model": str(model_path),
        "base_model_name_or_path": hf_id,
        "tidpo_mlx": cfg.to_dict(),
    }


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter weights (flat names as in ``adapters.safetensors``)."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` in mlx-lm's format.

    Default (empty) LoRA keys are written out as the model's :func:`lora_keys`,
    so mlx-lm's ``--adapter-path`` puts LoRA on the very same layers.
    """
    lp = config.get("lora_parameters")
    if config.get("fine_tune_type", "lora") == "lora" and lp is not None and not lp.get("keys"):
        config = {**config, "lora_parameters": {**lp, "keys": lora_keys(model)}}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "adapters.safetensors", trainable_weights(model))
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2))


def load_adapter_weights(model: nn.Module, file: str | Path) -> None:
    """Load adapter (or fully fine-tuned block) weights into a prepared model, checking names and shapes."""
    path = Path(file)
    if path.is_dir():
        path = path / "adapters.safetensors"
    if not path.exists():
        raise ModelError(f"{path}: no adapter file")
    weights = mx.load(str(path))
    own = trainable_weights(model)
    for name, w in weights.items():
        if name not in own:
            raise ModelError(f"{path}: '{name}' is not an adapter parameter of this model/config")
        if w.shape != own[name].shape:
            raise ModelError(
                f"{path}: '{name}' has shape {tuple(w.shape)}, the model expects {tuple(own[name].shape)} "
                "(rank or layer mismatch)"
            )
    missing = set(own) - set(weights)
    if missing:
        raise ModelError(f"{path}: missing adapter weights, e.g. '{sorted(missing)[0]}'")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def load_adapted(model_spec: str, adapter_path: str | None,
                 cfg: Config) -> tuple[nn.Module, Any, Path, Reference]:
    """Base model, plus the adapters of ``adapter_path`` with that folder's own settings.

    Returns (model, tokenizer, model folder, reference): the reference stays
    the base without the adapters (LoRA off, or the original weights for a
    full fine-tune).
    """
    path = resolve_model(model_spec)
    dequantize = cfg.dequantize
    saved = None
    if adapter_path is not None:
        cfg_file = Path(adapter_path) / "adapter_config.json"
        if not cfg_file.exists():
            raise ModelError(f"{adapter_path}: no adapter_config.json")
        saved = json.loads(cfg_file.read_text())
        if saved.get("fine_tune_type", "lora") == "full":
            dequantize = Switch.TRUE
    model, tokenizer, _ = load_base(path, dequantize)
    reference = Reference(model)
    if saved is not None:
        lp = saved.get("lora_parameters") or {}
        adapter_cfg = dataclasses.replace(
            cfg,
            fine_tune_type=saved.get("fine_tune_type", "lora"),
            num_layers=saved["num_layers"],
            lora_parameters=LoRAParameters(
                rank=lp.get("rank", 8),
                scale=lp.get("scale", 20.0),
                dropout=lp.get("dropout", 0.0),
                keys=tuple(lp.get("keys") or ()),
            ),
        )
        reference = attach_trainable(model, adapter_cfg)
        load_adapter_weights(model, adapter_path)
    return model, tokenizer, path, reference
