"""``sparsight serve``, ``sparsight participant`` and ``sparsight responses``."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import click

from sparsight.clitools import (OPTIONAL_RUN_DIR, RUN_DIR_ARGUMENT, device_option, resolve_study, section_overrides,
                                study_options)
from sparsight.layout import Layout

RUN_DIR = RUN_DIR_ARGUMENT
DATABASE = click.option("--database", default=None, metavar="URL",
                        help="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db (default: the study's "
                             "survey.database, else sqlite RUN_DIR/survey.db)")


def _absolute(_ctx, _param, value):
    from sparsight.files import absolute
    return None if value is None else absolute(value)


def _survey_overrides(overrides) -> dict:
    return section_overrides(overrides, "survey")


def _build_app(run_dir: Path, database: str | None, survey: dict, **extra):
    from .app import create_app
    try:
        return create_app({"RUN_DIR": str(run_dir), "DATABASE_URL": database, "SURVEY": survey, **extra})
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from None


def api_token_file(run_dir: Path) -> Path:
    return Layout(run_dir).survey / "api_token"


def ensure_credentials(run_dir: Path, database: str | None, *, reset_admin: bool = False) -> dict:
    """Store the API token's hash (token kept in RUN_DIR/survey/api_token, mode 600) and, unless
    SPARSIGHT_ADMIN_PASSWORD is set, an admin password hash; return what should be shown once."""
    from .app import database_url, study_config
    from .db import database as open_database

    url = database_url(run_dir, study_config(run_dir), database)
    with open_database(url) as sessions:
        return {"database": url, **_store_credentials(sessions, run_dir, reset_admin)}


def _store_credentials(sessions, run_dir: Path, reset_admin: bool) -> dict:
    from .db import set_secret
    from .models import Secret
    from .service import token_hash

    shown = {}
    token = os.environ.get("SPARSIGHT_API_TOKEN")
    if not token:
        path = api_token_file(run_dir)
        if path.is_file():
            token = path.read_text().strip()
        else:
            token = secrets.token_urlsafe(24)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
        set_secret(sessions, "api_token_hash", token_hash(token))
        shown["api_token_file"] = str(path)
    if not os.environ.get("SPARSIGHT_ADMIN_PASSWORD"):
        with sessions() as s:
            has = s.get(Secret, "admin_password_hash") is not None
        if reset_admin or not has:
            password = secrets.token_urlsafe(12)
            set_secret(sessions, "admin_password_hash", token_hash(password))
            shown["admin_password"] = password
    return shown


@click.command("serve")
@RUN_DIR
@DATABASE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--set", "overrides", multiple=True, metavar="survey.KEY=VALUE",
              help="change a survey setting for this server, e.g. --set survey.main_trials=20")
@click.option("--reset-admin-password", is_flag=True, help="make and print a new admin password")
def serve_cmd(run_dir, database, host, port, overrides, reset_admin_password):
    """Serve the 2-AFC survey of a study (RUN_DIR holds stimuli/manifest.parquet).

    This is Flask's development server, for trying the study locally. Participants open
    http://HOST:PORT/; on Prolific they get the study link with the IDs appended; the admin area is
    /admin. Examples:

    \b
      sparsight serve runs/default --port 5000
      sparsight serve runs/default --set survey.main_trials=20
    \b
    Prolific study URL:
      http://HOST:PORT/?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}&SESSION_ID={{%SESSION_ID%}}

    For a real study run several workers behind a proxy, with the settings in the environment:

    \b
      SPARSIGHT_RUN_DIR=RUN_DIR SPARSIGHT_DATABASE_URL=postgresql+psycopg://u:pw@db/survey \\
        gunicorn -w 4 -k gthread --threads 8 -b 0.0.0.0:8000 survey_app.wsgi:app
    """
    from .app import check_templates, study_config, survey_material
    from .readiness import launch_notes
    survey = _survey_overrides(overrides)
    try:
        cfg = study_config(run_dir, survey)
        check_templates(cfg.survey)
        material = survey_material(run_dir, cfg)     # nothing is stored for a folder it cannot serve
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    _check_port(host, port)         # before a password is made and shown once, for a server that never starts
    shown = ensure_credentials(run_dir, database, reset_admin=reset_admin_password)
    app = _build_app(run_dir, database, survey)
    click.echo(f"survey of {run_dir} on http://{host}:{port}/  (database {app.config['DATABASE']})")
    click.echo("this is the development server, for trying the study; for participants run gunicorn "
               "(the command is at the end of `sparsight serve --help`)")
    if "admin_password" in shown:
        click.echo(f"admin password (shown once): {shown['admin_password']}")
    if "api_token_file" in shown:
        click.echo(f"machine-participant API token in {shown['api_token_file']}")
    changed = _overrides_note(run_dir, cfg, survey)
    if changed:
        click.echo(changed)
    for note in launch_notes(cfg.survey, material.refs_per_side, material):
        click.echo(f"before real participants: {note}")
    app.run(host=host, port=port, threaded=True, debug=False)


def _overrides_note(run_dir: Path, cfg, survey: dict) -> str | None:
    """One line naming the ``--set`` values that differ from the study file's: they hold for this server only."""
    from .app import study_config
    filed = study_config(run_dir).survey
    changed = [f"survey.{k}={getattr(cfg.survey, k)!r} (study file: {getattr(filed, k)!r})" for k in sorted(survey)
               if getattr(cfg.survey, k) != getattr(filed, k)]
    if not changed:
        return None
    return (f"--set {', '.join(changed)}: for this server only; write it into the [survey] section of "
            f"{Layout(run_dir).study_toml} for gunicorn (survey_app.wsgi) and later servers")


def _check_port(host: str, port: int) -> None:
    """Stop with one line when the server could not listen on ``host:port`` (taken, or not an address here)."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise click.UsageError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server itself binds
        try:
            probe.bind(address)
        except OSError as err:
            raise click.UsageError(f"cannot listen on {host}:{port} ({err.strerror}); another server may hold the "
                                   f"port: choose another with --port") from None


def make_observer(name: str, run_dir: Path, alpha: float, device: str, weights: str = "", size: int = 0):
    """The similarity observer on embedding ``name`` (``size``: its input size, 0 for its default)."""
    from pruning.training import resolve_device

    from .embeddings import create_embedding
    from .machine import SimilarityObserver
    try:
        embedding = create_embedding(name, run_dir, weights=weights, device=str(resolve_device(device)), size=size)
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    return SimilarityObserver(embedding, alpha, name=name)


@click.command("participant")
@RUN_DIR
@click.option("--url", default=None, help="a running survey (http://host:port); default: in-process on RUN_DIR")
@DATABASE
@click.option("--observer", "observer_name", default=None,
              help="embedding of the decision rule (default: the study's mis.embedding): observer, pixels, "
                   "dreamsim, or a model name with --weights")
@click.option("--weights", default=None, help="weights of a model-name embedding (default: mis.embedding_weights)")
@click.option("--alpha", type=float, default=None, help="slope of P = σ(α·Δ) (default: the study's mis.alpha)")
@click.option("--mode", type=click.Choice(["exhaustive", "participant"]), default="exhaustive", show_default=True,
              help="every task of the bank, or one participant's trial list")
@click.option("--condition", default=None, help="restrict to one condition (e.g. 'base|natural')")
@click.option("--token", default=None, help="API token (default: $SPARSIGHT_API_TOKEN, else RUN_DIR/survey/api_token)")
@device_option("cpu")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of the decisions (default: RUN_DIR/survey/machine-<observer>-<session>.csv)", callback=_absolute)
def participant_cmd(run_dir, url, database, observer_name, weights, alpha, mode, condition, token, device, out):
    """Let a model observer answer survey trials through the survey's API, like a participant.

    Its answers are stored as a machine session (kept out of the human balance) and appear in the
    responses export next to the human ones. Examples:

    \b
      sparsight participant runs/default                       # every task, in-process
      sparsight participant runs/default --mode participant --observer pixels
      sparsight participant runs/default --url http://127.0.0.1:5000
    """
    import pandas as pd

    from .app import study_config
    from .machine import FlaskTransport, HttpTransport, SurveyClient, run_session
    mis = study_config(run_dir).mis
    alpha = mis.alpha if alpha is None else alpha
    name = observer_name or mis.embedding
    observer = make_observer(name, run_dir, alpha, device, mis.embedding_weights if weights is None else weights,
                             size=mis.embedding_size if name == mis.embedding else 0)   # as the study's MIS sees
    if url:
        token = token or os.environ.get("SPARSIGHT_API_TOKEN") or (
            api_token_file(run_dir).read_text().strip() if api_token_file(run_dir).is_file() else None)
        if not token:
            raise click.UsageError("no API token: pass --token, set SPARSIGHT_API_TOKEN, or start the server with "
                                   "`sparsight serve` (it writes RUN_DIR/survey/api_token)")
        transport = HttpTransport(url)
    else:
        token = secrets.token_urlsafe(24)
        transport = FlaskTransport(_build_app(run_dir, database, {}, API_TOKEN=token))
    from .machine import SurveyRequestError
    try:
        summary = run_session(SurveyClient(transport), observer, api_token=token, mode=mode, condition=condition)
    except SurveyRequestError as err:
        raise click.ClickException(f"the survey refused the machine participant: {err}") from None
    except OSError as err:
        if not url:
            raise
        raise click.ClickException(f"cannot reach the survey at {url} ({err.strerror or err}); is "
                                   f"`sparsight serve {run_dir}` running there?") from None
    out = out or Layout(run_dir).survey / f"machine-{observer.name}-{summary['session']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(summary["decisions"]).to_csv(out, index=False)
    click.echo(f"{observer.name}: {summary['trials']} trials, accuracy {summary['accuracy']:.3f} "
               f"(session {summary['session']}); decisions in {out}")


@click.command("responses")
@RUN_DIR
@DATABASE
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="output file, .csv or .parquet (default: RUN_DIR/responses.csv, events.csv, participants.csv)",
              callback=_absolute)
@click.option("--table", type=click.Choice(["responses", "events", "participants", "declines"]), default="responses",
              show_default=True, help="what to export: responses, browser events, participants, or who declined "
                                      "consent")
def responses_cmd(run_dir, database, out, table):
    """Export every stored response (human and machine) as the tidy responses table, or the browser
    events or the participants. The responses carry each model's method, schedule, rate and sparsity where
    the study directory has its models (meta.json or evaluation.csv), and the id of the survey settings
    each participant ran under (protocol). Text cells a spreadsheet would run as formulas are quoted in CSV.
    Examples:

    \b
      sparsight responses runs/default                          # runs/default/responses.csv
      sparsight responses runs/default --out answers.parquet
      sparsight responses runs/default --table events           # runs/default/events.csv
    """
    from sparsight.files import atomic_write_text

    from .app import database_url, study_config
    from .db import database as open_database
    from .db import missing_sqlite_file
    from .export import declines_frame, events_frame, participants_frame, responses_frame, safe_csv, with_models
    out = out or run_dir / f"{table}.csv"
    if out.suffix not in (".csv", ".parquet"):
        raise click.UsageError(f"--out {out}: choose a .csv or .parquet file")
    cfg = study_config(run_dir)
    url = database_url(run_dir, cfg, database)
    missing = missing_sqlite_file(url)
    if missing is not None:        # an export creates nothing: no empty database in a wrong folder
        raise click.UsageError(f"no survey database at {missing}: nothing to export (the survey stores its "
                               f"responses there once `sparsight serve {run_dir}` or `sparsight run` has run; "
                               f"another database: --database URL)")
    with open_database(url) as sessions:
        df = {"responses": lambda: responses_frame(sessions, cfg.study.name),
              "events": lambda: events_frame(sessions, cfg.study.name),
              "participants": lambda: participants_frame(sessions, cfg.study.name),
              "declines": lambda: declines_frame(sessions, cfg.study.name)}[table]()
    if table == "responses":
        try:
            df = with_models(df, run_dir)
        except ValueError as err:           # a meta.json that is not JSON
            raise click.ClickException(str(err)) from None
    if out.suffix == ".parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out, index=False)
    else:
        atomic_write_text(out, safe_csv(df))
    if table == "declines":
        click.echo(f"{out}: {len(df)} declines")
    else:
        click.echo(f"{out}: {len(df)} {table if table != 'participants' else 'rows'} from "
                   f"{df['participant'].nunique() if len(df) else 0} sessions")


@click.command("mis")
@OPTIONAL_RUN_DIR
@study_options
def mis_cmd(run_dir, study_file, profile, overrides, device):
    """Machine Interpretability Score of every unit in the study's stimulus bank.

    RUN_DIR is a study directory (its study.toml is used); without it the study comes from --study,
    --profile and --set. Writes mis/tasks.csv (Δ per task), mis/units.csv, mis/models.csv (mean MIS
    per model and reference kind with a bootstrap CI over units) and, with mis.alpha_source = "auto"
    and enough human responses in the survey database, mis/calibration.json with the fitted α.
    Examples:

    \b
      sparsight mis runs/default
      sparsight mis runs/default --set mis.embedding=resnet50 --set mis.embedding_weights=IMAGENET1K_V2
    """
    import pandas as pd

    from pruning.training import open_study

    from .stages import run_mis
    cfg = resolve_study(run_dir, study_file, profile, overrides, device)
    layout = Layout(cfg.run_dir)
    if not layout.manifest.is_file():
        raise click.ClickException(f"no stimulus bank in {layout.stimuli}; run `sparsight stimuli` "
                                   f"(or `sparsight run`) for this study first")
    with open_study(cfg) as study:
        files = run_mis(study, log=click.echo)
    models = pd.read_csv(layout.mis_models)
    for r in models.itertuples():
        click.echo(f"{r.model_id:24s} {r.kind:9s} MIS {r.mis:.3f} [{r.mis_ci_low:.3f}, {r.mis_ci_high:.3f}] "
                   f"over {r.units} units (dead {r.dead}, pruned {r.pruned}); α {r.alpha:.3g} ({r.alpha_source})")
    click.echo(f"written: {', '.join(str(f) for f in files)}")


COMMANDS = [serve_cmd, participant_cmd, responses_cmd, mis_cmd]
