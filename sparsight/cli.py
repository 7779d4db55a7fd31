"""The ``sparsight`` command; each package contributes its subcommands from its own ``cli.py``.

This is also the command line's one error boundary: an error the user can fix (bad input, a missing
file, an unreachable database) ends the command with one line ``Error: …`` and a non-zero exit; the
traceback is shown only with ``sparsight --debug …`` or ``SPARSIGHT_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from .clitools import resolve_from_cli, resolve_study, study_options
from .config import describe_options
from .errors import user_error_message
from .layout import STUDY_FILE, Layout

DEBUG_ENV = "SPARSIGHT_DEBUG"


class ErrorBoundary(click.Group):
    """A click group whose errors end in one ``Error:`` line instead of a traceback."""

    debug = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        type(self).debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as stop:
            sys.exit(stop.exit_code)
        except click.Abort:             # Ctrl-C: every finished stage, model and epoch is on disk
            click.echo("Error: interrupted; what was finished is kept, and the same command goes on from there",
                       err=True)
            sys.exit(1)
        except click.ClickException as err:
            message = " ".join(err.format_message().split())
            if isinstance(err, click.UsageError) and err.ctx is not None:
                message += f" (see `{err.ctx.command_path} --help`)"
            click.echo(f"Error: {message}", err=True)
            sys.exit(err.exit_code)
        except Exception as err:    # noqa: BLE001 - sorted into fixable errors and bugs below
            message = user_error_message(err)
            if message is None or type(self).debug:
                raise
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)
        sys.exit(0)


@click.group(cls=ErrorBoundary, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sparsight")
@click.option("--debug", is_flag=True, help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
def main(debug):
    """sparsight — does pruning a vision network change how interpretable its units are?

    Prune trained CNNs, render stimuli per unit, run forced-choice trials with people and a
    machine observer, and relate the scores to pruning rate. `sparsight run` drives the whole
    study; with no study file it runs the embedded default (no downloads). Examples:

    \b
      sparsight run                                  # the embedded default study (the demo)
      sparsight run studies/googlenet-imagenet.toml --plan
      sparsight serve runs/default                   # its survey for people
    """
    if debug:
        ErrorBoundary.debug = True
    if not (debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")):   # a warning: one line, not its source line
        previous, warnings.formatwarning = warnings.formatwarning, one_line_warning
        click.get_current_context().call_on_close(lambda: setattr(warnings, "formatwarning", previous))


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@main.command("run")
@click.argument("study_path", required=False, type=click.Path(resolve_path=True))
@study_options
@click.option("--name", default=None, help="study name (output folder under study.output_dir)")
@click.option("--force", multiple=True, metavar="STAGE", help="rerun this stage even if it is up to date "
              "(repeatable; 'all' reruns everything)")
@click.option("--show-options", is_flag=True, help="print every setting of this study (profile, study file, "
              "--set) with its meaning and, where it differs, the built-in default; then exit")
@click.option("--plan", is_flag=True, help="print the resolved study and which stages would run, then exit")
def run_cmd(study_path, study_file, profile, overrides, device, name, force, show_options, plan):
    """Run a study: data → base and observer models → pruning and retraining → robustness and
    evaluation → stimuli → dissection → MIS → machine participants → analysis report.

    STUDY_PATH (or --study) is a TOML study file; without one the built-in embedded study runs.
    Outputs go to runs/<name>/ (study.toml holds the resolved configuration). A study directory, or
    the study.toml recorded in one, runs in that directory, wherever it was moved or copied. A stage whose
    inputs and outputs are unchanged is skipped; --force STAGE reruns it. Under torchrun every
    rank runs the same command (training with DDP, stimuli sharded); rank 0 writes the files.
    Relative paths in a study file or --set are taken from the working directory. Examples:

    \b
      sparsight run                                   # the embedded default study (the demo)
      sparsight run --profile quick --set units.units_per_layer=4
      sparsight run studies/googlenet-imagenet.toml --plan
      torchrun --nproc_per_node=8 -m sparsight run studies/googlenet-imagenet.toml
    """
    in_place = _recorded_study_dir(study_path)
    if in_place is not None and name is not None:
        raise click.UsageError(f"{in_place} is a study directory and runs where it is; --name picks a new folder "
                               f"under study.output_dir, so give a study file with it instead")
    if in_place is not None:
        cfg = resolve_study(in_place, study_file, profile, overrides, device)
    else:
        cfg = resolve_from_cli(study_path or study_file, profile, overrides, device, {"study.name": name})
    if show_options:                # this study's values: its profile, study file and --set
        click.echo(describe_options(cfg))
        return
    from .study import study_problems
    problems = study_problems(cfg, pipeline_stages())
    if problems and not plan:      # before any stage: not hours later, at the stage that needs the setting
        raise click.ClickException("; ".join(problems))
    if plan:
        from .study import plan_study
        click.echo(cfg.to_toml())
        click.echo(f"study directory: {cfg.run_dir}")
        for stage, state in plan_study(cfg, pipeline_stages(), force=tuple(force)):
            state, _, why = state.partition(" (")
            click.echo(f"{stage.name:13s} {state:11s} {stage.description}")
            if why:
                click.echo(f"{'':25s} ({why}")
        for line in problems:
            click.echo(f"problem (the run stops before its first stage): {line}")
        if problems:            # a script that plans first sees the run would stop
            raise SystemExit(1)
        return
    from pruning.training import open_study

    from .study import run_study
    with open_study(cfg) as study:
        run_study(study, pipeline_stages(), force=tuple(force), log=click.echo)
    if study.is_main:
        _print_summary(study)


def _recorded_study_dir(path: str | None):
    """The study directory ``path`` is, or whose recorded study.toml it is (beside the stage records or
    the models), else ``None``: such a study runs in place, not under the output folder it recorded."""
    if path is None:
        return None
    given = Path(path)
    if given.is_dir():
        if not Layout(given).holds_a_study():
            raise click.UsageError(f"{given} is a folder but not a study directory (no {STUDY_FILE}, models/ or "
                                   f"mis/); give a study file, or a folder that `sparsight run` made")
        return given
    folder = given.parent
    if given.name == STUDY_FILE and (Layout(folder).stage_records.is_dir() or Layout(folder).models.is_dir()):
        return folder
    return None


def pipeline_stages() -> list:
    """The study's stages in order; each package contributes its own."""
    from analysis.stages import STAGES as analysis_stages
    from pruning.stages import STAGES as pruning_stages
    from stimuli.stages import STAGES as stimuli_stages
    from survey_app.stages import STAGES as survey_stages
    return list(pruning_stages) + list(stimuli_stages) + list(survey_stages) + list(analysis_stages)


def _print_summary(study) -> None:
    """The model table, the answers, power and failed checks (:func:`analysis.cli.echo_study_summary`); then
    where the report is and how to serve the survey."""
    from analysis.cli import echo_study_summary
    layout = study.layout
    echo_study_summary(layout)
    click.echo(f"\nstudy directory: {study.run_dir}")
    if layout.report_html.is_file():
        click.echo(f"report: {layout.report_html}")
    if layout.manifest.is_file():
        click.echo(f"survey for people: sparsight serve {study.run_dir}")


def _register() -> None:
    from pruning.cli import COMMANDS as pruning_commands
    from stimuli.cli import COMMANDS as stimuli_commands
    from analysis.cli import COMMANDS as analysis_commands
    from survey_app.cli import COMMANDS as survey_commands
    for command in pruning_commands + stimuli_commands + survey_commands + analysis_commands:
        main.add_command(command)


_register()
