"""Shared CLI plumbing: error reporting, model options, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from coder_index.errors import CoderIndexError


def friendly_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing errors into one clear line and exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from coder_index.index.atomic import disk_full, disk_full_message

        try:
            return fn(*args, **kwargs)
        except (CoderIndexError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as exc:
            # A full disk or a refused write anywhere (SQLite caches included) is the user's to fix,
            # not a traceback; anything else is a bug and keeps its traceback.
            if disk_full(exc, getattr(exc, "filename", None)):
                raise click.ClickException(disk_full_message(getattr(exc, "filename", None) or "the output")) from exc
            if isinstance(exc, OSError):
                raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc
            raise

    return wrapper


def model_options(fn: Callable) -> Callable:
    fn = click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")(fn)
    fn = click.option("--pretrained", default=None, metavar="TAG|FILE",
                      help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k) or a local checkpoint "
                           "file. 'random' builds an untrained model (benchmarks only).")(fn)
    return fn


class GapThreshold(click.ParamType):
    """A number in [0, 1], or 'preset' for the released code's per-dataset threshold."""

    name = "G|preset"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "preset":
            return "preset"
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number in [0, 1] nor 'preset'", param, ctx)
        if not 0 <= v <= 1:
            self.fail(f"{v} is not in [0, 1]", param, ctx)
        return v


GAP_THRESHOLD = GapThreshold()


def resolve_gap_threshold(value: float | str | None, index: Any) -> float | None:
    """'preset' -> the released threshold of the index's dataset (ImageNet 0.1, DTD 0.6, ...)."""
    if value != "preset":
        return value
    from coder_index.presets import gap_threshold_preset

    recipe = index.recipe
    return gap_threshold_preset(recipe.released or recipe.dataset)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
