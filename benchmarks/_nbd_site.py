"""The processes of ``benchmarks.nbd``, as a user runs them: a DRVA (``python -m
drva.daemon``), a protected site serving its disk over NBD (``python -m iofilter_sim run
--nbd``), ``cdp mount`` and ``cdp recover`` — plus a minimal NBD client for the timed
first read, and the waits between them.

Every process is started in its own session (a process group of its own) through one
``Processes`` registry, whose ``close`` stops what is still running — SIGTERM to the
group, then SIGKILL — so a failed run leaves nothing behind. No fixed port is used: the
DRVA listens on port 0 and says where in its ``drva_started`` log line; the site and the
mount say where in their first JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cdp import site_files
from cdp.catalog import load_catalog
from cdp.nbd import protocol as nbd
from cdp.store.fs import FileStore

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = "CDP_SITE_SECRET"
DOMAIN_ID = 1
DOMAIN_NAME = "bench"
VM, DISK = "vm", "disk0"
EXPORT = f"{VM}/{DISK}"

#: How long a process gets to say it is ready (imports, log formatting, catalog open).
START_S_MAX = 60.0
#: How long a SIGTERMed process gets to drain and exit before it is killed.
STOP_S_MAX = 120.0
#: How long the store's catalog gets to commit the last captured write.
COMMIT_S_MAX = 300.0
POLL_S = 0.05
#: A reply of the minimal client's read; the server answers a 4 KiB read in milliseconds.
NBD_REPLY_S_MAX = 60.0


@dataclass
class Proc:
    """A started process: its pipe's lines arrive in ``lines`` (a reader thread)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    started: float  # perf_counter right before it was spawned
    lines: queue.Queue[bytes | None] = field(default_factory=lambda: queue.Queue(maxsize=1024))

    def next_json(self, timeout_s: float, what: str) -> dict[str, Any]:
        """The next JSON object the process prints on stdout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.name}: no {what} within {timeout_s:.0f} s; log: {self.tail()}") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.popen.poll()}) before {what}; log: {self.tail()}")
            text = line.decode(errors="replace").strip()
            if text.startswith("{"):
                return json.loads(text)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


class Processes:
    """Every process the benchmark starts; ``close`` stops those still running."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.secret = secrets.token_hex(16)
        self.procs: list[Proc] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, SECRET_ENV: self.secret, "CDP_LOG_LEVEL": "warning"}

    def start(self, name: str, argv: list[str], *, stdout_pipe: bool) -> Proc:
        """``argv`` in a new session; stderr (and stdout, unless piped) to ``logs/name.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        started = time.perf_counter()
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
                                     start_new_session=True)
        proc = Proc(name, popen, log_path, started)
        if stdout_pipe:
            threading.Thread(target=_pump, args=(popen.stdout, proc.lines), daemon=True,
                             name=f"{name}-stdout").start()
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = STOP_S_MAX) -> int:
        """SIGTERM the process (its drain runs), wait; SIGKILL its group past ``timeout_s``."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.popen)
            return proc.popen.wait()

    def close(self) -> None:
        """Stop every process still running, newest first: SIGTERM to its group, then SIGKILL."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.popen.wait(10.0)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.popen)
                    proc.popen.wait()
            elif proc.popen.returncode is not None:
                # The leader is gone; a child of it may not be.
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _kill_group(popen: subprocess.Popen) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- the DRVA


def drva_doc(root: Path, size: int, *, log_size: int, seal_bytes: int, seal_age_s: float) -> dict[str, Any]:
    """The DRVA's configuration: one domain of one disk, a file store at ``root/store``."""
    state = root / "drva"
    return {
        "name": "drva-bench", "listen": "127.0.0.1:0", "state_dir": str(state),
        "store": f"file://{root / 'store'}",
        "log": {"path": str(state / "replog"), "size": log_size}, "meta": {"path": str(state / "meta")},
        "seal": {"bytes": seal_bytes, "age_s": seal_age_s},
        "domains": [{"id": DOMAIN_ID, "name": DOMAIN_NAME, "disks": [{"vm": VM, "name": DISK, "size": size}]}],
    }


def start_drva(procs: Processes, root: Path, doc: dict[str, Any]) -> tuple[Proc, int]:
    """The DRVA, started; its port, read from its ``drva_started`` log line."""
    path = root / "drva.toml"
    path.write_text(site_files.toml_text(doc))
    proc = procs.start("drva", [sys.executable, "-m", "drva.daemon", "--config", str(path), "--log-level", "info"],
                       stdout_pipe=False)
    deadline = time.monotonic() + START_S_MAX
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"the DRVA exited with {proc.popen.returncode}: {proc.tail()}")
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if '"drva_started"' in line:
                return proc, int(json.loads(line)["listen"].rsplit(":", 1)[1])
        time.sleep(POLL_S)
    raise TimeoutError(f"the DRVA did not start within {START_S_MAX:.0f} s: {proc.tail()}")


def drva_domain_status(status_path: Path) -> tuple[float, dict[str, Any]]:
    """(the time it was written, the domain's entry) of the DRVA's status file; (0, {})
    while there is none. The DRVA rewrites it every ``status_interval_s`` (default 1 s)."""
    try:
        doc = json.loads(status_path.read_text())
        return float(doc["time"]), next(d for d in doc["domains"] if d["id"] == DOMAIN_ID)
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return 0.0, {}


def wait_drva(status_path: Path, ready: Any, what: str, timeout_s: float = COMMIT_S_MAX) -> float:
    """Wait for a status of the DRVA written from now on whose domain entry satisfies
    ``ready``; the seconds it took."""
    t0, since = time.perf_counter(), time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        written, dom = drva_domain_status(status_path)
        if written >= since and ready(dom):
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"the DRVA: {what} not within {timeout_s:.0f} s (last status: {dom})")
        time.sleep(POLL_S * 2)


def wait_settled(status_path: Path) -> float:
    """After a job that ended with a FLUSH (the DRVA holds every write in its log): wait
    until the DRVA has committed them all to the store, so that its uploads from one job
    do not run into the next; the seconds it took."""
    return wait_drva(status_path, lambda d: d.get("committed_seq", -1) >= d.get("accepted_seq", 0),
                     "every accepted write committed")


# --------------------------------------------------------------------------- the protected site


def write_cluster(root: Path, drva_port: int, size: int) -> Path:
    """The site's inventory: VM ``vm`` with disk ``disk0`` in domain ``bench`` (no workload)."""
    doc = site_files.inventory(
        "site-a", ["esx-01"], [site_files.vm(VM, "esx-01", [(DISK, size)])],
        [site_files.domain(DOMAIN_NAME, DOMAIN_ID, f"127.0.0.1:{drva_port}", [VM], None)],
        state_dir=root / "site-disks")
    return site_files.write_inventory(root / "cluster.toml", doc)


@dataclass
class Site:
    proc: Proc
    serving: dict[str, Any]

    @property
    def uri(self) -> str:
        return f"nbd://{self.serving['tcp']}/{EXPORT}"


def start_site(procs: Processes, cluster: Path, drva_status: Path) -> Site:
    """``iofilter_sim run --nbd 127.0.0.1:0 --json``; returned once it serves and the DRVA
    says its filter is connected."""
    proc = procs.start("site", [sys.executable, "-m", "iofilter_sim", "run", str(cluster), "--nbd", "127.0.0.1:0",
                                "--json"], stdout_pipe=True)
    serving = proc.next_json(START_S_MAX, 'the "serving" line')
    if serving.get("event") != "serving" or EXPORT not in serving.get("exports", {}):
        raise RuntimeError(f"the site said {serving!r}, not that it serves {EXPORT}")
    wait_drva(drva_status, lambda d: bool(d.get("connected")), "the site's filter connected", START_S_MAX)
    return Site(proc, serving)


def stop_site(procs: Processes, site: Site) -> dict[str, Any]:
    """SIGTERM: the site drains (every captured write acked) and prints its summary."""
    code = procs.stop(site.proc)
    summary: dict[str, Any] = {}
    while True:
        try:
            line = site.proc.lines.get(timeout=5.0)
        except queue.Empty:
            break
        if line is None:
            break
        if line.strip().startswith(b"{"):
            summary = json.loads(line)
    if code != 0 or not summary.get("drained"):
        raise RuntimeError(f"the site did not drain (exit {code}): {summary} {site.proc.tail()}")
    return summary


def wait_committed(store_dir: Path, seq: int, timeout_s: float = COMMIT_S_MAX) -> float:
    """Wait until the store's catalog holds ``seq`` committed; the seconds it took."""
    async def wait() -> None:
        store = FileStore(store_dir)
        async with asyncio.timeout(timeout_s):
            while True:
                state, _ = await load_catalog(store, DOMAIN_ID)
                if state is not None and state.timeline().committed_seq >= seq:
                    return
                await asyncio.sleep(0.1)

    t0 = time.perf_counter()
    asyncio.run(wait())
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- recovery


def cdp_argv(verb: str, store_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdp.cli", verb, str(DOMAIN_ID), "--store", f"file://{store_dir}", *args]


@dataclass
class Mount:
    proc: Proc
    serving: dict[str, Any]
    serving_s: float  # from the spawn to the "serving" line

    @property
    def address(self) -> tuple[str, int]:
        a = self.serving["address"]
        return a["host"], int(a["port"])

    @property
    def uri(self) -> str:
        host, port = self.address
        return f"nbd://{host}:{port}/{EXPORT}"


def start_mount(procs: Processes, store_dir: Path, name: str) -> Mount:
    """``cdp mount 1 --latest --nbd 127.0.0.1:0 --json``, returned once it serves."""
    proc = procs.start(name, cdp_argv("mount", store_dir, "--latest", "--nbd", "127.0.0.1:0", "--json"),
                       stdout_pipe=True)
    serving = proc.next_json(START_S_MAX, 'the "serving" line')
    if serving.get("event") != "serving" or serving.get("address", {}).get("transport") != "tcp":
        raise RuntimeError(f"cdp mount said {serving!r}")
    return Mount(proc, serving, time.perf_counter() - proc.started)


def stop_mount(procs: Processes, mount: Mount) -> dict[str, Any]:
    """SIGTERM; the "stopped" summary."""
    code = procs.stop(mount.proc)
    last: dict[str, Any] = {}
    while (line := mount.proc.lines.get(timeout=5.0)) is not None:
        if line.strip().startswith(b"{"):
            last = json.loads(line)
    if code != 0 or last.get("event") != "stopped":
        raise RuntimeError(f"cdp mount exited {code}: {last} {mount.proc.tail()}")
    return last


def nbd_read(address: tuple[str, int], name: str, offset: int, length: int) -> bytes:
    """One READ on a fresh connection: fixed newstyle handshake, NBD_OPT_GO, simple replies
    (the least a client can do before its first read)."""
    with socket.create_connection(address, timeout=NBD_REPLY_S_MAX) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")

        def read(n: int) -> bytes:
            data = rfile.read(n)
            if len(data) != n:
                raise ConnectionError(f"NBD server closed the connection ({len(data)} of {n} bytes)")
            return data

        nbd.parse_greeting(read(18))
        sock.sendall(nbd.pack_client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
        sock.sendall(nbd.pack_option(nbd.OPT_GO, nbd.pack_info_request(name)))
        while True:
            _, reply_type, n = nbd.parse_option_reply_header(read(nbd.OPTION_REPLY_HEADER_SIZE))
            data = read(n) if n else b""
            if reply_type == nbd.REP_ACK:
                break
            if reply_type != nbd.REP_INFO:
                raise ConnectionError(f"NBD_OPT_GO {name!r}: reply {reply_type:#x} {data[:200]!r}")
        sock.sendall(nbd.pack_request(nbd.CMD_READ, 1, offset, length))
        error, handle = nbd.parse_simple_reply(read(nbd.SIMPLE_REPLY_SIZE))
        if error or handle != 1:
            raise OSError(error, f"NBD read of {length} bytes at {offset}: error {error}, handle {handle}")
        data = read(length)
        sock.sendall(nbd.pack_request(nbd.CMD_DISC, 2, 0, 0))
        return data


def drop_caches() -> bool:
    """Write back dirty pages and drop the whole page cache; False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False



def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads); NaN once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind
