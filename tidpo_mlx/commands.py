"""``tidpo-mlx eval``, ``importance`` and ``experiment`` (placeholder while being written)."""

import click


@click.command()
def eval_command() -> None:
    """Per-pair loss of a recipe on a data file, without training."""
    raise click.ClickException("not yet available")


@click.command()
def importance_command() -> None:
    """Per-token attribution, prior and weights of pairs."""
    raise click.ClickException("not yet available")


@click.command()
def experiment_command() -> None:
    """Label-noise experiment."""
    raise click.ClickException("not yet available")
