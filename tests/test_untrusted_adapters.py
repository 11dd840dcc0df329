"""Malformed adapter folders: ``to_peft`` / ``from_peft`` fail with one line naming the file and the key.

``adapter_config.json`` (mlx-lm's and PEFT's) is checked for JSON syntax, an
object at the top, and the type and range of every value the converters use;
an unreadable safetensors file is named too. Each error is a ``ConvertError``
(a ``TidpoError``), so the command line prints it as one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import tidpo_mlx  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import pytest
from click.testing import CliRunner

from tidpo_mlx.convert.cli import convert as convert_cli
from tidpo_mlx.convert.peft import from_peft, to_peft
from tidpo_mlx.errors import ConvertError

MODULE = "model.layers.0.self_attn.q_proj"
MLX_CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 1,
    "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    "model": "org/base",
}
PEFT_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj"],
    "bias": "none",
    "base_model_name_or_path": None,
}


def write_adapter(folder: Path, config: dict | str, tensors: dict, weights_name: str, metadata=None) -> Path:
    """An adapter folder: ``adapter_config.json`` (a dict as JSON, a str as it is) and its safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    mx.save_safetensors(str(folder / weights_name), tensors, metadata=metadata or {})
    return folder


def mlx_adapter(folder: Path, config: dict | str) -> Path:
    """An mlx-lm LoRA adapter of rank 4 on one module."""
    tensors = {f"{MODULE}.lora_a": mx.ones((64, 4)), f"{MODULE}.lora_b": mx.zeros((4, 64))}
    return write_adapter(folder, config, tensors, "adapters.safetensors")


def peft_adapter(folder: Path, config: dict | str, metadata: dict | None = None) -> Path:
    """A PEFT LoRA adapter of rank 4 on one module (``metadata``: of its safetensors)."""
    name = f"base_model.model.{MODULE}"
    tensors = {f"{name}.lora_A.weight": mx.ones((4, 64)), f"{name}.lora_B.weight": mx.zeros((64, 4))}
    return write_adapter(folder, config, tensors, "adapter_model.safetensors", metadata)


ADAPTERS = {"to-peft": (mlx_adapter, MLX_CONFIG), "from-peft": (peft_adapter, PEFT_CONFIG)}  # command -> maker, config


def with_value(config: dict, key: str, value) -> dict:
    """A copy of ``config`` with the (dotted) ``key`` set to ``value``."""
    config = json.loads(json.dumps(config))
    *parents, last = key.split(".")
    inner = config
    for parent in parents:
        inner = inner[parent]
    inner[last] = value
    return config


def assert_one_line_error(command: str, folder: Path, out: Path, named: Path, *words: str) -> None:
    """The converter raises a one-line ConvertError naming ``named`` and ``words``; the CLI prints that line."""
    convert = to_peft if command == "to-peft" else from_peft
    with pytest.raises(ConvertError) as err:
        convert(folder, out)
    message = str(err.value)
    assert "\n" not in message and str(named) in message, message
    for word in words:
        assert word in message, message
    result = CliRunner().invoke(convert_cli, [command, str(folder), str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == f"Error: {message}\n"
    assert not out.exists()


def test_valid_adapters_still_convert(tmp_path):
    peft = to_peft(mlx_adapter(tmp_path / "mlx", MLX_CONFIG), tmp_path / "peft")
    assert json.loads((peft / "adapter_config.json").read_text())["r"] == 4
    back = from_peft(peft_adapter(tmp_path / "peft2", PEFT_CONFIG), tmp_path / "back")
    assert json.loads((back / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0


BAD_JSON = [
    ('{"fine_tune_type": "lora",', "line 1 column 27"),
    ('{"r": 4}\n{"r": 5}', "line 2 column 1"),
    ("[1, 2]", "not a JSON object"),
    ("", "line 1 column 1"),
]


@pytest.mark.parametrize("text, where", BAD_JSON, ids=["unclosed", "extra-data", "array", "empty"])
@pytest.mark.parametrize("command", ["to-peft", "from-peft"])
def test_malformed_json_names_the_file_and_position(tmp_path, command, text, where):
    folder = ADAPTERS[command][0](tmp_path / "adapter", text)
    assert_one_line_error(command, folder, tmp_path / "out", folder / "adapter_config.json", where)


MLX_BAD = [
    ("lora_parameters.rank", "4"),
    ("lora_parameters.rank", 0),
    ("lora_parameters.rank", 2.5),
    ("lora_parameters.rank", True),
    ("lora_parameters.scale", "big"),
    ("lora_parameters.scale", float("nan")),
    ("lora_parameters.scale", -1.0),
    ("lora_parameters.dropout", 1.0),
    ("lora_parameters.dropout", "0"),
    ("lora_parameters.keys", "self_attn.q_proj"),
    ("lora_parameters.keys", [1, 2]),
    ("lora_parameters", "rank 4"),
    ("num_layers", "all"),
    ("num_layers", 0),
    ("fine_tune_type", "qlora"),
    ("fine_tune_type", ["lora"]),
    ("model", 7),
]

PEFT_BAD = [
    ("r", "4"),
    ("r", 0),
    ("r", True),
    ("lora_alpha", "8"),
    ("lora_alpha", float("inf")),
    ("lora_alpha", 0),
    ("lora_dropout", 1.5),
    ("target_modules", 5),
    ("target_modules", ["q_proj", None]),
    ("use_rslora", "yes"),
    ("base_model_name_or_path", 3),
]

BAD_VALUES = [("to-peft", k, v) for k, v in MLX_BAD] + [("from-peft", k, v) for k, v in PEFT_BAD]


@pytest.mark.parametrize("command, key, value", BAD_VALUES, ids=[f"{c}:{k}={v!r}" for c, k, v in BAD_VALUES])
def test_bad_config_values_name_the_file_and_key(tmp_path, command, key, value):
    make, config = ADAPTERS[command]
    folder = make(tmp_path / "adapter", with_value(config, key, value))
    assert_one_line_error(command, folder, tmp_path / "out", folder / "adapter_config.json", key, "must be")


def test_missing_lora_rank_is_named(tmp_path):
    config = with_value(MLX_CONFIG, "lora_parameters", {"scale": 2.0})
    folder = mlx_adapter(tmp_path / "adapter", config)
    assert_one_line_error("to-peft", folder, tmp_path / "out", folder / "adapter_config.json", "lora_parameters.rank")


def test_bad_base_model_config_is_named(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"num_hidden_layers": ')
    folder = peft_adapter(tmp_path / "adapter", with_value(PEFT_CONFIG, "base_model_name_or_path", str(base)))
    assert_one_line_error("from-peft", folder, tmp_path / "out", base / "config.json", "not valid JSON")
    (base / "config.json").write_text('{"num_hidden_layers": "two"}')
    assert_one_line_error("from-peft", folder, tmp_path / "out", base / "config.json", "num_hidden_layers")


@pytest.mark.parametrize("command", ["to-peft", "from-peft"])
def test_unreadable_safetensors_is_named(tmp_path, command):
    make, config = ADAPTERS[command]
    folder = make(tmp_path / "adapter", config)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    assert_one_line_error(command, folder, tmp_path / "out", weights, "safetensors")


STORED = ['[1', "[1]", '{"fine_tune_type": "full"}', json.dumps(with_value(MLX_CONFIG, "lora_parameters.rank", "4"))]


@pytest.mark.parametrize("stored", STORED, ids=["bad-json", "array", "full", "rank-string"])
def test_malformed_stored_mlx_config_falls_back_to_the_peft_config(tmp_path, stored):
    """The mlx-lm config ``to_peft`` keeps in the safetensors metadata is used only when well formed."""
    folder = peft_adapter(tmp_path / "adapter", PEFT_CONFIG, {"mlx_lm_adapter_config": stored})
    config = json.loads((from_peft(folder, tmp_path / "out") / "adapter_config.json").read_text())
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
