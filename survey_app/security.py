"""Who may do what: CSRF tokens for cookie-authenticated requests, session tokens for the API,
the admin password and the machine-participant API token."""
from __future__ import annotations

import datetime as dt
import hmac
import secrets
from functools import wraps

from flask import current_app, g, redirect, request, session, url_for

from .db import get_or_create_secret
from .service import SurveyError, token_hash

CSRF_FIELD, CSRF_HEADER = "csrf_token", "X-CSRF-Token"


def csrf_token() -> str:
    """This browser's CSRF token (created on first use, kept in the signed session cookie)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf(sent: str | None) -> None:
    expected = session.get("csrf")
    if not sent:
        raise SurveyError(400, "missing CSRF token; reload the page and try again")
    if not expected or not hmac.compare_digest(expected, sent):
        raise SurveyError(400, "this page has expired (its security token, CSRF, does not match this browser's "
                               "session); reload the page and try again")


def bearer_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth.startswith("Bearer ") else None


def authorize_session(public_id: str) -> None:
    """The request may act for session ``public_id``: a bearer token of that session, or this browser's
    session cookie (then state-changing requests also need the CSRF header)."""
    service = current_app.extensions["survey"]
    token = bearer_token()
    if token is None and session.get("pid"):
        if session["pid"] != public_id:
            raise SurveyError(403, "this browser belongs to another session")
        if request.method not in ("GET", "HEAD"):
            check_csrf(request.headers.get(CSRF_HEADER))
        token = session.get("tok")
    service.authenticate(public_id, token)


def check_api_token() -> None:
    """Creating machine sessions needs the study's API token."""
    token = bearer_token()
    if not token:
        raise SurveyError(401, "missing API token (Authorization: Bearer <token>; `sparsight serve` prints it)")
    configured = current_app.config.get("API_TOKEN")
    if configured:
        ok = hmac.compare_digest(configured, token)
    else:
        stored = current_app.config["SECRETS"].get("api_token_hash")
        ok = bool(stored) and hmac.compare_digest(stored, token_hash(token))
    if not ok:
        raise SurveyError(403, "wrong API token")


def check_admin_password(password: str) -> bool:
    configured = current_app.config.get("ADMIN_PASSWORD")
    if configured:
        return hmac.compare_digest(configured.encode(), password.encode())
    stored = current_app.config["SECRETS"].get("admin_password_hash")
    return bool(stored) and hmac.compare_digest(stored, token_hash(password))


def admin_configured() -> bool:
    return bool(current_app.config.get("ADMIN_PASSWORD") or current_app.config["SECRETS"].get("admin_password_hash"))


#: Failed admin logins from one address within LOGIN_WINDOW before further attempts get 429.
LOGIN_FAILURES = 5
LOGIN_WINDOW = dt.timedelta(minutes=15)
#: How long an admin sign-in lasts.
ADMIN_SESSION_LIFETIME = dt.timedelta(hours=12)


def login_throttled(client: str) -> int:
    """Seconds until ``client`` may try again (0: now); counted in the database, so every worker agrees."""
    from sqlalchemy import func, select

    from .models import LoginAttempt, utcnow
    since = utcnow() - LOGIN_WINDOW
    with current_app.config["SESSIONS"]() as s:
        failures, first = s.execute(select(func.count(LoginAttempt.id), func.min(LoginAttempt.created_at))
                                    .where(LoginAttempt.client == client, LoginAttempt.succeeded.is_(False),
                                           LoginAttempt.created_at >= since)).one()
    if failures < LOGIN_FAILURES:
        return 0
    return max(1, int((first + LOGIN_WINDOW - utcnow()).total_seconds()) + 1)


def record_login(client: str, succeeded: bool) -> None:
    from .models import LoginAttempt
    with current_app.config["SESSIONS"].begin() as s:
        s.add(LoginAttempt(client=client[:64], succeeded=succeeded))


def start_admin_session() -> None:
    """Sign this browser in: a random token in the signed cookie, its hash in the database."""
    from .models import AdminSession
    token = secrets.token_urlsafe(32)
    with current_app.config["SESSIONS"].begin() as s:
        s.add(AdminSession(token_hash=token_hash(token)))
    session["admin"] = token


def end_admin_session() -> None:
    """Revoke this browser's sign-in in the database (a copy of the cookie is refused from now on)."""
    from sqlalchemy import update

    from .models import AdminSession, utcnow
    token = session.pop("admin", None)
    if isinstance(token, str):
        with current_app.config["SESSIONS"].begin() as s:
            s.execute(update(AdminSession).where(AdminSession.token_hash == token_hash(token),
                                                 AdminSession.revoked_at.is_(None)).values(revoked_at=utcnow()))


def admin_signed_in() -> bool:
    from sqlalchemy import select

    from .models import AdminSession, utcnow
    token = session.get("admin")
    if not isinstance(token, str):
        return False
    with current_app.config["SESSIONS"]() as s:
        row = s.scalars(select(AdminSession).where(AdminSession.token_hash == token_hash(token))).first()
    return row is not None and row.revoked_at is None and utcnow() - row.created_at < ADMIN_SESSION_LIFETIME


def admin_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if not admin_signed_in():
            return redirect(url_for("admin.login", next=request.path))
        return view(*args, **kwargs)
    return wrapped


def load_secrets(sessions) -> dict:
    """The cookie key (created once per database, shared by every worker) and stored hashes."""
    from sqlalchemy import select

    from .models import Secret
    key = get_or_create_secret(sessions, "cookie_key", lambda: secrets.token_hex(32))
    with sessions() as s:
        stored = dict(s.execute(select(Secret.name, Secret.value)).all())
    return {"cookie_key": key, "api_token_hash": stored.get("api_token_hash"),
            "admin_password_hash": stored.get("admin_password_hash")}


def csp_nonce() -> str:
    """This response's script nonce (the only inline scripts the Content-Security-Policy allows)."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce


def security_headers(response):
    """Headers every response carries: a Content-Security-Policy without inline script (bar nonced
    blocks), no MIME sniffing, no framing, no referrer (the study link carries Prolific IDs)."""
    nonce = g.get("csp_nonce")
    script = f"'self' 'nonce-{nonce}'" if nonce else "'self'"
    response.headers.setdefault("Content-Security-Policy",
                                f"default-src 'self'; script-src {script}; style-src 'self'; img-src 'self' data:; "
                                f"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                f"frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    return response
