"""Starting `tuneforge serve` for the tests: a real server process on a free loopback port over a test root."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, *args: str, env_extra: dict | None = None) -> tuple[subprocess.Popen, str, int]:
    """`tuneforge serve ARGS --port <free>` with TUNEFORGE_ROOT=root (and no API key from this environment), once it
    answers GET /v1/models (200, or 401 where an API key is set); fails the test with the server's output when it
    exits or does not answer within 120 s. Returns (process, base URL, port): the caller terminates the process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"}
    env.update({"TUNEFORGE_ROOT": str(root), **(env_extra or {})})
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code in (200, 401):
                return proc, url, port
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
