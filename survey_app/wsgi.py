"""WSGI entry for production servers, configured by environment variables, e.g.

    SPARSIGHT_RUN_DIR=runs/default gunicorn -w 4 -b 0.0.0.0:8000 survey_app.wsgi:app

Each worker prints to stderr what the study still lacks before real participants (as ``sparsight serve`` does).
"""
import sys

from .app import create_app
from .readiness import launch_notes

app = create_app()
for _note in launch_notes(app.config["SETTINGS"], app.extensions["survey"].material.refs_per_side,
                          app.extensions["survey"].material):
    print(f"before real participants: {_note}", file=sys.stderr)
