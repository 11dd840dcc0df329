"""Runs watched where users watch them: ``report_to: wandb, tensorboard`` (mlx-lm's ``--report-to``).

Every record written to ``metrics.jsonl`` goes to each reporter as well
(:class:`~tidpo_mlx.metrics.MetricsLog` hands it on), at the record's
``step``: training records under ``train/<name>``, held-out ones under
``eval/<name>``, as transformers' W&B and TensorBoard callbacks show TRL's
metrics. Strings and other non-numbers stay in the JSONL only.

``wandb`` starts one W&B run per process, named after the output folder,
with its files under ``<adapter_path>/wandb`` (``WANDB_MODE=offline``
works as usual). ``tensorboard`` writes event files to
``<adapter_path>/tensorboard`` with TensorBoard's own writer; a resumed
run first writes a session start at its first new step, so TensorBoard
drops what a killed run logged past its checkpoint. Both libraries come
with the ``report`` extra (``pip install 'tidpo-mlx[report]'``); a missing
one is named before any slow work (:func:`require`).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Callable

from tidpo_mlx.errors import ConfigError
from tidpo_mlx.files import WriteError
from tidpo_mlx.metrics import Sink

REPORTERS = ("wandb", "tensorboard")
"""What ``report_to`` can name; each is also the module it needs."""

EXTRA = "report"
"""The optional dependency group that installs every reporter."""


def parse_report_to(value: str | None, where: str = "config") -> list[str]:
    """The reporters ``report_to`` names, in mlx-lm's form: comma-separated, case-insensitive (None or ``""``:
    none). An unknown name is a ConfigError starting with ``where``."""
    names = [item.strip().lower() for item in (value or "").split(",") if item.strip()]
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(
                f"{where}: 'report_to' names {name!r}: choose from {', '.join(REPORTERS)} (comma-separated)"
            )
    return list(dict.fromkeys(names))


def require(value: str | None) -> list[str]:
    """The reporters ``report_to`` names, each checked to be installed (without importing it): a missing one
    is a one-line ConfigError naming it and the extra that installs it."""
    names = parse_report_to(value)
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"report_to {name}: the {name} package is not installed; pip install 'tidpo-mlx[{EXTRA}]' "
                f"(or pip install {name})"
            )
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under the names reporters show: ``train/<name>``, or ``eval/<name>`` for held-out."""
    prefix = "eval" if record.get("split") == "valid" else "train"
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    """One W&B run (``wandb.init`` in the output folder, the resolved config as its config)."""

    def __init__(self, folder: Path, project: str | None, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, name=folder.name, dir=str(folder), config=config)

    def write(self, record: dict[str, Any]) -> None:
        """Log the record's numbers at its step."""
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        """Finish the run (W&B writes or uploads the rest)."""
        self.run.finish()


class TensorBoardSink:
    """TensorBoard event files in ``<folder>/tensorboard``, flushed after every record."""

    def __init__(self, folder: Path, start: int):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        self.folder = folder / "tensorboard"
        self.writer = EventFileWriter(str(self.folder))
        if start > 0:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(event_pb2.Event(wall_time=time.time(), step=start + 1, session_log=restart))

    def _add(self, event: Any) -> None:
        try:
            self.writer.add_event(event)
            self.writer.flush()
        except OSError as err:
            raise WriteError(f"{self.folder}: could not write a TensorBoard event ({err.strerror or err})") from None

    def write(self, record: dict[str, Any]) -> None:
        """One event holding the record's numbers as scalars at its step."""
        values = [self._summary.Summary.Value(tag=k, simple_value=v) for k, v in scalars(record).items()]
        self._add(self._event.Event(wall_time=time.time(), step=int(record["step"]),
                                    summary=self._summary.Summary(value=values)))

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_sinks(names: list[str], folder: Path, project: str | None, config: dict[str, Any], start: int,
               log: Callable[[str], None]) -> list[Sink]:
    """The reporters ``names`` (from :func:`require`) writing into ``folder``; ``start``: the step a resumed run
    continues from (0: a new run)."""
    sinks: list[Sink] = []
    for name in names:
        if name == "wandb":
            sinks.append(WandbSink(folder, project, config))
            log(f"report_to wandb: run files in {folder / 'wandb'}")
        else:
            sink = TensorBoardSink(folder, start)
            sinks.append(sink)
            log(f"report_to tensorboard: tensorboard --logdir {sink.folder}")
    return sinks
