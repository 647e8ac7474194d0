"""The ASGI app: JSON API under /api (OpenAPI at /docs and /openapi.json) and the page at /.

Everything heavy runs off the event loop: uploads are decoded in the thread pool, the model's work
in the one model thread (``worker.ModelWorker``), so the server keeps answering while it computes.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from coder_index.core.decode import ImageDecodeError, ImageTooLarge, declared_pixels, decode_thumbnail, load_image_from
from coder_index.core.errors import InputFormatError
from coder_index.core.file_identity import identify_open
from coder_index.core.untrusted import NotARegularFile, read_bytes
from coder_index.serve.auth import TokenCheck
from coder_index.serve.budget import PixelBudget
from coder_index.serve.config import ServeConfig
from coder_index.serve.guard import HostCheck, OriginCheck, SecurityHeaders, is_loopback
from coder_index.serve.predictions import NotListed, OutsideRoot, PredictionsFile, display_text
from coder_index.serve.service import ModelService, redact
from coder_index.serve.uploads import Upload, UploadRejected, check_count, preprocess_uploads

log = logging.getLogger(__name__)
STATIC = resources.files("coder_index.serve") / "static"
THUMB_SIZES = (128, 256, 512, 1024)
# Module level: FastAPI resolves the (string) annotations of the routes in this module's namespace.
Files = Annotated[list[UploadFile], File(description="One or more images (repeat the field).")]
K = Annotated[int, Query(ge=1, le=200, description="Nearest texts per image.")]
PathArg = Annotated[str | None, Query(description="the image's path as the predictions file lists it")]
RowArg = Annotated[int | None, Query(ge=0, description="or its row in the file (as /api/predictions gives it)")]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies past ``limit`` bytes: by Content-Length at once, else while they stream
    in (the multipart parser spools uploads to disk; this bounds what it is given)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen, exceeded, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise BodyTooLarge()
            return message

        async def guarded(message: dict) -> None:
            nonlocal started
            if exceeded:  # the app's own answer to a body cut short (e.g. FastAPI's 400) is replaced
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:  # BodyTooLarge, or what a layer of the app made of it
                raise
        if exceeded and not started:
            await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body larger than {limit:,} bytes; send fewer or smaller images"},
                        status_code=413)


def create_app(config: ServeConfig, *, bound_host: str = "127.0.0.1", note: Any = None) -> FastAPI:
    """The app over ``config``; the index, model and scorer load here, before any request."""
    config.check()
    service = ModelService(config, note=note)
    preds = None if config.predictions is None else PredictionsFile(config.predictions, config.images_root)
    if preds is not None and note is not None and (why := preds.servable()):
        note(f"warning: {why}")  # once, at start
    # decoded pixels in flight across every request: one image at the pixel limit, or several smaller
    budget = PixelBudget(config.max_pixels)
    thumbnails = _ThumbnailCache()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        service.close()

    # /docs and /redoc would load Swagger/ReDoc from a CDN: the page works offline, so they are off;
    # the schema is at /openapi.json and the page's API tab lists it.
    app = FastAPI(title="coder-index", lifespan=lifespan, docs_url=None, redoc_url=None,
                  summary="CODER predictions and their explanations",
                  description="Classify uploaded images with the served index, explain predictions with the texts "
                              "nearest to them, search texts, and browse a predictions file.")
    app.state.service = service
    app.state.config = config

    @app.exception_handler(UploadRejected)
    async def _rejected(_r: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "errors": exc.errors}, status_code=exc.status)

    @app.exception_handler(InputFormatError)
    async def _bad_file(_r: Request, exc: InputFormatError) -> JSONResponse:  # e.g. the predictions file replaced
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def images_of(files: list[UploadFile]) -> tuple[Any, list[str]]:
        check_count(len(files), config.max_files)
        uploads = []
        for i, f in enumerate(files):
            data = await f.read(config.max_file_bytes + 1)
            name = display_text(os.path.basename(f.filename or f"upload-{i}"))
            if len(data) > config.max_file_bytes:
                raise UploadRejected(413, f"{name!r} is larger than {config.max_file_bytes:,} bytes; send a smaller "
                                          "image", [{"file": name, "index": i, "reason": "too many bytes"}])
            uploads.append(Upload(name, data))
        pixels = await run_in_threadpool(preprocess_uploads, uploads, service.preprocess, config.max_pixels, budget)
        return pixels, [u.name for u in uploads]

    # -------------------------------------------------------------- the page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # -------------------------------------------------------------- API
    @app.get("/api/info", summary="The index (as `coder-index info --json`) and this server's settings")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.post("/api/classify", summary="Classify uploaded images: the rows `coder-index classify` writes (.jsonl)")
    async def classify(files: Files) -> list[dict[str, Any]]:
        pixels, names = await images_of(files)
        return await _wait(service.classify(pixels, names))

    @app.post("/api/explain", summary="Explain uploaded images: as `coder-index explain --json`")
    async def explain(files: Files, k: K = config.explain_k) -> list[dict[str, Any]]:
        pixels, names = await images_of(files)
        return await _wait(service.explain(pixels, names, k))

    @app.get("/api/texts", summary="The index's texts nearest to a text query: as `coder-index texts --json`")
    async def texts(q: Annotated[str, Query(min_length=1, max_length=1000)], k: K = 10) -> list[dict[str, Any]]:
        return await _wait(service.texts(q, k))

    def need_predictions() -> PredictionsFile:
        if preds is None:
            raise HTTPException(404, "no predictions file is served: start with --predictions FILE")
        return preds

    @app.get("/api/predictions/summary", summary="Rows, labels with their counts, methods of the predictions file")
    async def predictions_summary() -> dict[str, Any]:
        return await run_in_threadpool(need_predictions().summary)

    @app.get("/api/predictions", summary="A page of the predictions file, filtered and sorted")
    async def predictions(label: str | None = None, min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
                          max_score: Annotated[float | None, Query(ge=0, le=1)] = None, method: str | None = None,
                          changed: Annotated[bool | None, Query(description="changed by the rerank")] = None,
                          q: Annotated[str | None, Query(description="part of the path")] = None,
                          sort: Annotated[str, Query(pattern="^(file|score|-score)$",
                                                     description="file order, score (lowest first) or -score")]
                          = "file",
                          offset: Annotated[int, Query(ge=0)] = 0,
                          limit: Annotated[int, Query(ge=1, le=500)] = 60) -> dict[str, Any]:
        p = need_predictions()
        page = await run_in_threadpool(p.page, label=label, min_score=min_score, max_score=max_score, method=method,
                                       changed=changed, path_contains=q, sort=sort, offset=offset, limit=limit)
        return {"total": page.total, "offset": offset, "limit": limit, "rows": page.rows}

    def open_listed(path: str | None, row: int | None) -> tuple[Any, str]:
        if (path is None) == (row is None):
            raise HTTPException(422, "name the image by path=... or by row=... (one of them)")
        try:
            return need_predictions().open_image(path, row)
        except NotListed:
            raise HTTPException(404, "not an image of the predictions file") from None
        except OutsideRoot:
            raise HTTPException(403, "this image lies outside --images-root; it is not served") from None
        except (NotARegularFile, IsADirectoryError):
            raise HTTPException(422, "cannot read this image: not a regular file") from None
        except OSError as exc:  # the reason, not the server's path
            raise HTTPException(422, f"cannot read this image: {exc.strerror or type(exc).__name__}") from None

    def decoded(work: Any, fh: Any) -> Any:
        """Decode an opened listed image within the pixel budget; a refusal is a 4xx naming why."""
        try:
            with fh, budget.hold(declared_pixels(fh)):
                return work(fh)
        except ImageTooLarge as exc:
            raise HTTPException(413, f"cannot read this image: {exc}") from None
        except ImageDecodeError as exc:
            raise HTTPException(422, f"cannot read this image: {exc}") from None
        except OSError as exc:
            raise HTTPException(422, f"cannot read this image: {exc.strerror or type(exc).__name__}") from None

    @app.get("/api/predictions/image", summary="A JPEG thumbnail of an image listed in the predictions file",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def image(path: PathArg = None, row: RowArg = None,
                    size: Annotated[int, Query(description="longest side: 128, 256, 512 or 1024")] = 256) -> Response:
        if size not in THUMB_SIZES:
            raise HTTPException(422, f"size must be one of {THUMB_SIZES}")
        fh, _ = await run_in_threadpool(open_listed, path, row)
        if hasattr(fh, "getbuffer"):  # a shard's sample (bytes in memory): keyed by the row and its bytes
            import hashlib

            key = (("sample", path or str(row), hashlib.sha1(fh.getbuffer()).hexdigest()), size)
        else:
            ident = identify_open(fh.fileno())  # None for a file changed just now: never cached
            key = (ident.as_tuple(), size) if ident is not None else None
        data = thumbnails.get(key) if key is not None else None
        if data is None:
            data = await run_in_threadpool(decoded, lambda f: _jpeg(decode_thumbnail(f, size, config.max_pixels)), fh)
            if key is not None:
                thumbnails.put(key, data)
        else:
            fh.close()
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/predictions/explain", summary="Explain an image listed in the predictions file")
    async def explain_listed(path: PathArg = None, row: RowArg = None, k: K = config.explain_k) -> list[dict[str, Any]]:
        fh, listed = await run_in_threadpool(open_listed, path, row)
        pixels = await run_in_threadpool(
            decoded, lambda f: service.preprocess(load_image_from(f, config.max_pixels)).unsqueeze(0), fh)
        # the row's own run: its method, settings and normalisers (the record of the predictions file)
        return await _wait(service.explain(pixels, [display_text(listed)], k, record=need_predictions().record))

    @app.get("/api/report", summary="The evaluation report given with --report (report.json of `eval --out`)")
    async def report() -> dict[str, Any]:
        if config.report is None:
            raise HTTPException(404, "no evaluation report is served: start with --report EVAL_OUT_DIR")
        import json

        data = json.loads(read_bytes(Path(config.report) / "report.json", "report", max_bytes=64 << 20))
        data = _finite(redact(data))
        data["has_tsne"] = (Path(config.report) / "tsne.png").is_file()
        data.pop("tsne", None)  # a server-side path; the picture is at /api/report/tsne.png
        return data

    @app.get("/api/report/tsne.png", summary="The report's t-SNE figure", response_class=FileResponse)
    async def tsne() -> FileResponse:
        p = None if config.report is None else Path(config.report) / "tsne.png"
        if p is None or not p.is_file():
            raise HTTPException(404, "the served report has no t-SNE figure")
        return FileResponse(p, media_type="image/png")

    # outermost last: every response, these layers' refusals included, gets the security headers; the token
    # is checked before anything else reads the request (the same 401 for every path, routed or not)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    app.add_middleware(OriginCheck)
    if config.token:
        app.add_middleware(TokenCheck, token=config.token)
    app.add_middleware(HostCheck, loopback_only=is_loopback(bound_host))
    app.add_middleware(SecurityHeaders)
    return app


async def _wait(future: Future) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except ImageDecodeError as exc:
        raise HTTPException(422, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _finite(obj: Any) -> Any:
    """NaN and infinities (a top-5 of fewer than 5 classes is NaN) as null: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


class _ThumbnailCache:
    """The last 512 thumbnails, per file version (``core.file_identity``) and thumbnail size."""

    def __init__(self, entries: int = 512) -> None:
        self.entries = entries
        self._data: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._data[key] = data
            while len(self._data) > self.entries:
                self._data.popitem(last=False)
