"""MLX LoRA adapters <-> Hugging Face PEFT LoRA adapters.

An mlx-lm adapter folder holds ``adapters.safetensors`` (``<prefix>layers.N.<module>.lora_a``
of shape (in, r) and ``.lora_b`` of shape (r, out)) and ``adapter_config.json``; the
layer computes ``y = W x + scale * (x @ lora_a) @ lora_b`` on the last ``num_layers``
layers. A PEFT LoRA folder holds ``adapter_model.safetensors``
(``base_model.model.<module path>.lora_A.weight`` of shape (r, in) and ``lora_B.weight``
of shape (out, r)) and ``adapter_config.json``; PEFT computes
``y = W x + (lora_alpha / r) * B A x``. So ``A = lora_a.T``, ``B = lora_b.T`` and
``lora_alpha = scale * r``. mlx-lm module paths of the supported text models (llama,
qwen2, mistral, ...) are the Hugging Face ones, so keys map one to one.

``to_peft`` also stores the original mlx-lm adapter config in the safetensors metadata
(PEFT ignores it), so ``from_peft(to_peft(a))`` gives back ``a`` exactly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_META_KEY = "mlx_lm_adapter_config"

_MLX_KEY = re.compile(r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<ab>lora_a|lora_b)$")
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$"
)

# PEFT LoRA options that change the math or add tensors: converting them would be wrong.
_UNSUPPORTED_TRUE = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, e.g. GPT-2)",
}
_UNSUPPORTED_NONEMPTY = {
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "megatron_config": "megatron_config",
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _alpha_for(scale: float, rank: int) -> float:
    """``lora_alpha`` whose ``lora_alpha / rank`` (what PEFT computes) is closest to ``scale``.

    Usually exact; for a few scales no float alpha divides back exactly (0.1 with rank
    3): then it is off by one ulp, and ``from_peft`` restores the exact scale from the
    metadata ``to_peft`` writes.
    """
    alpha = float(scale) * rank
    best = alpha
    for _ in range(4):
        ratio = alpha / rank
        if ratio == scale:
            best = alpha
            break
        if abs(ratio - scale) < abs(best / rank - scale):
            best = alpha
        alpha = math.nextafter(alpha, math.inf if ratio < scale else -math.inf)
    return int(best) if best.is_integer() else best


def _parse(keys, pattern, what):
    """Split adapter tensor names into {(prefix, layer, module): {a|b: key}}."""
    parsed = {}
    for key in keys:
        m = pattern.match(key)
        if m is None:
            raise ValueError(
                f"{what} tensor '{key}' is not a LoRA weight under <...>layers.N.<module> "
                "(another architecture, or tensors this converter does not support)"
            )
        ab = m["ab"][-1].lower()
        parsed.setdefault((m["prefix"], int(m["layer"]), m["module"]), {})[ab] = key
    prefixes = {p for p, _, _ in parsed}
    if len(prefixes) > 1:
        raise ValueError(f"{what} mixes layer prefixes {sorted(prefixes)}")
    for (p, layer, module), pair in parsed.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"{what} has only one of the A/B pair for {p}layers.{layer}.{module}")
    return parsed


def to_peft(adapter_path, out_dir, base_model=None) -> Path:
    """Write the mlx-lm LoRA adapter at ``adapter_path`` as a PEFT LoRA folder ``out_dir``.

    ``base_model`` (a Hugging Face id or path) sets ``base_model_name_or_path``; by default
    it comes from the adapter config (``base_model_name_or_path``, else ``model``).
    Returns ``out_dir``. Raises ``ValueError`` (one line) for DoRA / full fine-tunes and
    tensors outside ``layers.N``, ``FileNotFoundError`` for a missing folder or file.
    """
    adapter_path, out_dir = Path(adapter_path), Path(out_dir)
    config = _read_json(adapter_path / CONFIG)
    if config.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"only LoRA adapters convert to PEFT, not fine_tune_type={config['fine_tune_type']!r}")
    params = config.get("lora_parameters") or {}
    if "rank" not in params or "scale" not in params:
        raise ValueError(f"{adapter_path / CONFIG} has no lora_parameters.rank / .scale")
    rank, scale = int(params["rank"]), float(params["scale"])
    if not (adapter_path / MLX_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_path / MLX_WEIGHTS} not found")
    weights = mx.load(str(adapter_path / MLX_WEIGHTS))
    if not weights:
        raise ValueError(f"{adapter_path / MLX_WEIGHTS} holds no tensors")
    parsed = _parse(weights, _MLX_KEY, "adapter")

    out = {}
    for (prefix, layer, module), pair in sorted(parsed.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        a, b = weights[pair["a"]], weights[pair["b"]]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise ValueError(
                f"rank mismatch: config rank {rank}, tensors {pair['a']} {tuple(a.shape)} / "
                f"{pair['b']} {tuple(b.shape)}"
            )
        name = f"base_model.model.{prefix}layers.{layer}.{module}"
        out[f"{name}.lora_A.weight"] = mx.contiguous(a.T)
        out[f"{name}.lora_B.weight"] = mx.contiguous(b.T)

    # target_modules in the config's key order; the short HF name (q_proj) when unique.
    modules = {module for _, _, module in parsed}
    order = [k for k in params.get("keys") or [] if k in modules]
    order += sorted(modules - set(order))
    short = [m.rsplit(".", 1)[-1] for m in order]
    targets = short if len(set(short)) == len(short) else order

    base = base_model or config.get("base_model_name_or_path") or config.get("model")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base is not None else None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": _alpha_for(scale, rank),
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": targets,
        "layers_to_transform": sorted({layer for _, layer, _ in parsed}),
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(out_dir / PEFT_WEIGHTS), out, metadata={"format": "pt", _META_KEY: json.dumps(config)}
    )
    (out_dir / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out_dir


def _base_config(base_model) -> dict | None:
    """config.json of a local model folder, or of a Hugging Face id already in the local cache."""
    if base_model is None:
        return None
    path = Path(str(base_model))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base_model), "config.json")
    except Exception:  # not a repo id
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _num_hidden_layers(config: dict | None) -> int | None:
    if not config:
        return None
    n = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    return int(n) if n else None


def _check_against_model(model_path: Path, mlx_config: dict, weights: dict) -> None:
    """Build the base model lazily with LoRA attached and compare every tensor's shape."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path, lazy=True)
    try:
        linear_to_lora_layers(model, mlx_config["num_layers"], mlx_config["lora_parameters"])
    except (ValueError, AttributeError) as e:
        raise ValueError(f"adapter does not fit the base model {model_path}: {e}") from None
    params = {k: v for k, v in tree_flatten(model.trainable_parameters())}
    for key, w in weights.items():
        module = key.rsplit(".", 1)[0]
        if key not in params:
            raise ValueError(f"PEFT adapter module {module} does not exist in the base model {model_path} (another architecture?)")
        if tuple(w.shape) != tuple(params[key].shape):
            ab = "lora_A" if key.endswith("lora_a") else "lora_B"
            raise ValueError(
                f"PEFT adapter {module}.{ab} has shape {tuple(w.shape)[::-1]}, the base model "
                f"{model_path} needs {tuple(params[key].shape)[::-1]} (another model size?)"
            )


def from_peft(peft_dir, out_dir, base_model=None) -> Path:
    """Write the PEFT LoRA adapter at ``peft_dir`` as an mlx-lm adapter folder ``out_dir``.

    Rank, scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), dropout and target
    modules come from the PEFT config and tensors. mlx-lm puts LoRA on the last
    ``num_layers`` layers; the layer count of the base model comes from ``base_model``
    (an MLX or HF folder), else the config's ``base_model_name_or_path`` when that is a
    local folder or a cached Hugging Face id, else the adapter is assumed to reach the
    last layer. Layers inside that range without PEFT tensors keep a zero ``lora_b`` at
    load, so the function computed is the same. When ``base_model`` is a local folder,
    every tensor's shape is checked against it.

    Raises ``ValueError`` (one line) for: non-LoRA ``peft_type``, DoRA, per-module
    rank/alpha patterns and other options that change the math, tensors not under
    ``layers.N.<module>``, a config rank that differs from the tensors', and tensors
    that do not fit ``base_model``.
    """
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    pc = _read_json(peft_dir / CONFIG)
    peft_type = str(pc.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"only LoRA PEFT adapters convert, not peft_type={pc.get('peft_type')!r}")
    for key, what in _UNSUPPORTED_TRUE.items():
        if pc.get(key):
            raise ValueError(f"PEFT adapter uses {what}, which this converter does not support")
    for key, what in _UNSUPPORTED_NONEMPTY.items():
        if pc.get(key):
            raise ValueError(f"PEFT adapter uses {what}, which this converter does not support")
    if pc.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapter trains biases (bias={pc['bias']!r}), which mlx-lm LoRA cannot hold")
    if "r" not in pc or "lora_alpha" not in pc:
        raise ValueError(f"{peft_dir / CONFIG} has no r / lora_alpha")
    rank = int(pc["r"])

    weights_file = peft_dir / PEFT_WEIGHTS
    if not weights_file.is_file():
        if (peft_dir / "adapter_model.bin").is_file():
            raise ValueError(f"{peft_dir} holds adapter_model.bin: re-save it with safetensors (PEFT save_pretrained)")
        raise FileNotFoundError(f"{weights_file} not found")
    weights, metadata = mx.load(str(weights_file), return_metadata=True)
    if not weights:
        raise ValueError(f"{weights_file} holds no tensors")
    parsed = _parse(weights, _PEFT_KEY, "PEFT adapter")

    out = {}
    for (prefix, layer, module), pair in parsed.items():
        a, b = weights[pair["a"]], weights[pair["b"]]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"PEFT tensors for {prefix}layers.{layer}.{module} are not a LoRA pair: {a.shape}, {b.shape}")
        if a.shape[0] != rank:
            raise ValueError(
                f"rank mismatch: config r={rank}, tensors of {prefix}layers.{layer}.{module} have rank {a.shape[0]}"
            )
        out[f"{prefix}layers.{layer}.{module}.lora_a"] = mx.contiguous(a.T)
        out[f"{prefix}layers.{layer}.{module}.lora_b"] = mx.contiguous(b.T)

    layers = sorted({layer for _, layer, _ in parsed})
    modules = {module for _, _, module in parsed}
    alpha = float(pc["lora_alpha"])
    scale = alpha / math.sqrt(rank) if pc.get("use_rslora") else alpha / rank
    base_name = pc.get("base_model_name_or_path")

    # target_modules order first (it is the order to_peft wrote), then the rest.
    targets = pc.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])

    def rank_of(module):
        for i, t in enumerate(targets):
            if module == t or module.endswith("." + t):
                return i
        return len(targets)

    keys = sorted(modules, key=lambda m: (rank_of(m), m))
    total = _num_hidden_layers(_base_config(base_model)) or _num_hidden_layers(_base_config(base_name))
    if total is not None and layers[-1] >= total:
        raise ValueError(f"PEFT adapter has layer {layers[-1]}, the base model has {total} layers")
    num_layers = (total if total is not None else layers[-1] + 1) - layers[0]
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(pc.get("lora_dropout", 0.0)), "keys": keys},
        "model": base_name,
        "base_model_name_or_path": base_name,
    }

    # An adapter written by to_peft: take back its exact config when it still agrees.
    stored = (metadata or {}).get(_META_KEY)
    if stored:
        try:
            orig = json.loads(stored)
            lp = orig["lora_parameters"]
            n = int(orig["num_layers"])
            top = total if total is not None else layers[-1] + 1
            layers_fit = n < 0 or (n <= top and layers[0] >= top - n)  # -1: all layers
            agrees = (
                int(lp["rank"]) == rank
                and math.isclose(float(lp["scale"]), scale, rel_tol=1e-9)
                and set(lp.get("keys") or modules) == modules
                and layers_fit
            )
        except (ValueError, KeyError, TypeError):
            agrees = False
        if agrees:
            mlx_config = orig

    if base_model is not None and (Path(str(base_model)) / "config.json").is_file():
        _check_against_model(Path(str(base_model)), mlx_config, out)

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / MLX_WEIGHTS), out, metadata={"format": "mlx"})
    (out_dir / CONFIG).write_text(json.dumps(mlx_config, indent=4) + "\n")
    return out_dir
