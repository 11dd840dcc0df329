"""``report_to``: the records of ``metrics.jsonl`` in W&B (offline mode) and TensorBoard, read back with their
own formats; a missing library named before any slow work.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any, Iterator

import tidpo_mlx  # noqa: F401

import pytest

from tidpo_mlx.config import load_config
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.metrics import read_metrics
from tidpo_mlx.reporting import parse_report_to, require, scalars
from tidpo_mlx.trainer import train

from conftest import arith_folder


def _quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> dict[str, Any]:
    data = arith_folder(tmp_path_factory.mktemp("report-pairs"), 12, 4)
    return {"model": str(tiny_model), "data": str(data), "iters": 4, "batch_size": 2, "num_layers": 2,
            "learning_rate": 1e-3, "warmup_steps": 1, "anchor": "none", "steps_per_save": 2, "steps_per_eval": 2,
            "lr_schedule": "constant"}


def _cfg(base: dict[str, Any], out: Path, **kw: Any):
    return load_config(None, {**base, **kw, "adapter_path": str(out)})


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """The metrics.jsonl records as reporters should show them: name -> step -> value."""
    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        for name, value in scalars(record).items():
            series.setdefault(name, {})[record["step"]] = value
    return series


def test_report_to_takes_mlx_lm_s_form_and_names_a_missing_package(monkeypatch):
    assert parse_report_to(None) == [] and parse_report_to("") == []
    assert parse_report_to("WandB, tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match=r"^r.yaml: 'report_to' names 'swanlab': choose from wandb, tensorboard"):
        parse_report_to("wandb,swanlab", "r.yaml")
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python blocks an import: find_spec sees no package
    with pytest.raises(ConfigError) as err:
        require("tensorboard,wandb")
    assert str(err.value) == ("report_to wandb: the wandb package is not installed; "
                              "pip install 'tidpo-mlx[report]' (or pip install wandb)")


def test_a_missing_package_stops_the_run_before_anything_loads(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    lines: list[str] = []
    with pytest.raises(ConfigError, match=r"^report_to tensorboard: the tensorboard package is not installed"):
        train(_cfg(base, tmp_path / "run", report_to="tensorboard"), log=lines.append, progress=False)
    assert lines == [] and not (tmp_path / "run").exists()


def test_records_are_split_into_train_and_eval_numbers():
    assert scalars({"step": 3, "loss": 0.5, "rewards/accuracies": 1}) == {"train/loss": 0.5,
                                                                          "train/rewards/accuracies": 1.0}
    assert scalars({"step": 3, "split": "valid", "pairs": 4, "flag": True, "name": "x"}) == {"eval/pairs": 4.0}


def _event_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar series in ``folder``, as TensorBoard's own reader loads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag, points in series.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps} (each once, in order)"
    return {tag: dict(points) for tag, points in series.items()}


def _close(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for step in a[name]:
            assert a[name][step] == pytest.approx(b[name][step], rel=1e-6, abs=1e-6), (name, step)


def test_tensorboard_event_files_hold_the_metrics_and_a_resume_replaces_what_followed_its_checkpoint(base, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs the tensorboard package")
    out = tmp_path / "run"
    lines: list[str] = []
    train(_cfg(base, out, report_to="tensorboard"), log=lines.append, progress=False)
    assert f"report_to tensorboard: tensorboard --logdir {out / 'tensorboard'}" in lines
    expected = _expected(out)
    assert {"train/loss", "train/rewards/accuracies", "train/memory/active_gb", "eval/rewards/accuracies"} <= set(expected)
    _close(_event_scalars(out / "tensorboard"), expected)

    train(_cfg(base, out, report_to="tensorboard", iters=5), resume="step-000002", log=_quiet, progress=False)
    assert len(list((out / "tensorboard").iterdir())) == 2
    resumed = _expected(out)
    assert sorted(resumed["train/loss"]) == [1, 2, 3, 4, 5]
    _close(_event_scalars(out / "tensorboard"), resumed)


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then LevelDB-log framed
    records (7-byte chunk headers in 32 KiB blocks) holding ``wandb_internal_pb2.Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, parts, block = 7, b"", 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        parts += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_and_the_config(base, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="report_to wandb needs the wandb package")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(_cfg(base, out, report_to="wandb", project_name="tidpo-test"), log=_quiet, progress=False)
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    history: dict[str, dict[int, float]] = {}
    config: dict[str, Any] = {}
    run_record = None
    for record in _wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[items["_step"]] = value
        elif kind == "run":
            run_record = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    _close(history, _expected(out))
    assert run_record.project == "tidpo-test" and run_record.display_name == "run"
    assert config["loss_type"] == "dpo" and config["iters"] == 4 and config["report_to"] == "wandb"
