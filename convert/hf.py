"""Hugging Face checkpoint -> MLX folder (mlx-lm's convert), with the rope_theta fix.

mlx-lm 0.32 reads only a top-level ``rope_theta`` (and ``rope_scaling``) from
``config.json``; transformers 5 writes them inside ``rope_parameters``. A folder saved
by transformers 5 then loads in mlx-lm with theta 10000, silently wrong.
``fix_rope_config`` writes both forms; ``hf_to_mlx`` and ``fuse`` apply it.
"""

from __future__ import annotations

import json
from pathlib import Path
from tidpo_mlx.errors import ConvertError, MissingFileError

QUANT_BITS = (2, 3, 4, 6, 8)


def _fix_rope_one(config: dict) -> dict:
    params = config.get("rope_parameters")
    nested = bool(params) and all(isinstance(v, dict) or v is None for v in params.values())
    if params and not nested:
        # transformers 5 style: the source of truth is rope_parameters (transformers reads it first).
        if params.get("rope_theta") is not None:
            config["rope_theta"] = params["rope_theta"]
        elif "rope_theta" in config:
            params["rope_theta"] = config["rope_theta"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    elif not params and "rope_theta" in config:
        # older style: top-level rope_theta (+ rope_scaling); add rope_parameters.
        new = dict(config.get("rope_scaling") or {})
        new["rope_type"] = new.get("rope_type", new.get("type", "default"))
        new["rope_theta"] = config["rope_theta"]
        config["rope_parameters"] = new
    return config


def fix_rope_config(config: dict) -> dict:
    """Write ``rope_theta`` (and ``rope_scaling``) both at top level and in ``rope_parameters``.

    Edits ``config`` in place (and its ``text_config``) and returns it. Per-layer-type
    (nested) ``rope_parameters`` are left as they are.
    """
    _fix_rope_one(config)
    if isinstance(config.get("text_config"), dict):
        _fix_rope_one(config["text_config"])
    return config


def fix_rope_config_file(folder) -> None:
    """Apply ``fix_rope_config`` to ``folder/config.json``."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(fix_rope_config(config), indent=4) + "\n")


def hf_to_mlx(hf_path_or_id, out_dir, *, quantize=False, bits=4, group_size=64, dtype=None) -> Path:
    """Convert a Hugging Face model (local folder or hub id) into an MLX folder ``out_dir``.

    Uses ``mlx_lm.convert``. ``quantize`` makes affine ``bits``-bit weights (2, 3, 4, 6
    or 8) with ``group_size`` (32, 64 or 128); ``dtype`` ("float16", "bfloat16",
    "float32") casts the float weights, default: keep the checkpoint's. The written
    ``config.json`` has ``rope_theta`` at top level and in ``rope_parameters``.
    Raises ``ValueError`` for bad options or an existing non-empty ``out_dir``.
    """
    from mlx_lm.convert import MODEL_CONVERSION_DTYPES, convert

    out_dir = Path(out_dir)
    if quantize and bits not in QUANT_BITS:
        raise ConvertError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if quantize and group_size not in (32, 64, 128):
        raise ConvertError(f"group_size must be 32, 64 or 128, got {group_size}")
    if dtype is not None and dtype not in MODEL_CONVERSION_DTYPES:
        raise ConvertError(f"dtype must be one of {MODEL_CONVERSION_DTYPES}, got {dtype!r}")
    if out_dir.exists():
        if any(out_dir.iterdir()):
            raise ConvertError(f"{out_dir} exists and is not empty")
        out_dir.rmdir()  # mlx-lm refuses an existing folder
    src = Path(str(hf_path_or_id))
    if src.exists() and not (src / "config.json").is_file():
        raise MissingFileError(f"{src} has no config.json")
    if src.is_dir():
        from tidpo_mlx.models import corrected_folder

        src = corrected_folder(src)  # mlx-lm's convert reads rope settings transformers 5 nests
        hf_path_or_id = src
    if dtype is None and (src / "config.json").is_file():
        # transformers 5 writes "dtype"; mlx-lm only looks at "torch_dtype".
        cfg = json.loads((src / "config.json").read_text())
        found = cfg.get("torch_dtype") or cfg.get("dtype")
        dtype = found if found in MODEL_CONVERSION_DTYPES else None
    convert(
        str(hf_path_or_id),
        str(out_dir),
        quantize=quantize,
        q_group_size=group_size if quantize else None,
        q_bits=bits if quantize else None,
        dtype=dtype,
    )
    fix_rope_config_file(out_dir)
    return out_dir
