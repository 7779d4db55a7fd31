"""``sparsight analyze``: statistics, figures and the HTML report of a study."""
from __future__ import annotations

from pathlib import Path

import click

from sparsight.clitools import RUN_DIR_ARGUMENT, section_overrides
from sparsight.config import ConfigError, apply_settings


def _analysis_overrides(overrides) -> dict:
    return section_overrides(overrides, "analysis")


@click.command("analyze")
@RUN_DIR_ARGUMENT
@click.option("--out", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default=None,
              help="report folder (default: RUN_DIR/report)")
@click.option("--import", "import_csv", type=click.Path(dir_okay=False, path_type=Path, resolve_path=True), default=None,
              help="analyse this external trial-level CSV instead of the study's responses")
@click.option("--map", "maps", multiple=True, metavar="CANONICAL=COLUMN",
              help="with --import: which CSV column holds participant, correct, unit, condition, confidence, rt, "
                   "catch, trial_type (also model_id, rate, kind, …); repeatable")
@click.option("--mapping", type=click.Path(dir_okay=False, path_type=Path, resolve_path=True), default=None,
              help="with --import: a TOML file whose [columns] table maps canonical names to CSV columns")
@click.option("--set", "overrides", multiple=True, metavar="analysis.KEY=VALUE",
              help="change an analysis setting for this report, e.g. --set analysis.tost_margin=0.03")
def analyze_cmd(run_dir, out, import_csv, maps, mapping, overrides):
    """Analyse a study: MIS vs pruning rate, human accuracy, equivalence tests, figures, report.

    Reads RUN_DIR (models/*/meta.json, evaluation.csv, mis/, dissection/, robustness/ and
    responses.csv or the survey database) and writes RUN_DIR/report/index.html (self-contained),
    report/results.json and report/figures/*.png. Analyses whose data do not exist yet are listed
    with the reason. Examples, the second for external trial data (see --map for the canonical names):

    \b
      sparsight analyze runs/default
      sparsight analyze runs/default --import trials.csv --map participant=subj \\
          --map correct=acc --map condition=cond --map rt=rt_ms
    """
    from .load import import_trials, load_models, parse_mapping, read_mapping, study_config
    from .report import analyze

    if (maps or mapping) and import_csv is None:
        raise click.UsageError("--map and --mapping describe an --import CSV; give --import FILE.csv")
    if maps and mapping:
        raise click.UsageError("give the column mapping either as --map options or as --mapping FILE, not both")
    if import_csv is not None and not (maps or mapping):
        raise click.UsageError("--import needs the column mapping: --map participant=COLUMN --map correct=COLUMN … "
                               "or --mapping FILE.toml")
    try:
        cfg = study_config(run_dir)
        settings = _analysis_overrides(overrides)
        if settings:
            apply_settings(cfg, {"analysis": settings}, "--set")
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    trials, source = None, None
    if import_csv is not None:
        try:
            columns = read_mapping(mapping) if mapping else parse_mapping(maps)
            trials = import_trials(import_csv, columns, models=load_models(run_dir))
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        source = f"imported {import_csv.name}"
    try:
        results = analyze(run_dir, cfg, out, trials=trials, source=source)
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    stats = results["statistics"]
    counts = {s: sum(e["status"] == s for e in stats) for s in ("ok", "skipped", "failed")}
    for note in results["notes"]:
        click.echo(note)
    click.echo(f"{counts['ok']} analyses ran, {counts['skipped']} skipped for lack of data, {counts['failed']} failed "
               f"(reasons in the report)")
    failed = [c for c in results.get("validity", []) if c["passed"] is False]
    for c in failed:
        click.echo(f"validity check FAILED: {c['name']}: {c['value']} (needs {c['threshold']}; {c['detail']})")
    click.echo(f"report: {results['files']['html']}")
    click.echo(f"results: {results['files']['json']}")


COMMANDS = [analyze_cmd]
