"""A stock web server (Debian's nginx, installed by ``scripts/bootstrap``) serving a
snapshot store directory on loopback, as a store is served to servers on other hosts.

Every request it answers is logged (:func:`requests_logged`), so a test can show what a
server fetched, or that it fetched nothing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

CONF = """daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
  log_format requests '$request_method $request_uri $status';
  access_log {work}/access.log requests;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


def nginx_binary() -> str:
    exe = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None)
    if exe is None:
        pytest.fail("nginx is installed by scripts/bootstrap; it is missing")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests_logged(work: Path) -> list[str]:
    """``METHOD URI STATUS`` of every request the server in ``work`` answered so far."""
    log = work / "access.log"
    return log.read_text().splitlines() if log.exists() else []


@contextmanager
def serve_directory(root: Path, work: Path) -> Iterator[str]:
    """Serve ``root`` over http on 127.0.0.1; yields the base URL (no trailing slash).
    ``work`` holds the configuration and the request log (:func:`requests_logged`)."""
    work.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = work / "nginx.conf"
    conf.write_text(CONF.format(work=work, port=port, root=root.resolve()))
    proc = subprocess.Popen([nginx_binary(), "-p", str(work), "-c", str(conf), "-e",
                             str(work / "error.log")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (work / "error.log").read_text() if (work / "error.log").exists() \
                        else ""
                    raise RuntimeError(f"nginx did not start: {log[-2000:]}") from None
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
