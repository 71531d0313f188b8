"""The Prefect API a run talks to: ``PREFECT_API_URL`` when set, else a temporary server
that lives exactly as long as the run.

Prefect's own ephemeral server (``SubprocessASGIServer``) is stopped by ``atexit``, which a
killed run never reaches: every ``kill -9`` left a uvicorn process (about 230 MB) behind.
Here the same server (Prefect's ``create_app`` under uvicorn, started as Prefect starts it)
is a child that the kernel terminates when the run's process dies, however it dies
(Linux ``PR_SET_PDEATHSIG``), and the run waits for it with a configurable timeout and
one retry instead of failing with a traceback on a loaded machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

#: Seconds to wait for the temporary server's health check (``ATTRIFLOW_SERVER_TIMEOUT``).
DEFAULT_TIMEOUT = 90.0


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not answer; the message says what to do."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this process when its parent dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the atexit-style stop below still runs on a normal exit
    os.setpgid(0, 0)  # its own process group: a Ctrl-C in the terminal reaches the run, which stops it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    import prefect
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log, preexec_fn=_die_with_parent)  # a file: a pipe could fill and block


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def prefect_api(timeout: float | None = None, stop_at_exit: bool = False) -> Iterator[str]:
    """The Prefect API URL for one run, starting a temporary server when none is configured.

    Parameters
    ----------
    timeout : float, optional
        Seconds to wait for the temporary server's health check, per attempt (two attempts);
        default ``ATTRIFLOW_SERVER_TIMEOUT`` or 90.
    stop_at_exit : bool
        Stop the temporary server when the interpreter shuts down, after Prefect has sent
        its last logs and events (their senders stop at thread shutdown, registered after
        this one, so they run first), instead of when the context exits. For a process that
        ends after the run (the CLI); the server dies with the process in any case.

    Yields
    ------
    str
        ``PREFECT_API_URL``: the configured one, or the temporary server's, set for the
        duration (Prefect's ``temporary_settings``).

    Raises
    ------
    ServerStartError
        When the temporary server does not answer twice; the message gives the timeout
        setting and how to use a running server instead.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    wait = float(timeout if timeout is not None else os.environ.get("ATTRIFLOW_SERVER_TIMEOUT", DEFAULT_TIMEOUT))
    proc, url, problem = None, "", ""
    log = tempfile.TemporaryFile()
    for _attempt in range(2):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        log.seek(0)
        log.truncate()
        proc = _start(port, log)
        if _wait_healthy(proc, url, wait):
            break
        code = proc.poll()
        _stop(proc)
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
        problem = f"exited with code {code}" if code is not None else f"did not answer within {wait:.0f} s"
        problem += (": " + " / ".join(tail)) if tail else ""
        proc = None
    if proc is None:
        log.close()
        raise ServerStartError(
            f"the temporary Prefect server {problem} (twice). On a busy machine wait longer "
            "(ATTRIFLOW_SERVER_TIMEOUT=300 attriflow run ...) or start one server and reuse it: "
            "`prefect server start` in another shell, then PREFECT_API_URL=http://127.0.0.1:4200/api")
    if stop_at_exit:
        threading._register_atexit(_stop, proc)  # type: ignore[attr-defined]  # as Prefect's services do
        _AT_EXIT.append(proc)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _flush_logs()  # Prefect's log records reach the server before it stops
    finally:
        if not stop_at_exit:
            _stop(proc)
            log.close()


#: Temporary servers left to stop at the interpreter's shutdown (``stop_at_exit``).
_AT_EXIT: list[subprocess.Popen[bytes]] = []


def stop_temporary_servers() -> None:
    """Stop now the temporary servers that would be stopped at the interpreter's shutdown:
    for a process about to leave through ``os._exit``, which skips that shutdown."""
    while _AT_EXIT:
        _stop(_AT_EXIT.pop())


def _flush_logs() -> None:
    """Send Prefect's queued log records to the API now (they are sent in the background)."""
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()
    except Exception:  # noqa: BLE001 - a log that cannot be sent must not hide the run's outcome
        pass
