"""WSGI entry for production servers, configured by environment variables, e.g.

    SPARSIGHT_RUN_DIR=runs/default gunicorn -w 4 -b 0.0.0.0:8000 survey_app.wsgi:app
"""
from .app import create_app

app = create_app()
