"""The one way to reach data that is not on the local disk: URLs and ``pipe:`` commands.

Every input coder-index reads (shards, listed images, index copies) and every remote output
(``--save-embeddings s3://...``) goes through here:

* ``https://`` and ``http://``: the standard library's HTTP client, one streamed request per read
  (a ``Range`` request to go on after a failure), credentials from the URL's ``user:password@``
  (sent as basic authentication, never shown) or from ``~/.netrc``'s machinery of the caller's choice.
* ``s3://``, ``gs://``, ``az://`` and everything else fsspec knows: fsspec's filesystem for the scheme
  (the ``cloud`` extra brings s3fs and gcsfs). Credentials come from where those libraries look (the
  environment, ``~/.aws``, ``gcloud`` credentials) and fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``
  and the like); never from a command-line flag.
* ``pipe:COMMAND``: the command's standard output is the data, as webdataset reads it (``pipe:curl
  -s -L https://...``, ``pipe:aws s3 cp --quiet s3://bucket/x.tar -``).
* ``file://`` and plain paths: the local file.

**Faults.** A read that fails transiently (HTTP 5xx and 429, a reset connection, a body cut short, a
read stalled past the timeout) is retried with bounded, jittered exponential backoff, going on from
the byte where it stopped; when the retries are spent, ``RemoteError`` says so (the caller reports it
for that input). A failure that retrying cannot fix raises ``RemoteError`` with ``fatal=True`` at
once: for that input alone (404, 410, a missing object, a command that exits non-zero: ``missing``
or not) or, with ``everywhere=True``, for every input (401, 403, no credentials at all, a bucket that
does not exist, an unknown host): the caller stops the run with that one line.

**One retry layer.** The object-store libraries retry on their own (botocore up to 5 times, s3fs 5
more around it): the S3 filesystems made here have both turned off, so that a dead input costs at
most ``RetryPolicy.attempts`` requests, not their product. gcsfs's retries (6 per request) cannot be
turned off: for ``gs://`` they are the one layer, and ours makes one attempt.

**Secrets.** ``public_url`` is what rows, errors files, run records, logs and messages show: the URL
without ``user:password@`` and without signing parameters (``X-Amz-Signature``, ``sig=``, tokens).
Error messages from below are redacted the same way before they travel.
"""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from coder_index.core.errors import CoderIndexError
from coder_index.core.redaction import public_url, redact_text  # noqa: F401 - public_url re-exported

CLOUD_EXTRA = "pip install 'coder-index[cloud]'"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")



class RemoteError(CoderIndexError):
    """Data could not be read (or written) where it lives. ``fatal``: retrying cannot help (a refusal,
    a missing object); otherwise the retries were spent. The message names the input by its public URL."""

    def __init__(self, message: str, *, fatal: bool = False, missing: bool = False, everywhere: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal or everywhere
        self.missing = missing  # not found or gone
        self.everywhere = everywhere  # a refusal that holds for every input (credentials, a bucket, a host)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of transient failures: ``attempts`` tries in all, waits of ``backoff`` x 2^n
    seconds (at most ``max_wait``, with jitter), each read given ``timeout`` seconds of silence."""

    attempts: int = 6
    backoff: float = 0.5
    max_wait: float = 8.0
    timeout: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """``CODER_INDEX_REMOTE_RETRIES``, ``CODER_INDEX_REMOTE_BACKOFF``, ``CODER_INDEX_REMOTE_TIMEOUT``
        override the defaults (documented in the README)."""
        d = cls()
        return cls(attempts=max(1, int(os.environ.get("CODER_INDEX_REMOTE_RETRIES", d.attempts))),
                   backoff=float(os.environ.get("CODER_INDEX_REMOTE_BACKOFF", d.backoff)),
                   max_wait=float(os.environ.get("CODER_INDEX_REMOTE_MAX_WAIT", d.max_wait)),
                   timeout=float(os.environ.get("CODER_INDEX_REMOTE_TIMEOUT", d.timeout)))

    def wait(self, failures: int) -> None:
        time.sleep(min(self.max_wait, self.backoff * 2 ** (failures - 1)) * (0.5 + random.random() / 2))


# ---------------------------------------------------------------------------------------------- names
def scheme_of(spec: str) -> str | None:
    """``https``, ``s3``, ``pipe``, ... or None for a local path (a ``file://`` URL is ``file``)."""
    if spec.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(spec)
    return m.group(1).lower() if m else None


def is_remote(spec: str) -> bool:
    """A URL or a ``pipe:`` command (``file://`` URLs are local files)."""
    return scheme_of(str(spec)) not in (None, "file")


def is_url(spec: str) -> bool:
    """A URL that names data (not a ``pipe:`` command): what a file list or a labels CSV may hold. A
    command runs only when the user types it as a shard on the command line, never from a list."""
    return is_remote(spec) and not str(spec).startswith("pipe:")


def local_path(spec: str) -> str:
    """A plain path for a local spec (``file:///x`` -> ``/x``)."""
    return unquote(urlsplit(spec).path) if scheme_of(spec) == "file" else spec


def path_part(spec: str) -> str:
    """The path of a URL (no query), for file-name tests such as ``.tar``."""
    if spec.startswith("pipe:"):
        return spec
    return urlsplit(spec).path if scheme_of(spec) else spec


def redacted(message: str, *specs: str) -> str:
    """An error message from below with the inputs' secrets taken out (their public forms instead)."""
    for spec in specs:
        if spec and spec != public_url(spec):
            message = message.replace(spec, public_url(spec))
    return redact_text(message)


# ---------------------------------------------------------------------------------------------- reading
class ResumableReader(io.RawIOBase):
    """A file-like stream of one remote object or command, read front to back. A transient failure
    reopens it at the byte where it stopped (``opener(offset)``), within the retry policy. Raw: wrap
    it in ``io.BufferedReader`` (``open_stream`` does) for the many small reads of a tar reader."""

    def __init__(self, spec: str, opener: Callable[[int], tuple[IO[bytes], int | None]],
                 policy: RetryPolicy | None = None) -> None:
        super().__init__()
        self.spec, self.public = spec, public_url(spec)
        self._opener, self.policy = opener, policy or RetryPolicy.from_env()
        self.pos = 0
        self.retries = 0
        self._fh: IO[bytes] | None = None
        self._end: int | None = None  # the object's length when the server says it

    def _open(self) -> None:
        failures = 0
        while True:
            try:
                self._fh, length = self._opener(self.pos)
                if length is not None:
                    self._end = self.pos + length
                return
            except RemoteError:
                raise
            except Exception as exc:  # connection refused, a 5xx before the body, a DNS hiccup
                failures += 1
                self._transient(exc, failures)

    def _transient(self, exc: BaseException, failures: int) -> None:
        fatal = _fatal(exc)
        if fatal is not None:
            raise _refusal(self.public, fatal, exc) from None
        if failures >= self.policy.attempts:
            raise RemoteError(f"{self.public}: {_describe(exc, self.spec)}, still after {failures} tries "
                              f"(at byte {self.pos})") from None
        self.retries += 1
        self._close_handle()
        self.policy.wait(failures)

    def read(self, n: int = -1) -> bytes:
        failures = 0
        while True:
            if self._fh is None:
                self._open()
            try:
                # read1: what one receive brings (an HTTP body's read(n) would wait for all n bytes, and
                # lose what came before a stall)
                reader = getattr(self._fh, "read1", None) or self._fh.read
                data = reader(n) if n is not None and n >= 0 else self._fh.read()
                if not data and n != 0 and self._end is not None and self.pos < self._end:
                    raise _CutShort(f"the body ended at byte {self.pos} of {self._end}")
                self.pos += len(data)
                return data
            except RemoteError:
                raise
            except Exception as exc:
                failures += 1
                self._transient(exc, failures)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def _close_handle(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except Exception:
                pass

    def close(self) -> None:
        self._close_handle()
        super().close()


class _CutShort(OSError):
    """The connection closed before the object's declared length."""


STREAM_BUFFER = 1 << 20  # bytes read from below at a time: a tar reader asks for 10 KiB records


def open_stream(spec: str, policy: RetryPolicy | None = None) -> io.BufferedReader:
    """A resumable, buffered stream of ``spec`` (a URL, a ``pipe:`` command, or a local path)."""
    policy = policy or RetryPolicy.from_env()
    scheme = scheme_of(spec)
    if scheme in ("http", "https"):
        raw = ResumableReader(spec, lambda at: _http_open(spec, at, policy.timeout), policy)
    elif scheme == "pipe":
        raw = ResumableReader(spec, lambda at: _pipe_open(spec, at, policy.timeout), policy)
    elif scheme is None or scheme == "file":
        path = local_path(spec)
        raw = ResumableReader(spec, lambda at: _local_open(path, at), policy)
    else:
        fs, path = filesystem(spec)
        raw = ResumableReader(spec, lambda at: _fsspec_open(fs, path, at), _one_layer(scheme, policy))
    return io.BufferedReader(raw, buffer_size=STREAM_BUFFER)


def open_random_access(spec: str, policy: RetryPolicy | None = None, size: int | None = None) -> IO[bytes]:
    """A seekable, buffered file of ``spec`` (what a parquet reader needs: the footer, then column
    chunks): a local file, or a URL read by byte ranges, each with the retry policy (``size``: the
    object's, when known: no request is spent on it). A ``pipe:`` command gives a stream, which is
    refused here with the way out."""
    policy = policy or RetryPolicy.from_env()
    scheme = scheme_of(spec)
    if scheme is None or scheme == "file":
        from coder_index.core.untrusted import open_regular_file

        return open_regular_file(local_path(spec))  # a FIFO named like a file never blocks the read
    if scheme == "pipe":
        raise RemoteError(f"{public_url(spec)}: a pipe: command gives a stream, and a parquet file is read from its "
                          "end (its footer) first; copy it to a file, or name it by its URL", fatal=True)
    if scheme in ("http", "https"):
        reader = RangeReader(spec, lambda start, n: _http_range(spec, start, n, policy.timeout), policy, size,
                             lambda: _http_range(spec, 0, 1, policy.timeout)[1])
    else:
        fs, path = filesystem(spec)
        reader = RangeReader(spec, lambda start, n: (fs.cat_file(path, start=start, end=start + n), None),
                             _one_layer(scheme, policy), size, lambda: int(fs.size(path)))
    return io.BufferedReader(reader, buffer_size=STREAM_BUFFER)


class RangeReader(io.RawIOBase):
    """A remote object read by byte ranges (``read_range(start, n) -> (bytes, object size or None)``),
    seekable, each range retried within the policy. ``size``: the object's, if known; else asked for
    at once (``size_of``), so that a refusal comes now rather than at the first read."""

    def __init__(self, spec: str, read_range: Callable[[int, int], tuple[bytes, int | None]],
                 policy: RetryPolicy, size: int | None = None, size_of: Callable[[], int | None] | None = None
                 ) -> None:
        super().__init__()
        self.spec, self.public, self.policy = spec, public_url(spec), policy
        self._read_range = read_range
        self.pos = 0
        self.size: int | None = size
        if size is None and size_of is not None:
            self.size = self._retried(size_of, 0)

    def _range(self, start: int, n: int) -> bytes:
        data, size = self._retried(lambda: self._read_range(start, n), start)
        if size is not None:
            self.size = size
        return data

    def _retried(self, call: Callable[[], Any], start: int) -> Any:
        failures = 0
        while True:
            try:
                return call()
            except RemoteError:
                raise
            except Exception as exc:
                fatal = _fatal(exc)
                if fatal is not None:
                    raise _refusal(self.public, fatal, exc) from None
                failures += 1
                if failures >= self.policy.attempts:
                    raise RemoteError(f"{self.public}: {_describe(exc, self.spec)}, still after {failures} tries "
                                      f"(at byte {start})") from None
                self.policy.wait(failures)

    def readinto(self, buf: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        n = len(buf) if self.size is None else min(len(buf), self.size - self.pos)
        data = self._range(self.pos, n) if n > 0 else b""
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            if self.size is None:
                raise OSError(f"{self.public}: the server does not say the object's size")
            offset += self.size
        elif whence == io.SEEK_CUR:
            offset += self.pos
        self.pos = max(0, offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _http_range(url: str, start: int, n: int, timeout: float) -> tuple[bytes, int | None]:
    resp, _ = _http_open(url, start, timeout, end=start + n - 1)
    with resp:
        size = None
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit():
            size = int(total)
        elif resp.status == 200 and (resp.headers.get("Content-Length") or "").isdigit():
            size = int(resp.headers["Content-Length"])
        data = resp.read(n)
    if len(data) < n and (size is None or start + len(data) < size):
        raise _CutShort(f"a range of {n} bytes at {start} came back with {len(data)}")
    return data, size


def fetch_bytes(spec: str, max_bytes: int = 1 << 30, policy: RetryPolicy | None = None) -> bytes:
    """The whole of a (small) remote object, e.g. one listed image, with the same retries. Never a
    ``pipe:`` command: what is fetched whole is named by data (a file list, a CSV, a predictions row),
    and data never runs a command."""
    if str(spec).startswith("pipe:"):
        raise RemoteError("a pipe: command runs only when given as a shard on the command line, never when "
                          "named by a file list, a CSV or a predictions file", fatal=True)
    parts = []
    size = 0
    with open_stream(spec, policy) as r:
        while chunk := r.read(1 << 20):
            parts.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise RemoteError(f"{public_url(spec)} is larger than {max_bytes:,} bytes", fatal=True)
    return b"".join(parts)


def request_json(url: str, payload: Any = None, policy: RetryPolicy | None = None, *,
                 retry_500: bool = True) -> Any:
    """The JSON answer of a service (POST ``payload`` as JSON, or GET when None), with the retry policy:
    transient failures retried, a refusal raised at once, secrets of the URL never in a message.
    ``retry_500=False``: an HTTP 500 is an answer (a service that says every error so), not retried."""
    import base64
    import json
    import urllib.error
    import urllib.request

    policy = policy or RetryPolicy.from_env()
    parts = urlsplit(url)
    headers = {"User-Agent": "coder-index", "Accept": "application/json"}
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        headers["Authorization"] = "Basic " + base64.b64encode(unquote(userinfo).encode()).decode()
        url_sent = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    else:
        url_sent = url
    body = None
    if payload is not None:
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    failures = 0
    while True:
        try:
            req = urllib.request.Request(url_sent, data=body, headers=headers, method="POST" if body else "GET")
            with urllib.request.urlopen(req, timeout=policy.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 500 and not retry_500:
                raise RemoteError(f"{public_url(url)}: the service failed the request (HTTP 500)",
                                  fatal=True) from None
            failure: BaseException = exc
        except ValueError as exc:  # not JSON
            raise RemoteError(f"{public_url(url)}: the answer is not JSON ({exc})", fatal=True) from None
        except Exception as exc:  # noqa: BLE001 - a refused connection, a timeout: judged below
            failure = exc
        why = _fatal(failure)  # a refused connection is transient (a service restarting), within the policy
        if why is not None:
            raise _refusal(public_url(url), why, failure) from None
        failures += 1
        if failures >= policy.attempts:
            raise RemoteError(f"{public_url(url)}: {_describe(failure, url)}, still after {failures} tries") from None
        policy.wait(failures)


# ---------------------------------------------------------------------------------------------- schemes
def _local_open(path: str, at: int) -> tuple[IO[bytes], int | None]:
    from coder_index.core.untrusted import open_regular_file

    f = open_regular_file(path)
    f.seek(at)
    return f, None


def _http_open(url: str, at: int, timeout: float, end: int | None = None) -> tuple[IO[bytes], int | None]:
    import base64
    import urllib.request

    parts = urlsplit(url)
    headers = {"User-Agent": "coder-index", "Accept-Encoding": "identity"}
    if "@" in parts.netloc:  # user:password@host: basic authentication, the URL sent without it
        userinfo, host = parts.netloc.rsplit("@", 1)
        headers["Authorization"] = "Basic " + base64.b64encode(unquote(userinfo).encode()).decode()
        url = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if at or end is not None:
        headers["Range"] = f"bytes={at}-{'' if end is None else end}"
    resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    length = resp.headers.get("Content-Length")
    remaining = int(length) if length and length.isdigit() else None
    if at and resp.status != 206:  # the server ignores ranges: skip what was read before
        skipped = 0
        while skipped < at:
            chunk = resp.read(min(1 << 20, at - skipped))
            if not chunk:
                raise _CutShort(f"the body ended at byte {skipped}, before byte {at}")
            skipped += len(chunk)
        remaining = None if remaining is None else remaining - at
    return resp, remaining


class _PipeStream:
    """A command's standard output, with a stall timeout; a command that exits non-zero fails its input
    at once (it may have retried on its own; running it again is the next run's choice)."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        # shell=True on purpose: `pipe:` is webdataset's convention for a shell pipeline the user typed
        # (quotes, pipes, `aws s3 cp ... -`), run with the user's own rights. Only a shard spec from the
        # command line reaches here: file lists, CSVs and predictions rows refuse pipe: (discover.walk_listed,
        # rows.row_bytes, fetch_bytes), so a file someone else wrote never runs a command.
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        _widen_pipe(self.proc.stdout)

    def read(self, n: int = -1) -> bytes:
        import selectors

        out = self.proc.stdout
        assert out is not None
        # a selector, not select(): a process with more than 1,024 open files gets descriptors select() refuses
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            ready = sel.select(self.timeout)
        if not ready:
            raise TimeoutError(f"the command wrote nothing for {self.timeout:g} s")
        data = os.read(out.fileno(), n if n and n > 0 else 1 << 20)
        if not data:
            code = self.proc.wait()
            if code != 0:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode("utf-8", "replace").strip()
                raise _CommandFailed(f"the command exited with status {code}" + (f": {err[-300:]}" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


PIPE_BUFFER = 1 << 20


def _widen_pipe(pipe: Any) -> None:
    """A 1 MB pipe between the command and this process (Linux: F_SETPIPE_SZ) instead of 64 KB: each
    read brings up to 16 times more, and the two processes switch 16 times less (a shard through
    `pipe:cat` read twice as fast). Elsewhere, or when refused, the default buffer stays."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BUFFER)
    except (ImportError, OSError, ValueError, AttributeError):
        pass


class _CommandFailed(Exception):
    pass


def _pipe_open(spec: str, at: int, timeout: float) -> tuple[IO[bytes], int | None]:
    stream = _PipeStream(spec[len("pipe:"):], timeout)
    skipped = 0
    while skipped < at:  # a command cannot seek: run it again and skip what was read
        chunk = stream.read(min(1 << 20, at - skipped))
        if not chunk:
            stream.close()
            raise _CutShort(f"the command's output ended at byte {skipped}, before byte {at}")
        skipped += len(chunk)
    return stream, None  # type: ignore[return-value]


def check_reachable(specs: list[str]) -> None:
    """Fail at once, before any model loads, when a URL's scheme needs a package that is missing (one
    line naming the extra) or is unknown to fsspec."""
    for scheme in dict.fromkeys(scheme_of(s) for s in specs):
        if scheme in (None, "file", "http", "https", "pipe"):
            continue
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
        except ImportError as exc:
            raise RemoteError(f"{scheme}:// needs a package that is not installed ({exc}): {CLOUD_EXTRA}",
                              fatal=True) from None
        except ValueError:
            raise RemoteError(f"{scheme}:// is not a protocol coder-index can read (fsspec knows no such "
                              "filesystem)", fatal=True) from None


def filesystem(spec: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of a URL; a missing driver names the extra to install."""
    scheme = scheme_of(spec) or "file"
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(spec, **_one_retry_layer(scheme))
        if scheme in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own loop around botocore's: one attempt (ours retries)
    except ImportError as exc:
        raise RemoteError(f"{scheme}:// needs a package that is not installed ({exc}): {CLOUD_EXTRA}",
                          fatal=True) from None
    except ValueError as exc:
        raise RemoteError(f"{public_url(spec)}: {scheme}:// is not a protocol fsspec knows ({exc})",
                          fatal=True) from None
    return fs, path


# Libraries whose own retries cannot be turned off (gcsfs decorates its requests with 6 tries when the
# class is defined): theirs is the one layer, ours makes a single attempt on top.
_OWN_RETRIES = ("gs", "gcs")


def _one_layer(scheme: str | None, policy: RetryPolicy) -> RetryPolicy:
    from dataclasses import replace

    return replace(policy, attempts=1) if scheme in _OWN_RETRIES else policy


def _one_retry_layer(scheme: str) -> dict[str, Any]:
    """Storage options that turn the library's own retries off, merged into the user's fsspec
    configuration (theirs kept for everything else)."""
    if scheme not in ("s3", "s3a"):
        return {}
    import fsspec.config

    config = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
    config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    return {"config_kwargs": config}


def copy_folder(spec: str, dest: str) -> None:
    """Copy a remote folder (``s3://bucket/in1k``, ``gs://...``, ``file://...``) into the local ``dest``,
    with the same credentials and configuration as every other read (fsspec's)."""
    fs, path = filesystem(spec)
    try:
        if not fs.isdir(path):
            raise RemoteError(f"{public_url(spec)} is not a folder (an index is a folder)", fatal=True)
        fs.get(path.rstrip("/") + "/", dest.rstrip("/") + "/", recursive=True)
    except RemoteError:
        raise
    except Exception as exc:
        raise RemoteError(f"could not copy {public_url(spec)}: {redacted(str(exc), spec)}",
                          fatal=_fatal(exc) is not None) from None


def _fsspec_open(fs: Any, path: str, at: int) -> tuple[IO[bytes], int | None]:
    f = fs.open(path, "rb", block_size=8 << 20)
    if at:
        f.seek(at)
    return f, None


# ---------------------------------------------------------------------------------------------- errors
def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failure, from the exception or the ones it was raised from (s3fs raises
    an OSError from botocore's ClientError, which holds it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "code", None) or getattr(e, "status", None)
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code < 600:
            return code
        response = getattr(e, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            meta = response.get("ResponseMetadata", {})
            if isinstance(meta.get("HTTPStatusCode"), int):
                return meta["HTTPStatusCode"]
        e = e.__cause__ or e.__context__
    return None


_FATAL_STATUS = {400: "refused (HTTP 400)", 401: "not authorised (HTTP 401): check the credentials",
                 403: "forbidden (HTTP 403): check the credentials and the object's permissions",
                 404: "not found (HTTP 404)", 405: "refused (HTTP 405)", 410: "gone (HTTP 410)",
                 416: "refused the byte range (HTTP 416)"}


def _fatal(exc: BaseException) -> str | None:
    """Why retrying cannot help, or None for a transient failure."""
    everywhere = _everywhere(exc)
    if everywhere is not None:
        return everywhere
    status = _status(exc)
    if status in _FATAL_STATUS:
        return _FATAL_STATUS[status]
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "forbidden: check the credentials and the object's permissions"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, _CommandFailed):
        return str(exc)
    import urllib.error

    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = getattr(exc, "reason", None)
        if isinstance(reason, OSError) and "Name or service not known" in str(reason):
            return f"the host is unknown ({reason})"
    return None


_EVERYWHERE_CODES = {
    "NoSuchBucket": "the bucket does not exist: check its name (and the endpoint, FSSPEC_S3_ENDPOINT_URL)",
    "InvalidAccessKeyId": "the access key is not known to the store: check the credentials",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check the credentials",
    "ExpiredToken": "the credentials have expired: renew them",
    "InvalidToken": "the session token is not valid: renew the credentials",
    "AccessDenied": "forbidden (access denied): check the credentials and the object's permissions",
    "AllAccessDisabled": "all access to this object has been disabled",
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError")


def _everywhere(exc: BaseException) -> str | None:
    """Why no input of this store can be read (credentials, a bucket), from the exception or its causes."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__class__.__name__ in _NO_CREDENTIALS:
            return ("no credentials were found: set them where the store's library looks (for S3: "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance role; "
                    "for GCS: gcloud auth application-default login)")
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code in _EVERYWHERE_CODES:
                return _EVERYWHERE_CODES[code]
        e = e.__cause__ or e.__context__
    text = str(exc)
    if "NoSuchBucket" in text or "The specified bucket does not exist" in text:
        return _EVERYWHERE_CODES["NoSuchBucket"]
    return None


def _refusal(public: str, why: str, exc: BaseException) -> RemoteError:
    """The RemoteError of a failure that no retry fixes: for this input, or for every input."""
    status = _status(exc)
    missing = status in (404, 410) or (isinstance(exc, FileNotFoundError) and _everywhere(exc) is None)
    everywhere = status in (401, 403) or _everywhere(exc) is not None or why.startswith("the host is unknown")
    return RemoteError(f"{public}: {why}", fatal=True, missing=missing, everywhere=everywhere)


def _describe(exc: BaseException, spec: str) -> str:
    status = _status(exc)
    if status is not None:
        what = f"HTTP {status}"
    elif isinstance(exc, TimeoutError) or "timed out" in str(exc):
        what = "the read stalled past the timeout"
    elif isinstance(exc, _CutShort):
        what = f"the connection closed early ({exc})"
    elif isinstance(exc, ConnectionError):
        what = f"the connection failed ({exc.__class__.__name__})"
    else:
        what = f"{exc.__class__.__name__}: {exc}"
    return redacted(what, spec)
