"""MLX LoRA adapters <-> Hugging Face PEFT LoRA adapters.

An mlx-lm adapter folder holds ``adapters.safetensors`` (``<prefix>layers.N.<module>.lora_a``
of shape (in, r) and ``.lora_b`` of shape (r, out)) and ``adapter_config.json``; the
layer computes ``y = W x + scale * (x @ lora_a) @ lora_b`` on the last ``num_layers``
layers. A PEFT LoRA folder holds ``adapter_model.safetensors``
(``base_model.model.<module path>.lora_A.weight`` of shape (r, in) and ``lora_B.weight``
of shape (out, r)) and ``adapter_config.json``; PEFT computes
``y = W x + (lora_alpha / r) * B A x``. So ``A = lora_a.T``, ``B = lora_b.T`` and
``lora_alpha = scale * r``. mlx-lm module paths of the tested text models (llama,
mistral, qwen2, qwen3, phi3 with its fused ``qkv_proj`` / ``gate_up_proj``, gemma2,
gemma3_text, olmo2, granite, cohere, smollm3: ``tests/test_families.py``) are the
Hugging Face ones, so keys map one to one.

``to_peft`` also stores the original mlx-lm adapter config in the safetensors metadata
(PEFT ignores it), so ``from_peft(to_peft(a))`` gives back ``a`` exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from tidpo_mlx.errors import ConvertError, MissingFileError, first_line

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
FINE_TUNE_TYPES = ("lora", "dora", "full")  # mlx-lm's fine_tune_type values
_FINE_TUNE_RULE = f"one of {', '.join(map(repr, FINE_TUNE_TYPES))}"


# --------------------------------------------------------------------------- config files


def _is_int(value) -> bool:
    """A JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite JSON number (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_strings(value) -> bool:
    """A JSON array of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What a config value must be (the words go into the error message) -> the test.
_RULES: dict[str, Callable[[object], bool]] = {
    "a positive integer": lambda v: _is_int(v) and v > 0,
    "-1 (all layers) or a positive integer": lambda v: _is_int(v) and (v == -1 or v > 0),
    "a positive finite number": lambda v: _is_number(v) and v > 0,
    "a number in [0, 1)": lambda v: _is_number(v) and 0 <= v < 1,
    "a list of strings or null": lambda v: v is None or _is_strings(v),
    "a string, a list of strings or null": lambda v: v is None or isinstance(v, str) or _is_strings(v),
    "a string or null": lambda v: v is None or isinstance(v, str),
    "true or false": lambda v: isinstance(v, bool),
    "a JSON object": lambda v: isinstance(v, dict),
    _FINE_TUNE_RULE: lambda v: isinstance(v, str) and v in FINE_TUNE_TYPES,
}
_REQUIRED = object()


def _shown(value) -> str:
    """A JSON value for a message: its JSON text, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(path: Path, key: str, value, rule: str):
    """``value`` if it is what ``rule`` says, else a ``ConvertError`` naming the file and key."""
    if not _RULES[rule](value):
        raise ConvertError(f"{path}: {key} must be {rule}, not {_shown(value)}")
    return value


def _checked(path: Path, config: dict, key: str, rule: str, default=_REQUIRED):
    """``config[key]`` checked by ``rule`` (``default`` when absent; none: the key is required).

    ``key`` may be dotted (``lora_parameters.rank``) to reach into a nested object.
    """
    *parents, last = key.split(".")
    for i, parent in enumerate(parents):
        config = _check(path, ".".join(parents[: i + 1]), config.get(parent, {}), "a JSON object")
    if last not in config:
        if default is _REQUIRED:
            raise ConvertError(f"{path}: no {key}")
        return default
    return _check(path, key, config[last], rule)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``: a missing file, text that is not JSON or not an object is a one-line error."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: not a JSON object but {_shown(value)}")
    return value


def check_mlx_adapter_config(path: Path, config: dict) -> dict:
    """``config`` (an mlx-lm ``adapter_config.json`` read from ``path``) with what the converters use checked.

    ``fine_tune_type``, ``num_layers``, the base model names and (LoRA / DoRA)
    ``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys``); a bad value is a
    one-line ``ConvertError`` naming the file and key.
    """
    fine_tune_type = _checked(path, config, "fine_tune_type", _FINE_TUNE_RULE, "lora")
    _checked(path, config, "num_layers", "-1 (all layers) or a positive integer", -1)
    for key in ("model", "base_model_name_or_path"):
        _checked(path, config, key, "a string or null", None)
    if fine_tune_type == "full":
        return config
    _checked(path, config, "lora_parameters.rank", "a positive integer")
    _checked(path, config, "lora_parameters.scale", "a positive finite number")
    _checked(path, config, "lora_parameters.dropout", "a number in [0, 1)", 0.0)
    _checked(path, config, "lora_parameters.keys", "a list of strings or null", None)
    return config


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a non-empty safetensors file; missing, unreadable or empty is a one-line error."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ConvertError(f"{path}: cannot read it as safetensors: {first_line(e)}") from None
    if not weights:
        raise ConvertError(f"{path} holds no tensors")
    return weights, metadata or {}


# --------------------------------------------------------------------------- conversion


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


def _parse(keys, pattern, source: Path) -> dict:
    """Split the adapter tensor names of ``source`` into {(prefix, layer, module): {a|b: key}}."""
    parsed = {}
    for key in keys:
        m = pattern.match(key)
        if m is None:
            raise ConvertError(
                f"{source}: tensor '{key}' is not a LoRA weight under <...>layers.N.<module> "
                "(another architecture, or tensors this converter does not support)"
            )
        ab = m["ab"][-1].lower()
        parsed.setdefault((m["prefix"], int(m["layer"]), m["module"]), {})[ab] = key
    prefixes = {p for p, _, _ in parsed}
    if len(prefixes) > 1:
        raise ConvertError(f"{source} mixes layer prefixes {sorted(prefixes)}")
    for (p, layer, module), pair in parsed.items():
        if set(pair) != {"a", "b"}:
            raise ConvertError(f"{source} has only one of the A/B pair for {p}layers.{layer}.{module}")
    return parsed


def _peft_targets(order: list[str], modules: set[str]) -> list[str]:
    """PEFT ``target_modules``: ``order`` first (the config's keys), then the rest; short names when unique."""
    order = [k for k in order if k in modules]
    order += sorted(modules - set(order))
    short = [m.rsplit(".", 1)[-1] for m in order]
    return short if len(set(short)) == len(short) else order


def to_peft(adapter_path, out_dir, base_model=None) -> Path:
    """Write the mlx-lm LoRA adapter at ``adapter_path`` as a PEFT LoRA folder ``out_dir``.

    ``base_model`` (a Hugging Face id or path) sets ``base_model_name_or_path``; by default
    it comes from the adapter config (``base_model_name_or_path``, else ``model``).
    Returns ``out_dir``. Raises ``ConvertError`` (one line, naming the file) for a
    malformed config (bad JSON, types or values), DoRA / full fine-tunes and tensors
    outside ``layers.N``, ``MissingFileError`` for a missing folder or file.
    """
    adapter_path, out_dir = Path(adapter_path), Path(out_dir)
    config_file, weights_file = adapter_path / CONFIG, adapter_path / MLX_WEIGHTS
    config = check_mlx_adapter_config(config_file, _read_json(config_file))
    if config.get("fine_tune_type", "lora") != "lora":
        raise ConvertError(
            f"{config_file}: only LoRA adapters convert to PEFT, not fine_tune_type={config['fine_tune_type']!r}"
        )
    params = config["lora_parameters"]
    rank, scale = params["rank"], params["scale"]
    weights, _ = _load_safetensors(weights_file)
    parsed = _parse(weights, _MLX_KEY, weights_file)

    out = {}
    for (prefix, layer, module), pair in sorted(parsed.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        a, b = weights[pair["a"]], weights[pair["b"]]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise ConvertError(
                f"{weights_file}: rank mismatch: config rank {rank}, tensors {pair['a']} {tuple(a.shape)} / "
                f"{pair['b']} {tuple(b.shape)}"
            )
        name = f"base_model.model.{prefix}layers.{layer}.{module}"
        out[f"{name}.lora_A.weight"] = mx.contiguous(a.T)
        out[f"{name}.lora_B.weight"] = mx.contiguous(b.T)

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
        "target_modules": _peft_targets(params.get("keys") or [], {module for _, _, module in parsed}),
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


def _base_config_file(base_model) -> Path | None:
    """config.json of a local model folder, or of a Hugging Face id already in the local cache."""
    if base_model is None:
        return None
    path = Path(str(base_model)) / "config.json"
    if path.is_file():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base_model), "config.json")
    except Exception:  # not a repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def _num_hidden_layers(base_model) -> int | None:
    """The layer count in the base model's config.json (or its ``text_config``), when there is one."""
    path = _base_config_file(base_model)
    if path is None:
        return None
    config = _read_json(path)
    text = config.get("text_config")
    n = config.get("num_hidden_layers") or (text.get("num_hidden_layers") if isinstance(text, dict) else None)
    return None if n is None else _check(path, "num_hidden_layers", n, "a positive integer")


def _check_against_model(model_path: Path, mlx_config: dict, weights: dict) -> None:
    """Build the base model lazily with LoRA attached and compare every tensor's shape."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_path, lazy=True)
    try:
        linear_to_lora_layers(model, mlx_config["num_layers"], mlx_config["lora_parameters"])
    except (ValueError, AttributeError) as e:
        raise ConvertError(f"adapter does not fit the base model {model_path}: {first_line(e)}") from None
    params = {k: v for k, v in tree_flatten(model.trainable_parameters())}
    for key, w in weights.items():
        module = key.rsplit(".", 1)[0]
        if key not in params:
            raise ConvertError(
                f"PEFT adapter module {module} does not exist in the base model {model_path} (another architecture?)"
            )
        if tuple(w.shape) != tuple(params[key].shape):
            ab = "lora_A" if key.endswith("lora_a") else "lora_B"
            raise ConvertError(
                f"PEFT adapter {module}.{ab} has shape {tuple(w.shape)[::-1]}, the base model "
                f"{model_path} needs {tuple(params[key].shape)[::-1]} (another model size?)"
            )


def _check_peft_config(path: Path, pc: dict) -> None:
    """Refuse a PEFT config this converter cannot represent exactly, or whose values are malformed."""
    if str(pc.get("peft_type", "")).upper() != "LORA":
        raise ConvertError(f"{path}: only LoRA PEFT adapters convert, not peft_type={_shown(pc.get('peft_type'))}")
    for key, what in {**_UNSUPPORTED_TRUE, **_UNSUPPORTED_NONEMPTY}.items():
        if pc.get(key):
            raise ConvertError(f"{path}: the PEFT adapter uses {what}, which this converter does not support")
    if pc.get("bias", "none") != "none":
        raise ConvertError(
            f"{path}: the PEFT adapter trains biases (bias={_shown(pc['bias'])}), which mlx-lm LoRA cannot hold"
        )
    _checked(path, pc, "r", "a positive integer")
    _checked(path, pc, "lora_alpha", "a positive finite number")
    _checked(path, pc, "lora_dropout", "a number in [0, 1)", 0.0)
    _checked(path, pc, "use_rslora", "true or false", False)
    _checked(path, pc, "target_modules", "a string, a list of strings or null", None)
    _checked(path, pc, "base_model_name_or_path", "a string or null", None)


def _mlx_tensors(parsed: dict, weights: dict, rank: int, weights_file: Path) -> dict:
    """mlx-lm ``lora_a`` / ``lora_b`` (transposed) for each parsed PEFT pair, its rank checked."""
    out = {}
    for (prefix, layer, module), pair in parsed.items():
        a, b = weights[pair["a"]], weights[pair["b"]]
        name = f"{prefix}layers.{layer}.{module}"
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{weights_file}: tensors for {name} are not a LoRA pair: {a.shape}, {b.shape}")
        if a.shape[0] != rank:
            raise ConvertError(
                f"{weights_file}: rank mismatch: config r={rank}, tensors of {name} have rank {a.shape[0]}"
            )
        out[f"{name}.lora_a"] = mx.contiguous(a.T)
        out[f"{name}.lora_b"] = mx.contiguous(b.T)
    return out


def _mlx_keys(modules: set[str], targets) -> list[str]:
    """mlx-lm ``keys``: the modules in PEFT ``target_modules`` order (the order ``to_peft`` wrote), then the rest."""
    targets = [targets] if isinstance(targets, str) else list(targets or [])

    def rank_of(module):
        for i, t in enumerate(targets):
            if module == t or module.endswith("." + t):
                return i
        return len(targets)

    return sorted(modules, key=lambda m: (rank_of(m), m))


def _stored_config(metadata: dict, mlx_config: dict, layers: list[int], top: int) -> dict | None:
    """The exact mlx-lm config ``to_peft`` stored in the safetensors metadata, when it still agrees.

    It agrees when it is a well-formed adapter config with the same rank, scale
    and modules whose ``num_layers`` covers ``layers`` of a ``top``-layer model.
    """
    try:
        orig = json.loads(metadata.get(_META_KEY) or "null")
        if not isinstance(orig, dict) or orig.get("fine_tune_type", "lora") != "lora":
            return None
        check_mlx_adapter_config(Path(_META_KEY), orig)
    except ValueError:  # bad JSON (JSONDecodeError) or values (ConvertError): use the PEFT config
        return None
    lp, want = orig["lora_parameters"], mlx_config["lora_parameters"]
    n = orig.get("num_layers")
    layers_fit = n is not None and (n < 0 or (n <= top and layers[0] >= top - n))  # -1: all layers
    agrees = (
        lp["rank"] == want["rank"]
        and math.isclose(lp["scale"], want["scale"], rel_tol=1e-9)
        and set(lp.get("keys") or want["keys"]) == set(want["keys"])
        and layers_fit
    )
    return orig if agrees else None


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

    Raises ``ConvertError`` (one line, naming the file) for: a malformed config (bad
    JSON, types or values), non-LoRA ``peft_type``, DoRA, per-module rank/alpha
    patterns and other options that change the math, tensors not under
    ``layers.N.<module>``, a config rank that differs from the tensors', and tensors
    that do not fit ``base_model``.
    """
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    config_file, weights_file = peft_dir / CONFIG, peft_dir / PEFT_WEIGHTS
    pc = _read_json(config_file)
    _check_peft_config(config_file, pc)
    rank = pc["r"]
    if not weights_file.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise ConvertError(f"{peft_dir} holds adapter_model.bin: re-save it with safetensors (PEFT save_pretrained)")
    weights, metadata = _load_safetensors(weights_file)
    parsed = _parse(weights, _PEFT_KEY, weights_file)
    out = _mlx_tensors(parsed, weights, rank, weights_file)

    layers = sorted({layer for _, layer, _ in parsed})
    alpha = pc["lora_alpha"]
    scale = alpha / math.sqrt(rank) if pc.get("use_rslora") else alpha / rank
    base_name = pc.get("base_model_name_or_path")
    total = _num_hidden_layers(base_model) or _num_hidden_layers(base_name)
    if total is not None and layers[-1] >= total:
        raise ConvertError(f"PEFT adapter {peft_dir} has layer {layers[-1]}, the base model has {total} layers")
    top = total if total is not None else layers[-1] + 1
    keys = _mlx_keys({module for _, _, module in parsed}, pc.get("target_modules"))
    lora = {"rank": rank, "scale": scale, "dropout": float(pc.get("lora_dropout", 0.0)), "keys": keys}
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": top - layers[0],
        "lora_parameters": lora,
        "model": base_name,
        "base_model_name_or_path": base_name,
    }
    mlx_config = _stored_config(metadata, mlx_config, layers, top) or mlx_config

    if base_model is not None and (Path(str(base_model)) / "config.json").is_file():
        _check_against_model(Path(str(base_model)), mlx_config, out)

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / MLX_WEIGHTS), out, metadata={"format": "mlx"})
    (out_dir / CONFIG).write_text(json.dumps(mlx_config, indent=4) + "\n")
    return out_dir
