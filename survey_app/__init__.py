"""The survey: 2-AFC trials for people in a browser and for machine participants through a JSON API."""
from .app import create_app

__all__ = ["create_app"]
