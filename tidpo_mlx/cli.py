"""Command line: ``tidpo-mlx train | doctor | convert``.

Every config key is a flag of ``train`` (generated from the Config dataclass,
so ``--help`` lists each with its default). Errors print one line and exit 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Callable, Literal

import tidpo_mlx  # noqa: F401  (fast BLAS before mlx)

import click
import yaml

from tidpo_mlx.config import Config, ConfigError, LoRAParameters

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, FileNotFoundError, OSError)


def _option_for(name: str, hint: Any, default: Any, help_text: str) -> Callable:
    flag = "--" + name.replace("_", "-")
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    shown = ",".join(default) if isinstance(default, tuple) else default
    text = f"{help_text} [default: {shown}]"
    if origin is Literal:
        return click.option(flag, name, type=click.Choice([str(a) for a in typing.get_args(hint)]), default=None, help=text)
    if hint is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)
    kind = {int: int, float: float}.get(hint, str)
    return click.option(flag, name, type=kind, default=None, help=text)


def config_options(func: Callable) -> Callable:
    """Add one option per Config key (``lora_parameters`` as ``--lora-rank`` etc.)."""
    hints = typing.get_type_hints(Config)
    lora_hints = typing.get_type_hints(LoRAParameters)
    for f in reversed(dataclasses.fields(LoRAParameters)):
        func = _option_for(f"lora_{f.name}", lora_hints[f.name], f.default, f"LoRA: {f.metadata['help']}")(func)
    for f in reversed(dataclasses.fields(Config)):
        if f.name == "lora_parameters":
            continue
        func = _option_for(f.name, hints[f.name], f.default, f.metadata["help"])(func)
    return func


def run_guarded(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; user-facing errors become one-line messages unless ``debug``."""
    try:
        return fn()
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        import mlx.core as mx

        world = mx.distributed.init()
        if world.size() > 1:
            message = f"rank {world.rank()}: {message}"
        raise click.ClickException(message) from None


@click.group()
@click.version_option(tidpo_mlx.__version__, prog_name="tidpo-mlx")
def main() -> None:
    """TI-DPO preference tuning with LoRA on MLX."""


@main.command()
@click.option("-c", "--config", "recipe", default=None, help="Recipe YAML (path or bundled name). [default: quickstart]")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --adapter-path.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--export-peft", default=None, help="Also write the adapters as a PEFT folder here at the end.")
@config_options
def train(recipe: str | None, resume: bool, debug: bool, quiet: bool, export_peft: str | None, **overrides: Any) -> None:
    """Train LoRA adapters with TI-DPO (or a baseline) on preference pairs."""
    from tidpo_mlx.config import load_config
    from tidpo_mlx.trainer import train as run_train

    def job() -> None:
        cfg = load_config(recipe, overrides)
        if export_peft and cfg.fine_tune_type != "lora":
            raise ValueError("--export-peft needs fine_tune_type lora")
        click.echo(f"recipe: {recipe or 'quickstart'}; resolved config:")
        click.echo("  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=200).strip().replace("\n", "\n  "))
        result = run_train(cfg, resume=resume, log=click.echo, progress=not quiet)
        click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s; adapters in {result.adapter_path}")
        if result.before:
            for key in ("policy_preference_accuracy", "rewards/accuracies"):
                click.echo(f"  held-out {key}: {result.before[key]:.3f} -> {result.after[key]:.3f}")
        if export_peft:
            from tidpo_mlx.convert.peft import to_peft

            click.echo(f"PEFT adapter: {to_peft(result.adapter_path, export_peft)}")
        click.echo("generate with:")
        click.echo(
            f"  mlx_lm.generate --model {result.model_path} --adapter-path {result.adapter_path} "
            f"--prompt 'What is 17 * 3 + 8?'"
        )

    run_guarded(debug, job)


@main.command()
def doctor() -> None:
    """Report backend, device, BLAS, measured GEMM speed and versions."""
    from tidpo_mlx.doctor import report

    for line in report():
        click.echo(line)


from tidpo_mlx.commands import eval_command, experiment_command, importance_command  # noqa: E402
from tidpo_mlx.convert.cli import convert as convert_group  # noqa: E402

main.add_command(eval_command, "eval")
main.add_command(importance_command, "importance")
main.add_command(experiment_command, "experiment")
main.add_command(convert_group, "convert")


if __name__ == "__main__":
    sys.exit(main())
