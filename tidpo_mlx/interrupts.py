"""Stopping a run cleanly: Ctrl-C or SIGTERM anywhere in training, the last finished step checkpointed.

Python runs a signal handler only between bytecodes, so a signal that
arrives inside an MLX evaluation (a step, a held-out batch, an anchor
decode step, the first step's compilation) is handled as soon as that
evaluation returns. The handler only sets a flag. Long loops call
:func:`check` between their evaluations (the trainer between micro-batches,
the held-out pass between batches, anchor sampling between decode steps);
it raises :class:`Stopped` once the flag is set, and the trainer turns
that into a checkpoint of the last finished step and :class:`Interrupted`,
which the command line prints with the command that resumes the run. A
second signal exits at once (``os._exit``): every file is written
atomically, so the last complete checkpoint stays.

Under ``mlx.launch`` the loops cannot stop on their own (the other ranks
would wait in a collective), so :func:`check` stops only a single-process
run; a distributed run stops after the step in progress, when every rank
agrees (:meth:`StopRequest.agreed`).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from tidpo_mlx.errors import TrainingError


class Stopped(Exception):
    """Raised by :func:`check` inside a long loop once Ctrl-C or SIGTERM asked the run to stop."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped the run; the last finished step is checkpointed (``checkpoint``), or no step
    had finished and nothing was (``None``)."""

    def __init__(self, signal_name: str, step: int, iters: int, checkpoint: Path | None, folder: Path):
        if checkpoint is None:
            self.summary = f"stopped by {signal_name} before step {step + 1} of {iters} finished; nothing to resume"
            message = f"{self.summary}: run the same command again to start anew"
        else:
            self.summary = f"stopped by {signal_name} after step {step} of {iters}; checkpoint {checkpoint}"
            message = f"{self.summary}; continue with --resume {checkpoint.name} --adapter-path {folder}"
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint, self.folder = signal_name, step, checkpoint, folder

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process that signal ended (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + (signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM)


_active: "StopRequest | None" = None
"""The StopRequest of the run in progress (None outside training)."""


class StopRequest:
    """Ctrl-C and SIGTERM ask the run to stop at the next :func:`check` or step end; a second one exits at once.

    Handlers are installed only in the main thread and restored on exit.
    ``world``: the run's ``mx.distributed`` group (None: one process).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None], world: Any = None):
        self.log = log
        self.world = world
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._outer: StopRequest | None = None

    @property
    def alone(self) -> bool:
        """Whether the run is one process (its loops may stop between evaluations)."""
        return self.world is None or self.world.size() == 1

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        when = "at the next safe point" if self.alone else "after this step"
        self.log(f"\n{self.signal_name}: stopping {when} and checkpointing the last finished step "
                 "(again: quit at once)")

    def __enter__(self) -> "StopRequest":
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = self._outer
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self) -> None:
        """Raise :class:`Stopped` if a signal asked this (single-process) run to stop."""
        if self.signal_name is not None and self.alone:
            raise Stopped(self.signal_name)

    def agreed(self, world: Any) -> bool:
        """Whether any rank was asked to stop: an ``all_sum`` of the flags, so every rank stops at one step."""
        asked = self.signal_name is not None
        if world.size() > 1:
            return mx.distributed.all_sum(mx.array(int(asked)), stream=mx.cpu).item() > 0
        return asked


def check() -> None:
    """Raise :class:`Stopped` if the run in progress was asked to stop (nothing outside training).

    Call it between MLX evaluations of any loop that can run for seconds.
    """
    if _active is not None:
        _active.check()
