"""Command line: ``tidpo-mlx train | doctor | convert``.

Every config key is a flag of ``train`` (generated from the Config dataclass
in ``options.py``, so ``--help`` lists each with its default, which is what a
bare ``tidpo-mlx train`` runs). User errors
print one line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import tidpo_mlx

tidpo_mlx.setup()  # before anything imports mlx: the fast BLAS takes effect only then

import click  # noqa: E402
import yaml  # noqa: E402

from tidpo_mlx.commands import eval_command, experiment_command, importance_command  # noqa: E402
from tidpo_mlx.convert.cli import convert as convert_group  # noqa: E402
from tidpo_mlx.errors import ConfigError  # noqa: E402
from tidpo_mlx.options import config_options, run_guarded, shown  # noqa: E402


@click.group()
@click.version_option(tidpo_mlx.__version__, prog_name="tidpo-mlx")
def main() -> None:
    """TI-DPO preference tuning with LoRA on MLX."""


@main.command()
@click.option("-c", "--config", "recipe", default=None,
              help="Recipe YAML (a path, or bundled: quickstart, paper, official, dpo) laid over the defaults below; "
                   "without it the defaults run (they are the quickstart).")
@click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[CHECKPOINT]",
              help="Continue the run in --adapter-path from its newest checkpoint, or the one named (step-000040).")
@click.option("--overwrite", is_flag=True,
              help="Start anew in an --adapter-path that holds another run, moving that run to <path>.old-<time> first.")
@click.option("--force", is_flag=True, help="With --resume: continue even where the settings differ from the checkpoint's.")
@click.option("--verbose", is_flag=True, help="Print the resolved config (always written to <adapter-path>/config.yaml).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--export-peft", default=None, help="Also write the adapters as a PEFT folder here at the end.")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved values that differ from the defaults (and where each came from), report on the "
                   "data as `tidpo-mlx data check` does (tokenizer only), then stop.")
@config_options()
def train(recipe: str | None, resume: str | None, overwrite: bool, force: bool, verbose: bool, debug: bool, quiet: bool,
          export_peft: str | None, dry_run: bool, **overrides: Any) -> None:
    """Train LoRA adapters with TI-DPO (or a baseline) on preference pairs.

    A new run into an --adapter-path that holds another run stops (--resume
    or --overwrite); with the default folder it goes to a fresh one
    (adapters-2, ...). Ctrl-C or SIGTERM checkpoints the current step and
    prints the command that resumes it.
    """
    from tidpo_mlx.config import Config, resolve_config
    from tidpo_mlx.interrupts import Interrupted
    from tidpo_mlx.trainer import train as run_train

    def job() -> None:
        resolved = resolve_config(recipe, overrides)
        cfg = resolved.config
        if export_peft and cfg.fine_tune_type != "lora":
            raise ConfigError("--export-peft needs fine_tune_type lora")
        if resume is not None and overwrite:
            raise ConfigError("--resume continues the run in --adapter-path, --overwrite starts anew: give one")
        if force and resume is None:
            raise ConfigError("--force goes with --resume")
        named = overrides.get("adapter_path") is not None or cfg.adapter_path != Config.adapter_path
        existing = "move" if overwrite else "refuse" if named else "fresh"
        click.echo(f"recipe: {recipe or 'none (the defaults)'}")
        if verbose:
            click.echo("resolved config:")
            click.echo("  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=200).strip().replace("\n", "\n  "))
        if dry_run:
            from tidpo_mlx.data_check import check_data

            changed = resolved.changed()
            click.echo("resolved config: " + ("the values that differ from the defaults (tidpo-mlx train --help):"
                                              if changed else "the defaults (tidpo-mlx train --help)"))
            for key, (value, origin) in changed.items():
                click.echo(f"  {key}: {shown(value)}  ({origin})")

            check_data(cfg)
            click.echo("dry run: no weights loaded, nothing written")
            return
        try:
            result = run_train(cfg, resume=resume, log=click.echo, progress=not quiet, existing=existing, force=force)
        except Interrupted as stop:
            if stop.checkpoint is None:
                click.echo(f"{stop.summary}: run the same command again to start anew", err=True)
            else:
                click.echo(f"{stop.summary}; continue with:", err=True)
                click.echo(f"  {resume_command(recipe, overrides, stop.folder, stop.checkpoint.name)}", err=True)
            sys.exit(stop.exit_code)
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


def resume_command(recipe: str | None, overrides: dict[str, Any], folder: Path, checkpoint: str) -> str:
    """The ``tidpo-mlx train`` command line that continues this run from ``checkpoint`` in ``folder``."""
    words = ["tidpo-mlx", "train"] + (["-c", recipe] if recipe else [])
    for key, value in overrides.items():
        if value is None or key == "adapter_path":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, str(value)]
    words += ["--adapter-path", str(folder), "--resume", checkpoint]
    return shlex.join(words)


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
from tidpo_mlx.data_check import data as data_group  # noqa: E402  (registered here, with its command)
main.add_command(data_group, "data")
from tidpo_mlx.audit_command import audit_command  # noqa: E402  (registered here, with its command)
main.add_command(audit_command, "audit")


if __name__ == "__main__":
    sys.exit(main())
