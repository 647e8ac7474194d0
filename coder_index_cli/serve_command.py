"""`coder-index serve`: the HTTP API and web page (the `serve` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import friendly_errors
from .options import METHOD, MODEL, options


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on. Anything but loopback can be reached from other machines: the server "
                       "then requires a token (--token, else one made at start and printed once as the URL to "
                       "open).")
    @click.option("--token", default=None, envvar="CODER_INDEX_SERVE_TOKEN", metavar="TOKEN",
                  help="Every request must carry this token (Authorization: Bearer TOKEN, or the cookie the page "
                       "gets from the URL ?token=TOKEN) [env CODER_INDEX_SERVE_TOKEN; default: made at start when "
                       "--host is not loopback, none on loopback].")
    @click.option("--no-token", "no_token", is_flag=True,
                  help="Serve a non-loopback --host without a token: anyone who can reach it can use it (said at "
                       "start). For a network you trust entirely.")
    @click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
                  help="Port (0: any free one, printed at start).")
    @click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Classes per row.")
    @options(*METHOD)
    @click.option("--predictions", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="A classify output (.csv or .jsonl) to browse on the page; read again as it grows.")
    @click.option("--images-root", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Serve --predictions' images from this folder (its paths relative to it, nothing outside it) "
                       "instead of what the run record says classify read: for a file an older classify wrote, or "
                       "images moved since.")
    @click.option("--report", "report_dir", default=None,
                  type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="An `eval --out` folder: its per-class accuracy, confusions and t-SNE figure on the page.")
    @click.option("--max-upload-mb", default=25.0, show_default=True, type=click.FloatRange(0.001),
                  help="Largest uploaded image, in MB.")
    @click.option("--max-files", default=32, show_default=True, type=click.IntRange(1),
                  help="Most images per request.")
    @click.option("--max-megapixels", default=40.0, show_default=True, type=click.FloatRange(0.001),
                  help="Largest image, in millions of pixels (read from its header, before decoding).")
    @click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1),
                  help="Seconds a client has to send a request's line and headers; a slower one is disconnected.")
    @click.option("--body-timeout", default=120.0, show_default=True, type=click.FloatRange(0.1),
                  help="Seconds a client has to send a request's whole body (the uploads).")
    @click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1),
                  help="Open connections at most; one more is closed at once.")
    @options(*MODEL)
    @friendly_errors
    def serve(index_dir: Path, host: str, port: int, top_k: int, zs_method: str, rerank: bool,
              gap_threshold: float | str | None, adapter_dir: Path | None, corpus_dir: Path | None, retrieve_k: int,
              xmore_normalizer: str | None, xmore_retrieval: str | None, predictions: Path | None,
              images_root: Path | None,
              report_dir: Path | None, max_upload_mb: float,
              max_files: int, max_megapixels: float, header_timeout: float, body_timeout: float,
              max_connections: int, token: str | None, no_token: bool, model: str | None,
              pretrained: str | None, device: str | None) -> None:
        """Serve INDEX_DIR over HTTP: a JSON API and a web page to see why an image gets its class.

        The page (http://HOST:PORT/) classifies a dropped image and shows the class bars, the nearest
        texts, the best texts of the prediction and of the runner-up, and the CODER* pair scores; with
        --predictions it browses a classify output as thumbnails (filter by class and confidence, sort
        by low confidence for review, click to explain); with --report it shows an eval report.
        The API is described at /openapi.json (and on the page's API tab): POST /api/classify and
        /api/explain (multipart field 'files', repeatable), GET /api/texts?q=..., /api/info,
        /api/predictions. Needs the serve extra:
        pip install 'coder-index[serve]'.

        Bound to anything but loopback (--host 0.0.0.0), every request must carry a token: --token,
        CODER_INDEX_SERVE_TOKEN, or one made at start and printed once, as the URL to open (it sets an
        HttpOnly cookie and is taken out of the address bar). API clients send Authorization: Bearer
        TOKEN. The token is not TLS: across a network you do not trust, put a TLS proxy in front, or
        reach a loopback server through an SSH tunnel (ssh -L 8000:127.0.0.1:8000 gpu-box).

        \b
        Examples:
          coder-index serve pets-index
          coder-index serve pets-index --predictions preds.csv
          coder-index serve in1k --predictions laion.csv          # shard rows too, in place or by URL
          coder-index serve in1k --rerank --report eval-out/ --port 8080
          coder-index serve pets-index --corpus my-corpus --method coder+xmore
          curl -F files=@cat.jpg http://127.0.0.1:8000/api/classify
          coder-index serve pets-index --header-timeout 5 --body-timeout 60 --max-connections 64
          coder-index serve in1k --predictions preds.csv --host 0.0.0.0     # prints http://HOST:8000/?token=...
          curl -H "Authorization: Bearer $CODER_INDEX_SERVE_TOKEN" http://gpu-box:8000/api/info
        """
        try:
            import uvicorn

            from coder_index.serve import ServeConfig, create_app
            from coder_index.serve.background import server_config
            from coder_index.serve.guard import is_loopback
        except ImportError as exc:
            raise click.ClickException(f"serve needs its extra ({exc.name} is missing): pip install "
                                       "'coder-index[serve]'") from None
        from coder_index.serve.auth import new_token, token_required

        if token is not None and no_token:
            raise click.UsageError("--token and --no-token: give one")
        if token is not None and not token.strip():
            raise click.UsageError("--token is empty: give a token, or leave it out to have one made")
        made = token is None and not no_token and token_required(host)
        if made:
            token = new_token()
        config = ServeConfig(index=index_dir, device=device, model=model, pretrained=pretrained, top_k=top_k,
                             token=token,
                             method=zs_method, rerank=rerank, gap_threshold=gap_threshold,
                             adapter=adapter_dir, corpus=corpus_dir, retrieve_k=retrieve_k,
                             xmore_normalizer=xmore_normalizer, xmore_retrieval=xmore_retrieval,
                             predictions=predictions,
                             images_root=images_root, report=report_dir,
                             max_file_bytes=int(max_upload_mb * 1024 * 1024), max_files=max_files,
                             max_pixels=int(max_megapixels * 1_000_000), header_timeout=header_timeout,
                             body_timeout=body_timeout, max_connections=max_connections)
        try:
            config.check()
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        sock = _bind(host, port)  # before the model loads: a taken port fails at once
        if not is_loopback(host) and token is None:
            click.secho(f"WARNING: listening on {host}, not loopback, with --no-token: every machine that can reach "
                        "this one can use this API, upload images and read the index's texts and the listed images. "
                        "Leave out --no-token to require a token.", err=True, fg="red", bold=True)
        app = create_app(config, bound_host=host, note=lambda m: click.echo(m, err=True))
        from coder_index.serve.background import url_of

        url = url_of(host, sock)
        click.echo(f"serving {index_dir} at {url}/ (API: /openapi.json); Ctrl-C stops", err=True)
        if made:  # the one place the token is written: this line, once
            import socket

            # a wildcard address cannot be opened: this machine's name can (from elsewhere too)
            reachable = url_of(socket.gethostname(), sock) if host in ("0.0.0.0", "::", "[::]") else url
            click.echo(f"open {reachable}/?token={token} (the token is required: the server can be reached from "
                       "other machines; API clients send Authorization: Bearer TOKEN)", err=True)
        elif token is not None:
            click.echo("every request must carry the token given (Authorization: Bearer TOKEN, or open the page "
                       "with ?token=TOKEN once)", err=True)
        server = uvicorn.Server(server_config(app, config))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: not an error, nothing to resume
            pass
        click.echo("server stopped", err=True)



def _bind(host: str, port: int):  # noqa: ANN202 - socket.socket
    from coder_index.serve.background import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                                   "(or --port 0 for any free one)") from None
