"""The ``sparsight`` command; each package contributes its subcommands from its own ``cli.py``."""
from __future__ import annotations

import click

from .clitools import resolve_from_cli, study_options
from .config import describe_options


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sparsight")
def main():
    """sparsight — does pruning a vision network change how interpretable its units are?

    Prune trained CNNs, render stimuli per unit, run forced-choice trials with people and a
    machine observer, and relate the scores to pruning rate. `sparsight run` drives the whole
    study; with no study file it runs the embedded default (no downloads).
    """


@main.command("run")
@click.argument("study_path", required=False, type=click.Path(dir_okay=False))
@study_options
@click.option("--name", default=None, help="study name (output folder under study.output_dir)")
@click.option("--force", multiple=True, metavar="STAGE", help="rerun this stage even if it is up to date "
              "(repeatable; 'all' reruns everything)")
@click.option("--show-options", is_flag=True, help="print every study setting with its default and exit")
def run_cmd(study_path, study_file, profile, overrides, device, name, force, show_options):
    """Run a study: data → base model → observer → evaluation (more stages as they exist).

    STUDY_PATH (or --study) is a TOML study file; without one the built-in embedded study runs.
    Outputs go to runs/<name>/ (study.toml holds the resolved configuration). A stage whose
    inputs and outputs are unchanged is skipped; --force STAGE reruns it.
    """
    if show_options:
        click.echo(describe_options())
        return
    overrides = tuple(overrides) + ((f'study.name="{name}"',) if name else ())
    cfg = resolve_from_cli(study_path or study_file, profile, overrides, device)
    from .study import run_study
    try:
        study = run_study(cfg, force=tuple(force), log=click.echo)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if study.is_main:
        _print_summary(study)


def _print_summary(study) -> None:
    import csv

    table = study.path("evaluation.csv")
    rows = list(csv.DictReader(open(table))) if table.is_file() else []
    for r in rows:
        r["rate_requested"], r["sparsity"] = float(r["rate_requested"]), float(r["sparsity"])
        r["top1"] = float(r["top1"]) if r["top1"] else None
    if rows:
        click.echo(f"\n{'model':10s} {'arch':16s} {'method':12s} {'rate':>5s} {'sparsity':>8s} {'top1':>6s}")
        for r in rows:
            click.echo(f"{r['model_id']:10s} {r['arch']:16s} {r['method'] or '-':12s} {r['rate_requested']:5.2f} "
                       f"{r['sparsity']:8.3f} {r['top1'] if r['top1'] is None else format(r['top1'], '.3f'):>6}")
    click.echo(f"\nstudy directory: {study.run_dir}")


def _register() -> None:
    from pruning.cli import COMMANDS as pruning_commands
    from stimuli.cli import COMMANDS as stimuli_commands
    from analysis.cli import COMMANDS as analysis_commands
    from survey_app.cli import COMMANDS as survey_commands
    for command in pruning_commands + stimuli_commands + survey_commands + analysis_commands:
        main.add_command(command)


_register()
