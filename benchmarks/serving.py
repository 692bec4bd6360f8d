"""Servers under benchmark: a uvicorn subprocess on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(name: str, argv: list[str], env: dict[str, str], ready_path: str,
            cwd: Path, uvicorn_cli: bool = True) -> Iterator[str]:
    """Runs ``argv`` until ``ready_path`` answers 200; yields its base URL and stops it
    afterwards. Its output goes to a log file named in any error.

    ``argv`` is a uvicorn command line (the address goes in its flags), or with
    ``uvicorn_cli=False`` ``twin serve`` (the address goes in TWIN_HOST/TWIN_PORT)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    if uvicorn_cli:
        argv = [*argv, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                "--no-access-log"]
    else:
        env = {**env, "TWIN_HOST": "127.0.0.1", "TWIN_PORT": str(port)}
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log.name}")
            try:
                if httpx.get(base + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
