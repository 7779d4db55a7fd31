"""Helpers shared by the survey-app tests (requests as a browser or a machine participant)."""
from __future__ import annotations

import re

API_TOKEN = "test-api-token-0123456789"
ADMIN_PASSWORD = "admin-pw-for-tests"


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def machine_session(client, **body) -> tuple[str, str]:
    r = client.post("/api/sessions", json={"observer": "test-observer", **body}, headers=auth(API_TOKEN))
    assert r.status_code == 201, r.json
    return r.json["session"], r.json["token"]


def human_session(client, **prolific) -> str:
    """Consent and instructions through the pages; returns the session id (the browser cookie holds the token)."""
    html = client.get("/", query_string=prolific).text
    token = csrf_from(html)
    r = client.post("/consent", data={"csrf_token": token, "consent": "yes", "window": "1280x900", **prolific})
    assert r.status_code == 302, r.text
    client.get("/instructions")
    r = client.post("/instructions", data={"csrf_token": token})
    assert r.status_code == 302
    with client.session_transaction() as s:
        return s["pid"]
