"""One source of defaults: ``--help`` shows what a bare run records, presets and recipes overlay it."""

from __future__ import annotations

import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tidpo_mlx.cli import main
from tidpo_mlx.config import PRESETS, Config, Switch, build_config, flat_dict, load_config, resolve_config, save_config
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.options import METHOD_KEYS, shown

from conftest import arith_folder

WIDE = {"terminal_width": 10_000, "max_content_width": 10_000}  # one option per help line

# What each bundled recipe resolves to where it differs from the defaults (the values they have
# always resolved to: a change here changes what `-c <name>` trains).
RECIPES = {
    "quickstart": {},
    "paper": {"preset": "paper", "beta": 0.1, "anchor": "sample", "warmup_steps": 10, "iters": 200,
              "max_length": 256, "max_prompt_length": 128, "steps_per_save": 50},
    "official": {"preset": "official", "loss_type": "tdpo2", "beta": 0.2, "lam": 0.2, "sigma_div": 8.0,
                 "weight_span": "sequence", "weight_norm": "mean1", "gamma": 0.001, "triplet_margin": 0.001,
                 "anchor": "sample", "warmup_steps": 10, "iters": 200, "batch_size": 2, "max_length": 256,
                 "max_prompt_length": 128, "steps_per_save": 50},
    "dpo": {"preset": "paper", "weighting": "none", "gamma": 0.0, "beta": 0.1, "anchor": "sample",
            "warmup_steps": 5, "iters": 60, "steps_per_save": 50},
}


def help_defaults(command: str) -> dict[str, str]:
    """``--flag`` -> the text of its ``[default: ...]`` in ``tidpo-mlx <command> --help``."""
    result = CliRunner().invoke(main, [command, "--help"], **WIDE)
    assert result.exit_code == 0, result.output
    options: dict[str, str] = {}  # flag -> its help text (a long metavar puts the text on the next line)
    flag = None
    for line in result.output.split("\nOptions:\n", 1)[1].splitlines():
        words = line.split()
        if words and words[0].startswith("-"):
            flag = next(w for w in words if w.startswith("--")).split("/")[0]
            options[flag] = " ".join(words[1:])
        elif flag is not None:
            options[flag] += " " + " ".join(words)
    return {flag: text[:-1].rsplit("[default: ", 1)[1] for flag, text in options.items()
            if text.endswith("]") and "[default: " in text}


def config_key(flag: str) -> str:
    """The flat config key of a flag (``--lora-rank``: ``lora_parameters.rank``)."""
    key = flag[2:].replace("-", "_")
    return f"lora_parameters.{key[5:]}" if key.startswith("lora_") else key


def recorded(path: Path) -> dict[str, str]:
    """A config.yaml's flat keys, each value as ``--help`` prints it."""
    return {k: shown(v) for k, v in flat_dict(yaml.safe_load(path.read_text())).items()}


def assert_help_matches(recorded_values: dict[str, str]) -> None:
    """``train --help`` shows a default for every key of ``recorded_values``, each that value, and no other."""
    shown_defaults = {config_key(flag): text for flag, text in help_defaults("train").items()}
    assert set(shown_defaults) == set(recorded_values), set(shown_defaults) ^ set(recorded_values)
    wrong = {k: (shown_defaults[k], v) for k, v in recorded_values.items() if shown_defaults[k] != v}
    assert not wrong, f"--help default vs recorded: {wrong}"


def test_train_help_defaults_are_the_config_a_bare_train_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_config(resolve_config(None, {}).config, tmp_path / "config.yaml")  # what `train` resolves and saves
    values = recorded(tmp_path / "config.yaml")
    assert values["iters"] == "30" and values["beta"] == "1.0" and values["anchor"] == "none"
    assert values["preset"] == "none"
    assert_help_matches(values)


def test_eval_and_importance_help_show_the_same_defaults():
    defaults = {k: shown(v) for k, v in flat_dict(Config().to_dict()).items()}
    for command in ("eval", "importance"):
        keys = {config_key(flag): text for flag, text in help_defaults(command).items()}
        assert {k: keys.get(k) for k in METHOD_KEYS} == {k: defaults[k] for k in METHOD_KEYS}


def test_a_bare_run_and_the_quickstart_are_the_defaults():
    assert load_config(None) == Config()
    assert load_config("quickstart") == Config()
    assert build_config({}) == Config()
    assert resolve_config(None).changed() == {}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bundled_recipes_resolve_to_their_values(name):
    resolved = resolve_config(name)
    assert {k: v for k, (v, _) in resolved.changed().items()} == RECIPES[name]


def test_a_named_preset_overlays_the_defaults_and_recipe_keys_and_flags_win():
    for name, keys in PRESETS.items():
        cfg = load_config(None, {"preset": name})
        assert {k: getattr(cfg, k) for k in keys} == keys
        assert cfg.iters == Config.iters and cfg.triplet_on
    cfg = load_config("official", {"preset": "paper", "beta": 0.5})
    assert (cfg.loss_type, cfg.lam, cfg.beta, cfg.max_length) == ("dpo", 0.7, 0.5, 256)
    assert load_config(None, {"preset": "none"}) == Config()
    changed = resolve_config("official", {"beta": 0.5, "lora_rank": 4}).changed()
    assert changed["beta"] == (0.5, "command line")
    assert changed["lam"] == (0.2, "preset official")
    assert changed["iters"] == (200, "recipe official")
    assert changed["lora_parameters.rank"] == (4, "command line")


def test_removed_and_unknown_keys_fail_by_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps_per_report: 10\n")
    with pytest.raises(ConfigError, match=rf"{recipe}: 'steps_per_report' is not a tidpo-mlx key \(.*\): remove it"):
        load_config(recipe)
    assert "steps_per_report" not in Config().to_dict()
    with pytest.raises(ConfigError, match="command line: unknown preset 'nope'"):
        load_config(None, {"preset": "nope"})


def test_switches_are_typed_from_yaml_flags_and_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dequantize: true\nshared_prefix: false\n")
    cfg = load_config(recipe, {"grad_checkpoint": "true"})
    assert (cfg.dequantize, cfg.shared_prefix, cfg.grad_checkpoint, cfg.plain_attention) == (
        Switch.TRUE, Switch.FALSE, Switch.TRUE, Switch.AUTO)
    switches = [k for k, hint in typing.get_type_hints(Config).items() if hint is Switch]
    assert sorted(switches) == ["dequantize", "grad_checkpoint", "plain_attention", "shared_prefix"]
    assert all(isinstance(getattr(Config(), k), Switch) for k in switches)
    with pytest.raises(ConfigError, match="'dequantize' must be one of auto, true, false"):
        build_config({"dequantize": "yes"})


def _dry_run(*args: str) -> tuple[dict[str, str], str]:
    """``train --dry-run``: the printed differing keys (key -> 'value  (origin)') and the whole output."""
    result = CliRunner().invoke(main, ["train", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.split("resolved config: ", 1)[1].split("\ndata: ", 1)[0].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines), result.output


def test_dry_run_prints_what_differs_from_the_defaults_and_where_it_came_from(tiny_model, tmp_path, monkeypatch):
    data = arith_folder(tmp_path / "pairs", 8, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    printed, out = _dry_run("--model", str(tiny_model), "--data", str(data))
    assert printed == {"model": f"{tiny_model}  (command line)", "data": f"{data}  (command line)"}
    assert "dry run: no weights loaded, nothing written" in out and list(empty.iterdir()) == []
    printed, _ = _dry_run("-c", "official", "--beta", "0.5", "--model", str(tiny_model), "--data", str(data))
    assert printed["beta"] == "0.5  (command line)"
    assert printed["loss_type"] == "tdpo2  (preset official)"
    assert printed["iters"] == "200  (recipe official)"
    assert set(printed) == set(RECIPES["official"]) | {"model", "data"}


@pytest.mark.slow
def test_a_bare_run_in_an_empty_folder_records_the_help_defaults(tmp_path):
    """The real ``tidpo-mlx train`` (built-in model, bundled data), stopped once it has written config.yaml."""
    config = tmp_path / "adapters" / "config.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "tidpo_mlx.cli", "train", "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not config.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert config.exists(), output
    assert_help_matches(recorded(config))
