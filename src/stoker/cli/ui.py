"""``stoker ui``: the web console in a browser, through a one-time login link on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import webbrowser
from pathlib import Path

import typer

from stoker.cli.common import client, handle_errors, out, read_token_file
from stoker.client import DEFAULT_SOCKET


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``stoker`` command."""
    app.command("ui")(ui)


@handle_errors
def ui(
    ctx: typer.Context,
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Loopback port (0: any free)."),
    open_browser: bool = typer.Option(
        False, "--open", help="Also open the link in this machine's browser."
    ),
) -> None:
    """Serve the web console on 127.0.0.1 and print a one-time login link.

    The link works once, within two minutes; the browser that opens it gets a session
    cookie and the port admits nothing else. Ctrl-C stops it.

    Example: stoker ui --port 8765
    """
    import httpx
    import uvicorn

    from stoker.cli.ui_proxy import LOGIN_PATH, LOGIN_TTL_S, Admission, create_proxy

    with client(ctx) as api:
        api.version()  # a clear error now if the agent is not there
    root = ctx.find_root().obj or {}
    url = root.get("url") or os.environ.get("STOKER_URL")
    token_file: Path | None = root.get("token_file")
    token = read_token_file(token_file) if token_file else os.environ.get("STOKER_TOKEN")
    timeout = httpx.Timeout(10.0, read=None)  # the event stream stays open
    if url:
        upstream = httpx.AsyncClient(base_url=url, timeout=timeout)
    else:
        path = Path(root.get("socket") or os.environ.get("STOKER_SOCKET") or DEFAULT_SOCKET)
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        upstream = httpx.AsyncClient(base_url="http://stoker", transport=transport, timeout=timeout)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # loopback only, never another interface
    sock.listen(64)
    bound = sock.getsockname()[1]
    admission = Admission()
    hosts = {f"127.0.0.1:{bound}", f"localhost:{bound}"}
    app = create_proxy(upstream, admission, hosts, token if url else None)
    link = f"http://127.0.0.1:{bound}{LOGIN_PATH}{admission.secret}"
    out.print(
        f"stoker console: {link}\n(one-time link, valid {LOGIN_TTL_S:.0f} s; Ctrl-C stops)",
        highlight=False,
        soft_wrap=True,
    )
    if open_browser:
        webbrowser.open(link)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
