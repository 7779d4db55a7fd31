"""``sparsight analyze``: statistics, figures and the HTML report of a study."""
from __future__ import annotations

import json
from pathlib import Path

import click

from sparsight.clitools import RUN_DIR_ARGUMENT, section_overrides, usage_error
from sparsight.config import ConfigError, apply_settings
from sparsight.layout import Layout


def _analysis_overrides(overrides) -> dict:
    return section_overrides(overrides, "analysis")


def _study_with_analysis_settings(run_dir, overrides):
    """The study of ``run_dir`` with ``--set analysis.KEY=VALUE`` applied (a usage error when invalid)."""
    from .api import open_run
    try:
        cfg = open_run(run_dir).config
        settings = _analysis_overrides(overrides)
        if settings:
            apply_settings(cfg, {"analysis": settings}, "--set")
    except ConfigError as err:
        raise usage_error(err) from None
    return cfg


@click.command("analyze")
@RUN_DIR_ARGUMENT
@click.option("--out", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default=None,
              help="report folder (default: RUN_DIR/report; with --import: RUN_DIR/report-<CSV name>, so the "
                   "study's own report stays)")
@click.option("--import", "import_csv", type=click.Path(dir_okay=False, path_type=Path, resolve_path=True), default=None,
              help="analyse this external trial-level CSV instead of the study's responses")
@click.option("--map", "maps", multiple=True, metavar="CANONICAL=COLUMN",
              help="with --import: which CSV column holds participant, correct, unit, condition, confidence, rt, "
                   "catch, trial_type (also model_id, rate, kind, …); repeatable; a column already named so "
                   "needs no --map")
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
    from sparsight.study import Study

    from .load import import_trials, load_models, parse_mapping, read_mapping, read_recoding
    from .stages import run_analysis
    from .validity import failed_line

    if (maps or mapping) and import_csv is None:
        raise click.UsageError("--map and --mapping describe an --import CSV; give --import FILE.csv")
    if maps and mapping:
        raise click.UsageError("give the column mapping either as --map options or as --mapping FILE, not both")
    if import_csv is None and not Layout(run_dir).holds_a_study():
        raise click.UsageError(f"{run_dir} is not a study directory: it has no study.toml, models/, mis/ or survey "
                               f"responses; make one with `sparsight run` (the default study goes to runs/default), "
                               f"or analyse trials of your own with --import FILE.csv")
    cfg = _study_with_analysis_settings(run_dir, overrides)
    trials, source = None, None
    if import_csv is not None:
        try:
            columns = read_mapping(mapping) if mapping else parse_mapping(maps) if maps else {}
            trials = import_trials(import_csv, columns, models=load_models(run_dir),
                                   catch_min_accuracy=cfg.survey.catch_min_accuracy,
                                   recode=read_recoding(mapping) if mapping else None, kinds=cfg.stimuli.kinds)
        except ValueError as err:
            raise usage_error(err) from None
        source = f"imported {import_csv.name}"
        out = out or Layout(run_dir).root / f"report-{import_csv.stem}"
        if trials.attrs.get("columns_by_name"):
            named = ", ".join(trials.attrs["columns_by_name"])
            click.echo(f"{import_csv.name}: columns taken by their own names: {named}")
        if trials.attrs.get("foreign_kinds"):
            click.echo(f"{import_csv.name}: conditions {', '.join(trials.attrs['foreign_kinds'])} are not reference "
                       f"kinds of the study ({', '.join(cfg.stimuli.kinds)}): they are compared as conditions but "
                       f"meet no MIS; recode them in a --mapping file ([values.condition]) where they are those kinds")
        if "catch_rule" in trials.attrs:
            excluded, people = trials.attrs["catch_rule"]
            click.echo(f"{import_csv.name}: {excluded} of {people} participants with catch trials excluded by the "
                       f"study's catch rule (accuracy below survey.catch_min_accuracy = "
                       f"{cfg.survey.catch_min_accuracy:g}); map an 'excluded' column to use your own exclusions")
    try:
        files = run_analysis(Study(cfg), out=out, trials=trials, source=source)
    except (FileNotFoundError, ValueError) as err:
        raise usage_error(err) from None
    html, results_json = files[:2]
    results = json.loads(results_json.read_text())
    stats = results["statistics"]
    counts = {s: sum(e["status"] == s for e in stats) for s in ("ok", "skipped", "failed")}
    for note in results["notes"]:
        click.echo(note)
    click.echo(f"{counts['ok']} analyses ran, {counts['skipped']} skipped for lack of data, {counts['failed']} failed "
               f"(reasons in the report)")
    failed = [c for c in results.get("validity", []) if c["passed"] is False]
    for c in failed:
        click.echo(f"validity check FAILED: {failed_line(c)}")
    echo_answers(results.get("answers", []))
    click.echo(f"report: {html}")
    click.echo(f"results: {results_json}")


def echo_answers(items: list[dict]) -> None:
    """Does pruning change how interpretable units are? The report's answer per reference kind (and observer)."""
    if items:
        people = any(item.get("observer") == "people" for item in items)
        click.echo(f"\nanswer (total effect of pruning rate, all methods: on the MIS of the units that stay live"
                   f"{', and on human accuracy' if people else ''}):")
        for item in items:
            click.echo(f"  {item['sentence']}")


def _numbers(kind):
    def parse(ctx, _param, text):
        if text is None:
            return None
        try:
            values = [kind(v) for v in str(text).replace(",", " ").split()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list of {kind.__name__}s, got {text!r}", ctx=ctx)
        if not values:
            raise click.BadParameter("the list is empty", ctx=ctx)
        return values
    return parse


@click.command("power")
@RUN_DIR_ARGUMENT
@click.option("--participants", callback=_numbers(int), default="20,40,80,160,320,640", show_default=True,
              help="participants per reference kind to simulate (comma-separated)")
@click.option("--trials", callback=_numbers(int), default=None,
              help="main trials per participant (comma-separated; default: survey.main_trials and twice that)")
@click.option("--change", "changes", callback=_numbers(float), default=None,
              help="true changes in human accuracy over the study's rate span (comma-separated; 0 asks for "
                   "equivalence within analysis.tost_margin; default: 0, −margin, −2·margin)")
@click.option("--simulations", type=click.IntRange(10), default=1000, show_default=True,
              help="simulated studies per design")
@click.option("--set", "overrides", multiple=True, metavar="analysis.KEY=VALUE",
              help="change an analysis setting, e.g. --set analysis.power_participant_sd=0.8")
def power_cmd(run_dir, participants, trials, changes, simulations, overrides):
    """Power and sample size for a study: what its units detect, and what a human study needs.

    The model side comes from the primary MIS slopes (within units, clustered by unit and model): the
    smallest slope detectable at 80 % power and the smallest equivalence margin provable. The human side
    simulates surveys from the trial-level model of the study (its human responses, else the base
    model's MIS with an assumed participant spread) and prints, per design, the power to detect each
    accuracy change or to establish equivalence. Examples:

    \b
      sparsight power runs/default
      sparsight power runs/default --participants 30,60,120 --trials 40,80 --change 0,-0.05
    """
    from .load import load_study_data
    from .power import study_power
    from .report import primary_slopes

    from .api import MissingRunOutput, open_run

    cfg = _study_with_analysis_settings(run_dir, overrides)
    try:
        open_run(run_dir).mis      # a clear error when the run has no MIS yet
    except MissingRunOutput as err:
        raise usage_error(err) from None
    data = load_study_data(run_dir, cfg)
    if data.units.empty:
        raise click.UsageError(f"{run_dir} has no MIS results (mis/units.csv); run `sparsight mis {run_dir}` first")
    try:
        power = study_power(data, primary_slopes(data), changes=changes, participants=participants, trials=trials,
                            simulations=simulations)
    except ValueError as err:
        raise usage_error(err) from None
    click.echo(format_power(power))


def format_power(power: dict) -> str:
    """The power tables as plain text."""
    import pandas as pd

    from .power import smallest_display

    lines = [f"Model side (power {power['target_power']:.0%}, α = {power['alpha']:g}):"]
    model = pd.DataFrame(power["model"])
    if len(model):
        shown = model[["kind", "scope", "units", "ci_half_width_per_10pct", "detectable_slope_per_10pct",
                       "provable_margin_over_span"]]
        lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for m in power.get("trial_models", []):
        lines.append(f"Human side, {m['kind']}: accuracy {m['accuracy_at_rate_0']:.3f} at rate 0, participant SD "
                     f"{m['participant_sd']:.3f}, unit SD {m['unit_sd']:.3f}, model SD "
                     f"{m.get('model_sd', 0.0):.3f} (logit), from {m['source']}")
    human = pd.DataFrame(power["human"])
    if len(human):
        lines.append(human.drop(columns="simulations").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        lines.append("Fewest participants reaching the target power (change 0: equivalence):")
        lines.append(smallest_display(power["smallest"]).to_string(index=False))
    lines += power.get("notes", [])
    return "\n".join(lines)


COMMANDS = [analyze_cmd, power_cmd]


def echo_study_summary(layout) -> None:
    """What ``sparsight run`` prints at the end: one line per model (method, rate, measured sparsity, top-1, MIS ±
    CI per reference kind, interpretable units), then the report's answers, power and failed validity checks."""
    import pandas as pd

    def read(path):
        return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else None
    models = read(layout.evaluation)
    if models is not None:
        mis, dis = read(layout.mis_models), read(layout.dissection_models)
        kinds = sorted(mis["kind"].unique()) if mis is not None else []
        w = max(5, int(models["model_id"].str.len().max()))
        mw = max(6, int(models["method"].fillna("-").astype(str).str.len().max()))
        head = f"{'model':{w}s} {'method':{mw}s} {'rate':>5s} {'sparsity':>8s} {'top1':>6s}"
        head += "".join(f" {'MIS ' + k[:5]:>17s}" for k in kinds) + (f" {'interp.':>9s}" if dis is not None else "")
        click.echo("\n" + head)
        for r in models.itertuples():
            top1 = "" if pd.isna(r.top1) else f"{r.top1:.3f}"
            method = "" if pd.isna(r.method) else str(r.method)
            line = f"{r.model_id:{w}s} {method or '-':{mw}s} {r.rate_requested:5.2f} {r.sparsity:8.3f} {top1:>6s}"
            for k in kinds:
                m = mis[(mis.model_id == r.model_id) & (mis.kind == k)]
                if m.empty or pd.isna(m.mis.iloc[0]):
                    cell = ""
                elif pd.isna(m.mis_ci_low.iloc[0]):      # too few live units for a bootstrap interval
                    cell = f"{m.mis.iloc[0]:.2f} ({int(m.units.iloc[0])} unit{'s' * (int(m.units.iloc[0]) != 1)})"
                else:
                    cell = f"{m.mis.iloc[0]:.2f} [{m.mis_ci_low.iloc[0]:.2f},{m.mis_ci_high.iloc[0]:.2f}]"
                line += f" {cell:>17s}"
            if dis is not None:
                d = dis[dis.model_id == r.model_id]
                line += f" {'' if d.empty else f'{int(d.interpretable.iloc[0])}/{int(d.units.iloc[0])}':>9s}"
            click.echo(line)
        if mis is not None:
            click.echo(f"MIS: mean over live units with a 95 % bootstrap CI (the unit count where too few live "
                       f"units are left for one); α = {mis.alpha.iloc[0]:.3g} "
                       f"({mis.alpha_source.iloc[0]}), embedding {mis.embedding.iloc[0]}")
    results = _report_results(layout.report_json)
    echo_answers(results.get("answers", []))
    echo_power(results.get("power") or {})
    _echo_failed_checks(results.get("validity", []))


def _report_results(results_json) -> dict:
    """The report's results.json ({} when there is none yet)."""
    import json
    try:
        return json.loads(results_json.read_text())
    except (OSError, ValueError):
        return {}


def _design_phrase(s: dict) -> str:
    """E.g. "160 participants × 12 trials to detect an accuracy change of −0.1", or "more than 640
    participants …" when no design tried reaches the power."""
    goal = (f"to detect an accuracy change of {s['change_over_span']:+g}".replace("-", "−") if s["goal"] == "detect"
            else "for equivalence")
    if s["participants"]:
        return f"{s['participants']} participants × {s['trials']} trials {goal}"
    return f"more than {s['largest_tried']} participants at {s['trials']} trials {goal}"


def _per_kind(power: dict) -> str:
    """How the participant counts of the power line are meant."""
    kinds = {s["kind"] for s in power.get("smallest", [])}
    return "; participants per reference kind" if len(kinds) > 1 else ""


def echo_power(power: dict) -> None:
    """Per kind: the smallest MIS slope the study detects, and the fewest participants a human study needs."""
    pooled = [m for m in power.get("model", []) if m.get("scope") == "all methods"]
    if not pooled:
        return
    click.echo(f"\npower ({power['target_power']:.0%}{_per_kind(power)}; `sparsight power RUN_DIR` plans other "
               f"designs):")
    for m in pooled:
        models = f" in {m['models']} models" if m.get("models") else ""
        line = (f"  {m['kind']}: {m['units']} units{models} detect an MIS slope of "
                f"{m['detectable_slope_per_10pct']:.4f} per 10 % pruning rate (CI ±{m['ci_half_width_per_10pct']:.4f})")
        designs = [s for s in power.get("smallest", []) if s["kind"] == m["kind"]]
        best = {}
        # per goal and change: the reaching design with the fewest trials in all, else the largest tried
        for s in designs:
            key = (s["goal"], s["change_over_span"])
            cost = (0, s["participants"] * s["trials"]) if s["participants"] else (1, -s["trials"])
            if key not in best or cost < best[key][0]:
                best[key] = (cost, s)
        parts = [_design_phrase(s) for _, (_, s) in sorted(best.items())]
        click.echo(line + ("; a human study needs " + ", ".join(parts) if parts else "") + ".")


def _echo_failed_checks(checks: list[dict]) -> None:
    """The study's failed validity checks (report/results.json["validity"]), one line each."""
    failed = [c for c in checks if c.get("passed") is False]
    if not failed:
        return
    click.echo(f"\nvalidity: {len(failed)} of {len(checks)} checks failed (report: Validity section)")
    from .validity import failed_line
    for c in failed:
        click.echo(f"  FAILED {failed_line(c)}")
