"""Options shared by the commands that read a study configuration."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from .config import (DEVICE_PATTERN, PROFILES, ConfigError, load_study, parse_override, pattern_text, settings_tree,
                     study_from_run_dir)

#: A study directory given on the command line: made absolute where it enters.
RUN_DIR_ARGUMENT = click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path,
                                                             resolve_path=True))
#: The same, optional: commands that can also build the study from --study/--profile/--set.
OPTIONAL_RUN_DIR = click.argument("run_dir", required=False,
                                  type=click.Path(file_okay=False, exists=True, path_type=Path, resolve_path=True))


def usage_error(err: BaseException) -> click.UsageError:
    """The one-line command-line error for ``err`` (an error from a DataLoader worker as the worker raised it)."""
    from .errors import user_error_message
    return click.UsageError(user_error_message(err) or " ".join(str(err).split()))


def profile_choice() -> click.Choice:
    """Every profile that exists (the registry in ``sparsight.config.PROFILES``)."""
    return click.Choice(list(PROFILES))


def _check_device(ctx, param, value):
    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise click.BadParameter(f"{value!r} is not a device; expected {pattern_text(DEVICE_PATTERN)}")
    return value


def device_option(default: str | None, help_text: str = ""):
    """``--device``, checked where it enters against the devices a study may name."""
    return click.option("--device", default=default, show_default=default is not None, callback=_check_device,
                        help=help_text or pattern_text(DEVICE_PATTERN))


def study_options(fn):
    """--study FILE, --profile, --set section.key=value (repeatable), --device."""
    @click.option("--study", "study_file", type=click.Path(dir_okay=False, path_type=Path, resolve_path=True),
                  default=None, help="study TOML file (default: the built-in embedded study)")
    @click.option("--profile", type=profile_choice(), default=None,
                  help="size profile (default: the study file's, else 'default')")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="override one setting, e.g. --set train.epochs=3 (repeatable)")
    @device_option(None, f"{pattern_text(DEVICE_PATTERN)} (overrides study.device)")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def resolve_from_cli(study_file, profile, overrides, device, flags: dict | None = None):
    """Load the study or turn a ConfigError into a clean usage error.

    ``flags`` are a command's own options as dotted settings (``{"train.epochs": 3}``, ``None`` for
    not given); they apply after --set, as does --device.
    """
    try:
        return load_study(study_file, profile, overrides, _flag_settings(flags, device))
    except ConfigError as err:
        raise usage_error(err) from None


def resolve_study(run_dir, study_file, profile, overrides, device, flags: dict | None = None):
    """The study of an existing RUN_DIR (its study.toml with --set, ``flags`` and --device), else as
    :func:`resolve_from_cli` builds it from --study/--profile/--set."""
    if run_dir is None:
        return resolve_from_cli(study_file, profile, overrides, device, flags)
    if study_file is not None or profile is not None:
        raise click.UsageError("give either RUN_DIR (its study.toml is used) or --study/--profile, not both")
    try:
        return study_from_run_dir(run_dir, overrides, _flag_settings(flags, device))
    except ConfigError as err:
        raise usage_error(err) from None


def _flag_settings(flags: dict | None, device: str | None) -> dict:
    return settings_tree({**(flags or {}), "study.device": device or None})


def section_overrides(overrides, section: str) -> dict:
    """``--set SECTION.KEY=VALUE`` options of one section as ``{key: value}``; other sections are refused."""
    tree: dict = {}
    for text in overrides:
        try:
            parsed = parse_override(text)
        except ConfigError as err:
            raise usage_error(err) from None
        if set(parsed) != {section}:
            raise click.UsageError(f"--set {text!r}: only {section}.KEY=VALUE settings can be changed here")
        tree.update(parsed[section])
    return tree
