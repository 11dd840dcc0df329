"""What every command shares: flags generated from the Config, and one-line errors.

``config_options`` gives ``train`` one flag per Config key (``--lora-rank``
etc. for ``lora_parameters``); ``config_options(keys)`` gives ``eval`` and
``importance`` the flags of the keys that change what they compute. Each
flag's ``[default: ...]`` is the Config default, what a run with no recipe
and no flags uses (a recipe's keys win over it). A
:class:`~tidpo_mlx.errors.TidpoError` prints as one line (``--debug``: the
traceback); any other exception keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal, Sequence

import click

from tidpo_mlx.config import Config, LoRAParameters, Switch
from tidpo_mlx.errors import TidpoError, first_line

METHOD_KEYS = (
    "preset", "loss_type", "weighting", "beta", "alpha", "lam", "sigma_div", "weight_span", "weight_norm",
    "gamma", "triplet_margin", "label_smoothing", "simpo_beta", "simpo_gamma", "anchor", "anchor_temperature",
    "anchor_top_p", "anchor_top_k", "anchor_max_tokens", "chat_template", "max_length", "max_prompt_length",
    "seed", "dequantize",
)
"""Config keys that change what ``eval`` / ``importance`` compute (training-only keys left out)."""


def _option_for(name: str, hint: Any, help_text: str) -> Callable:
    flag = "--" + name.replace("_", "-")
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        return click.option(flag, name, type=click.Choice([str(a) for a in typing.get_args(hint)]), default=None, help=help_text)
    if hint is Switch:
        return click.option(flag, name, type=click.Choice([s.value for s in Switch]), default=None, help=help_text)
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    return click.option(flag, name, type={int: int, float: float}.get(hint, str), default=None, help=help_text)


def shown(value: Any) -> str:
    """A config value as ``--help`` and ``--dry-run`` print it (a list as ``a,b``, as its flag takes it)."""
    return ",".join(value) if isinstance(value, (tuple, list)) else str(value)


def config_options(keys: Sequence[str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one flag per Config key (every key, or only ``keys``), each with its default."""
    hints = typing.get_type_hints(Config)
    fields = [f for f in dataclasses.fields(Config) if f.name != "lora_parameters"]
    if keys is not None:
        fields = [f for f in fields if f.name in keys]

    def decorate(func: Callable) -> Callable:
        if keys is None:
            lora_hints = typing.get_type_hints(LoRAParameters)
            for f in reversed(dataclasses.fields(LoRAParameters)):
                text = f"LoRA: {f.metadata['help']} [default: {shown(f.default)}]"
                func = _option_for(f"lora_{f.name}", lora_hints[f.name], text)(func)
        for f in reversed(fields):
            func = _option_for(f.name, hints[f.name], f"{f.metadata['help']} [default: {shown(f.default)}]")(func)
        return func

    return decorate


def run_guarded(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a :class:`TidpoError` becomes a one-line message unless ``debug``.

    Under ``mlx.launch`` the message names the rank.
    """
    try:
        return fn()
    except TidpoError as err:
        if debug:
            raise
        message = first_line(err)
        import mlx.core as mx

        world = mx.distributed.init()
        if world.size() > 1:
            message = f"rank {world.rank()}: {message}"
        raise click.ClickException(message) from None
