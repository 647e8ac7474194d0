"""Shared CLI plumbing: error reporting, JSON output, logging (the shared options are in ``options``)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from coder_index.core.choices import IMAGE_EXTENSIONS as IMAGE_SUFFIXES  # noqa: F401 - for messages
from coder_index.core.errors import CoderIndexError
from coder_index.core.redaction import redact_text

_LOCAL = ("--model local-dir:DIR (a downloaded open_clip repository: open_clip_config.json + "
          "open_clip_pytorch_model.bin)")
_FILE = "--pretrained /path/to/open_clip_pytorch_model.bin (the checkpoint, downloaded elsewhere)"
_RANDOM = "--pretrained random (untrained weights, for a trial of the pipeline)"
_INDEX = "--index IDX (use an existing index's model instead of downloading one)"
_INDEX_MODEL = ("--pretrained /path/to/the/index's/checkpoint (the same weights as a local file; the index checks "
                "they are the same)")
# The fixes that apply to each command when a model's weights cannot be downloaded.
HUB_HINTS = {
    "build": [_FILE, _LOCAL, _RANDOM],
    "generate": [_INDEX, _FILE, _LOCAL, _RANDOM],
    "corpus build": [_INDEX, _FILE, _LOCAL],
    "corpus search": [_FILE, _LOCAL],
    "classify": [_INDEX_MODEL], "explain": [_INDEX_MODEL], "eval": [_INDEX_MODEL], "verify": [_INDEX_MODEL],
    "fewshot fit": [_INDEX_MODEL], "reproduce": [_FILE, _LOCAL],
}


# The exit status of a run that read some inputs and could not read others (a missing file or shard, a
# 404, a command that failed, retries spent): the rest is done, a rerun retries those. Documented in the
# classify guide.
EXIT_INCOMPLETE = 3

# Commands whose rerun picks up where an interrupted run stopped (outputs resumed, caches kept).
RESUMABLE = {"build", "classify", "generate", "eval", "corpus build", "fewshot fit", "reproduce"}


def _command_name() -> str:
    ctx = click.get_current_context(silent=True)
    names = []
    while ctx is not None and ctx.parent is not None:  # the command's names below the root group
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def _hub_hints() -> list[str] | None:
    return HUB_HINTS.get(_command_name())


def friendly_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing errors into one clear line and exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from coder_index.core.atomic import disk_full, disk_full_message

        try:
            return fn(*args, **kwargs)
        except (CoderIndexError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
            hints = _hub_hints()
            if hints and hasattr(exc, "with_hints"):  # the model hub cannot be reached: this command's fixes
                exc = exc.with_hints(hints)
            raise click.ClickException(redact_text(str(exc))) from exc
        except KeyboardInterrupt:
            resumable = _command_name() in RESUMABLE
            click.echo("\ninterrupted" + ("; rerun the same command to resume" if resumable else ""), err=True)
            sys.exit(130)
        except Exception as exc:
            # A full disk or a refused write anywhere (SQLite caches included) is the user's to fix,
            # not a traceback; anything else is a bug and keeps its traceback.
            if disk_full(exc, getattr(exc, "filename", None)):
                raise click.ClickException(disk_full_message(getattr(exc, "filename", None) or "the output")) from exc
            if isinstance(exc, OSError):
                raise click.ClickException(redact_text(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))) \
                    from exc
            raise

    return wrapper


def resolve_gap_threshold(value: float | str | None, index: Any) -> float | None:
    """'preset' -> the released threshold of the index's dataset (ImageNet 0.1, DTD 0.6, ...)."""
    from coder_index.core.presets import resolve_gap_threshold as resolve

    return resolve(value, index.recipe)


@contextlib.contextmanager
def torch_threads_if(n: int | None):  # noqa: ANN201 - a context manager
    """--threads for commands whose encoding is not one pipeline call."""
    if n is None:
        yield
        return
    from coder_index.core.parallelism import torch_threads

    with torch_threads(n):
        yield


def print_json(obj: Any) -> None:
    """JSON on stdout; a name that is not UTF-8 as its ``\\udcXX`` escapes (read back by json.loads)."""
    from coder_index.pipeline.output import escape_surrogates

    click.echo(escape_surrogates(json.dumps(obj, indent=2, ensure_ascii=False)))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # credentials in URLs never reach a log
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True
