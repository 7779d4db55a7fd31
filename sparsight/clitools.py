"""Options shared by the commands that read a study configuration."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from .config import ConfigError, load_study, parse_override


def study_options(fn):
    """--study FILE, --profile, --set section.key=value (repeatable), --device."""
    @click.option("--study", "study_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="study TOML file (default: the built-in embedded study)")
    @click.option("--profile", type=click.Choice(["quick", "default"]), default=None,
                  help="size profile (default: the study file's, else 'default')")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="override one setting, e.g. --set train.epochs=3 (repeatable)")
    @click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (overrides study.device)")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def resolve_from_cli(study_file, profile, overrides, device):
    """Load the study or turn a ConfigError into a clean usage error."""
    extra = tuple(overrides) + ((f'study.device="{device}"',) if device else ())
    try:
        return load_study(study_file, profile, extra)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


def section_overrides(overrides, section: str) -> dict:
    """``--set SECTION.KEY=VALUE`` options of one section as ``{key: value}``; other sections are refused."""
    tree: dict = {}
    for text in overrides:
        try:
            parsed = parse_override(text)
        except ConfigError as err:
            raise click.UsageError(str(err)) from None
        if set(parsed) != {section}:
            raise click.UsageError(f"--set {text!r}: only {section}.KEY=VALUE settings can be changed here")
        tree.update(parsed[section])
    return tree
