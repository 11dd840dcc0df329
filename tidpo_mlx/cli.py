"""Command line: ``tidpo-mlx train | doctor | convert``.

Every config key is a flag of ``train`` (generated from the Config dataclass
in ``options.py``, so ``--help`` lists each with its default). User errors
print one line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import tidpo_mlx  # noqa: F401  (fast BLAS before mlx)

import click
import yaml

from tidpo_mlx.commands import eval_command, experiment_command, importance_command
from tidpo_mlx.convert.cli import convert as convert_group
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.options import config_options, run_guarded


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
@config_options()
def train(recipe: str | None, resume: bool, debug: bool, quiet: bool, export_peft: str | None, **overrides: Any) -> None:
    """Train LoRA adapters with TI-DPO (or a baseline) on preference pairs."""
    from tidpo_mlx.config import load_config
    from tidpo_mlx.trainer import train as run_train

    def job() -> None:
        cfg = load_config(recipe, overrides)
        if export_peft and cfg.fine_tune_type != "lora":
            raise ConfigError("--export-peft needs fine_tune_type lora")
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


main.add_command(eval_command, "eval")
main.add_command(importance_command, "importance")
main.add_command(experiment_command, "experiment")
main.add_command(convert_group, "convert")


if __name__ == "__main__":
    sys.exit(main())
