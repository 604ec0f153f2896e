"""Real local services for tests: a moto S3 server and an Azurite blob server.

Each service is a subprocess started by the tests themselves, bound to
127.0.0.1 on a free port (``cdp.ports.free_port``: outside the ephemeral range,
reserved until the service binds it), and killed when the test session ends
(``stop()`` from the fixture finalizer, with an ``atexit`` fallback). A
service that cannot be started raises ``ServiceError`` with the reason and the
tail of its output; fixtures turn that into a test *failure*, never a skip,
because CI must run the S3 and Azure contract tests.

``MotoServer.stop()`` / ``restart()`` keep the port, so a test can simulate an
S3 outage and recovery against the same endpoint. moto keeps its state in
memory: a restarted server is empty.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from cdp.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

#: How long a service may take to answer its first HTTP request.
START_TIMEOUT_S = 60.0
#: How long a stopping service may take before it is killed.
STOP_TIMEOUT_S = 10.0

AZURITE_ACCOUNT = "devstoreaccount1"
#: The well-known, public development key of Azurite (not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

_running: set[_Service] = set()


class ServiceError(RuntimeError):
    """A local test service could not be started."""


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


class _Service:
    """One subprocess serving HTTP on 127.0.0.1:port."""

    name = "service"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def probe_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and wait until it answers HTTP."""
        assert not self.running, f"{self.name} already running"
        cmd = self.command()
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile()  # the output of this run only
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceError(f"cannot start {self.name} ({cmd[0]}): {exc}") from exc
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self._tail()
                status = self.proc.returncode
                self.stop()
                raise ServiceError(
                    f"{self.name} exited with status {status} "
                    f"before answering on port {self.port}:\n{output}"
                )
            if _answers_http(self.probe_url):
                return
            time.sleep(0.1)
        output = self._tail()
        self.stop()
        raise ServiceError(
            f"{self.name} did not answer on port {self.port} within "
            f"{START_TIMEOUT_S:.0f} s:\n{output}"
        )

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); the port is kept."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def _tail(self, size_max: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-size_max:].decode(errors="replace")


class MotoServer(_Service):
    """moto's S3 server (state in memory; any credentials are accepted)."""

    name = "moto server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def probe_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/moto-api/"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def azurite_binary() -> str:
    """Path of azurite-blob: the repo's .tools install first, then PATH."""
    local = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found is None:
        raise ServiceError(
            f"azurite-blob not found in {local.parent} nor on PATH; "
            "install it with: npm install --prefix .tools azurite"
        )
    return found


class Azurite(_Service):
    """Azurite's blob service, data kept in memory, telemetry off."""

    name = "azurite"

    def command(self) -> list[str]:
        return [
            azurite_binary(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--inMemoryPersistence",  # (refused together with --location)
            "--disableTelemetry",  # else Azurite reports usage over the network
            "--skipApiVersionCheck",  # the SDK may be newer than the emulator
            "--loose",
            "--silent",
        ]

    @property
    def probe_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}?comp=list"

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, AZURITE_KEY)


def connection_string(port: int, account_key: str) -> str:
    """An Azurite connection string for 127.0.0.1:port with the given key."""
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={AZURITE_ACCOUNT};AccountKey={account_key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
    )


@atexit.register
def _stop_all() -> None:
    for service in list(_running):
        service.stop()
