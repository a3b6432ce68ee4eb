"""``vgpuctl serve``: the HTTP API, live events, metrics and the dashboard (FastAPI on uvicorn)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from typing import TYPE_CHECKING

import click

from vgpuctl.base.errors import InvalidInput
from vgpuctl.cli.app import State, die, reports_errors, say

if TYPE_CHECKING:
    from vgpuctl.base.state import StateDir
    from vgpuctl.host import HostRoot


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or 'localhost'; any other name may resolve to anything, so it is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tls_cert: str | None, tls_key: str | None) -> None:
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("TLS needs both --tls-cert FILE and --tls-key FILE")
    if tls_cert is None and not is_loopback(host):
        raise InvalidInput("refusing to serve on {host} without TLS: the token and the session cookie would cross "
                           "the network in clear text. Give --tls-cert FILE --tls-key FILE, or keep the default "
                           "--host 127.0.0.1 and reach it through an SSH tunnel (ssh -L 8470:127.0.0.1:8470 HOST)",
                           what="host", host=host)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed (so the URL shown really answers)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        die(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --tls-cert and --tls-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8470, show_default=True, help="TCP port.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="TLS certificate (PEM, with its chain).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), metavar="FILE", help="Its private key (PEM).")
@click.option("--print-token", is_flag=True, help="Print the access token once on stdout (for scripts and demos).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header is NAME (a reverse proxy's or DNS name for this "
                   "machine); repeatable. Loopback addresses, localhost and --host always are; any other is "
                   "refused (421), which keeps DNS-rebinding pages out.")
@reports_errors
def serve(host: str, port: int, tls_cert: str | None, tls_key: str | None, print_token: bool,
          allow_hosts: tuple[str, ...]) -> None:
    """Serve the API (/api/v1, /openapi.json), live events, /metrics and the dashboard.

    Every request needs the token from <state-dir>/token (made at the first start, mode 0600) as
    'Authorization: Bearer <token>', or a browser session from the login page.
    """
    from vgpuctl.base.state import StateDir

    check_bind(host, tls_cert, tls_key)
    run_service(State.root, StateDir.from_env(State.state_dir), host, port, tls_cert, tls_key, print_token,
                allow_hosts)


def run_service(root: HostRoot, state: StateDir, host: str, port: int, tls_cert: str | None = None,
                tls_key: str | None = None, print_token: bool = False, allow_hosts: tuple[str, ...] = ()) -> None:
    """Bind, say where, and serve until SIGINT/SIGTERM (also what `vgpuctl demo --serve` runs)."""
    import uvicorn

    from vgpuctl.service.app import create_app
    from vgpuctl.service.auth import MAX_WS_MESSAGE, load_or_create_token, token_path

    token = load_or_create_token(state)
    app = create_app(root, state, token, listen_host=host, allow_hosts=allow_hosts)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"{'https' if tls_cert else 'http'}://{shown}:{port}/"
    say(f"vgpuctl serve: {url}  (API {url}api/v1, OpenAPI {url}openapi.json, metrics {url}metrics)")
    say(f"token: in {token_path(state)}; send 'Authorization: Bearer <token>', or log in at {url}login")
    if print_token:
        say(f"token {token}")
    sys.stdout.flush()

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's access log is off: it prints query strings. The service logs method, path and status itself,
    # and no log record of this process shows the token (vgpuctl.service.logs, installed by create_app).
    config = uvicorn.Config(app, ssl_certfile=tls_cert, ssl_keyfile=tls_key, access_log=False, server_header=False,
                            proxy_headers=False, log_level="info", timeout_graceful_shutdown=3,
                            ws_max_size=MAX_WS_MESSAGE)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after a graceful shutdown: a normal end
        uvicorn.Server(config).run(sockets=[sock])
