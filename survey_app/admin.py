"""Admin area (password, CSRF-protected forms): progress per condition and unit, exclusions, exports."""
from __future__ import annotations

import io

from flask import (Blueprint, Response, current_app, redirect, render_template, request, url_for)

from .export import declines_frame, events_frame, participants_frame, responses_frame, safe_csv, with_models
from .security import (CSRF_FIELD, admin_configured, admin_required, check_admin_password, check_csrf,
                       end_admin_session, login_throttled, record_login, start_admin_session)
from .service import SurveyError

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/admin") and "//" not in target else url_for("admin.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None if admin_configured() else ("no admin password is configured: set SPARSIGHT_ADMIN_PASSWORD "
                                             "or start the server with `sparsight serve`")
    if request.method == "POST" and error is None:
        check_csrf(request.form.get(CSRF_FIELD))
        client = request.remote_addr or "unknown"
        wait = login_throttled(client)
        if wait:
            return (render_template("admin_login.html", error=f"too many wrong passwords; try again in {wait} s"),
                    429, {"Retry-After": str(wait)})
        ok = check_admin_password(request.form.get("password", ""))
        record_login(client, ok)
        if ok:
            start_admin_session()
            return redirect(_safe_next(request.args.get("next")))
        error = "wrong password"
    return render_template("admin_login.html", error=error), (401 if error and request.method == "POST" else 200)


@bp.post("/logout")
def logout():
    check_csrf(request.form.get(CSRF_FIELD))
    end_admin_session()
    return redirect(url_for("admin.login"))


@bp.get("/")
@admin_required
def index():
    service = current_app.extensions["survey"]
    sessions = current_app.config["SESSIONS"]
    people = participants_frame(sessions, service.study_name)
    responses = responses_frame(sessions, service.study_name)
    humans = people[~people["is_machine"]] if len(people) else people
    stages = humans["stage"].value_counts().to_dict() if len(humans) else {}
    # the main trials of the participants the analysis keeps: finished and checked, not excluded (a session under
    # way or left was never checked, and the analysis drops it as incomplete); catch trials have their own rule
    main = (responses[(responses["trial_type"] == "main") & ~responses["is_machine"]
                      & (responses["participant_stage"] == "complete") & responses["excluded"].eq(False)]
            if len(responses) else responses)
    per_condition = _table(main, ["condition"])
    per_unit = _table(main, ["model_id", "kind", "layer", "unit"])
    with sessions() as s:
        counts = service.balance_counts(s)
    excluded = humans[humans["excluded"].fillna(False).astype(bool)] if len(humans) else humans
    return render_template("admin.html", stages=stages, n_machine=int(people["is_machine"].sum()) if len(people) else 0,
                           n_declined=len(declines_frame(sessions, service.study_name)),
                           per_condition=per_condition, per_unit=per_unit, excluded=excluded,
                           slots={c: counts.conditions.get(c, 0) for c in service.conditions},
                           n_items=len(service.material.items), bank_hash=service.material.bank_hash,
                           database=_redacted(current_app.config["DATABASE"]), study=service.study_name)


def _table(df, keys):
    if not len(df):
        return []
    g = df.groupby(keys, sort=True).agg(responses=("correct", "size"), accuracy=("correct", "mean"),
                                        participants=("participant", "nunique")).reset_index()
    return g.to_dict("records")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


@bp.get("/export/<name>")
@admin_required
def export(name: str):
    sessions = current_app.config["SESSIONS"]
    study = current_app.extensions["survey"].study_name
    tables = {"responses": lambda: with_models(responses_frame(sessions, study), current_app.config["RUN_DIR"]),
              "participants": lambda: participants_frame(sessions, study),
              "events": lambda: events_frame(sessions, study),
              "declines": lambda: declines_frame(sessions, study)}
    stem, _, fmt = name.partition(".")
    if stem not in tables or fmt not in ("csv", "parquet"):
        raise SurveyError(404, f"unknown export {name!r}; choose from "
                               f"{sorted(f'{t}.{f}' for t in tables for f in ('csv', 'parquet'))}")
    df = tables[stem]()
    if fmt == "csv":
        return Response(safe_csv(df), mimetype="text/csv",
                        headers={"Content-Disposition": f"attachment; filename={name}"})
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return Response(buf.getvalue(), mimetype="application/vnd.apache.parquet",
                    headers={"Content-Disposition": f"attachment; filename={name}"})
