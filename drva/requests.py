"""Requests from the management server, dropped as files in ``<state_dir>/requests/``.

The MSA and its DRVAs share a host, so a directory is the whole control channel: the
MSA writes ``mark-<token>.json`` (``{"domain": ID, "name": NAME}``, atomically, FORMAT.md
§13) and the DRVA, polling every ``POLL_S``, passes it to the filter session of that
domain as a ``MARK_REQUEST`` (§9) and deletes the file. The filter inserts the mark; the
MSA sees it when the catalog names it. A request that cannot be delivered (no filter
connected) waits up to ``REQUEST_TTL_S`` and is then dropped with a log line, so the
directory never fills up; a malformed one is dropped at once.

Whatever is in the directory, the task goes on: each entry is handled on its own, and
one that fails in any way is logged and dropped (one request with a lone surrogate for a
name, one nested 100,000 deep, or a directory named like a request once ended the DRVA).
Only regular files are read — never through a symlink, never a FIFO (whose open would
block the event loop), never more than ``REQUEST_BYTES_MAX``. Other entries are removed,
except directories, which are not the DRVA's to remove: those are logged once.

The same directory carries one more kind of request, read only when the DRVA starts
(``read_unprotect_requests``, FORMAT.md §13.6): ``unprotect-<id>.json``
(``{"domain": ID, "name": NAME}``) gives up a domain this DRVA no longer serves but whose
identity its metadata repository records, with whatever of it the log holds unshipped
(``drva.partitions``). The polling task leaves those files alone.

The directory is a side file, as ``status.json`` is: when it cannot be made or read, or
something else is at its path (a file, a symbolic link), that is logged
(``requests_unusable``, rate-limited by ``drva.status.SideFileReport``) and the next poll
tries again — the DRVA goes on serving; such a path is never followed nor replaced.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp import durable, wire
from cdp.file_kinds import file_kind
from cdp.logs import get_logger
from cdp.records import MARK_NAME_CONTROL
from cdp.small_file import NotRegularFile, read_small_file
from cdp.tomlread import U32_MAX
from drva.status import SideFileReport, os_error_text

if TYPE_CHECKING:
    from drva.daemon import Drva

log = get_logger("drva.requests")

POLL_S = 0.2
REQUEST_TTL_S = 60.0
NAME_BYTES_MAX = 255
REQUEST_BYTES_MAX = 4096  # a request is {"domain": ID, "name": NAME}: some 300 bytes at most
REQUESTS_PER_POLL_MAX = 256  # the rest wait for the next poll: a flood of files does not stall the loop
REPORTED_MAX = 64  # directories named like a request, remembered so that each is logged once
UNPROTECT_PATTERN = "unprotect-*.json"  # read at start only (drva.partitions), never by the polling task


def requests_dir(state_dir: Path) -> Path:
    return state_dir / "requests"


def unprotect_request_path(state_dir: Path, domain: int) -> Path:
    """Where an operator (or the MSA) puts the unprotect request of ``domain``."""
    return requests_dir(state_dir) / f"unprotect-{domain}.json"


def write_request(state_dir: Path, file_name: str, doc: dict[str, Any]) -> Path:
    """Put the request ``doc`` in the box of the DRVA of ``state_dir`` as ``file_name``:
    written atomically, the box made if missing (FORMAT.md §13.6). The MSA's one way in."""
    box = requests_dir(state_dir)
    box.mkdir(parents=True, exist_ok=True)
    path = box / file_name
    durable.atomic_write(path, json.dumps(doc).encode())
    return path


def write_unprotect_request(state_dir: Path, domain: int, name: str) -> Path:
    """Ask the DRVA of ``state_dir`` to give up domain ``domain`` (``name``) at its next
    start: what ``cdp unprotect`` does before the DRVA's configuration loses the domain."""
    return write_request(state_dir, unprotect_request_path(state_dir, domain).name, {"domain": domain, "name": name})


@dataclass(frozen=True)
class UnprotectRequest:
    """``unprotect-*.json``: domain ``domain``, recorded as ``name``, is given up."""

    path: Path
    domain: int
    name: str


def read_unprotect_requests(state_dir: Path) -> tuple[list[UnprotectRequest], list[tuple[Path, str]]]:
    """The unprotect requests in ``state_dir``'s requests box (at most
    REQUESTS_PER_POLL_MAX), and (path, reason) of the files there that are none (the
    caller drops them). A box that cannot be read holds none: the polling task reports it."""
    try:
        paths = sorted(requests_dir(state_dir).glob(UNPROTECT_PATTERN))[:REQUESTS_PER_POLL_MAX]
    except OSError:
        return [], []
    found: list[UnprotectRequest] = []
    refused: list[tuple[Path, str]] = []
    for path in paths:
        try:
            doc, _ = _read(path)
        except FileNotFoundError:
            continue
        except _Refused as exc:
            refused.append((path, str(exc)))
            continue
        except OSError as exc:
            refused.append((path, os_error_text(exc)))
            continue
        fields = _unprotect_fields(doc)
        if fields is None:
            refused.append((path, 'expected {"domain": ID, "name": NAME}, the id and name the DRVA\'s error gave'))
            continue
        found.append(UnprotectRequest(path, *fields))
    return found, refused


def _unprotect_fields(doc: Any) -> tuple[int, str] | None:
    """(domain, name) of an unprotect request's document; None when it is not one."""
    if not isinstance(doc, dict) or set(doc) != {"domain", "name"}:
        return None
    domain, name = doc["domain"], doc["name"]
    if type(domain) is not int or not 1 <= domain <= U32_MAX:  # drva.config.DOMAIN_ID_RANGE (which imports this)
        return None
    if not isinstance(name, str) or not 1 <= _utf8_len(name) <= NAME_BYTES_MAX:
        return None
    return domain, name


def drop_request(path: Path, event: str, **fields: Any) -> None:
    """Log ``event`` and remove the request at ``path`` (durably: a request that came back
    after a power loss would act again)."""
    log.warning(event, request=_shown(path.name), **fields)
    try:
        durable.remove(path)
    except OSError as exc:  # a directory named like a request, a permission...
        log.warning("request_not_removed", request=_shown(path.name), error=str(exc))


class _Refused(Exception):
    """This request is dropped; the message says why."""


class RequestBox:
    def __init__(self, drva: "Drva") -> None:
        self.drva = drva
        self.root = requests_dir(drva.cfg.state_dir)
        self._reported: set[str] = set()
        self.report = SideFileReport("requests_unusable")

    async def run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_S)

    def poll(self) -> None:
        """One poll: the directory made if missing, its requests handled. A directory
        that cannot be made or read is reported (``requests_unusable``, rate-limited)
        and tried again next poll; what is there and no directory (a file, a symbolic
        link, dangling or not) is left alone, never followed."""
        problem = self._directory_problem()
        if problem is None:
            problem = self.step()
        if problem is None:
            self.report.succeeded(self.root)
        else:
            self.report.failed(self.root, problem)

    def _directory_problem(self) -> str | None:
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            try:
                self.root.mkdir()
            except OSError as exc:  # state_dir gone, read-only, full...: next poll
                return f"cannot make it: {os_error_text(exc)}"
            return None
        except OSError as exc:
            return os_error_text(exc)
        if not stat.S_ISDIR(st.st_mode):
            return f"{file_kind(st.st_mode)}, not a directory: left alone (never followed nor replaced)"
        return None

    def step(self) -> str | None:
        """Handle the requests in the directory now (at most REQUESTS_PER_POLL_MAX);
        what stopped it reading the directory, if anything (the next poll tries again)."""
        try:
            paths = sorted(self.root.glob("mark-*.json"))[:REQUESTS_PER_POLL_MAX]
        except OSError as exc:  # the directory itself is gone or unreadable: next poll
            return f"unreadable: {os_error_text(exc)}"
        for path in paths:
            try:
                self._mark(path)
            except Exception as exc:  # one bad request must not end the task (CancelledError is not one)
                self._drop(path, "request_failed", reason=f"{type(exc).__name__}: {exc}")
        return None

    def _drop(self, path: Path, event: str, **fields: Any) -> None:
        log.warning(event, request=_shown(path.name), **fields)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a directory (IsADirectoryError), or a permission: logged once
            if len(self._reported) < REPORTED_MAX and path.name not in self._reported:
                self._reported.add(path.name)
                log.warning("request_not_removed", request=_shown(path.name), error=str(exc))

    def _mark(self, path: Path) -> None:
        try:
            doc, age = _read(path)
        except FileNotFoundError:
            return
        except _Refused as exc:
            if path.name in self._reported:
                return  # a directory, logged once already
            self._drop(path, "request_refused", reason=str(exc))
            return
        domain, name = (doc.get("domain"), doc.get("name")) if isinstance(doc, dict) else (None, None)
        dom = self.drva.domains.get(domain) if isinstance(domain, int) else None
        if (dom is None or not isinstance(name, str) or not 1 <= _utf8_len(name) <= NAME_BYTES_MAX
                or MARK_NAME_CONTROL.search(name)):
            # A control character too: the MARK it would make is refused at the frame
            # check, and its filter would resend it, refused again, for ever.
            self._drop(path, "request_refused",
                       reason=f"expected a domain of this DRVA and a name of 1..{NAME_BYTES_MAX} UTF-8 bytes "
                              f"without control characters")
            return
        session = dom.session
        if session is None or session.closed:
            if age > REQUEST_TTL_S:
                self._drop(path, "mark_request_expired", domain=domain, name=name,
                           reason=f"no filter connected for {REQUEST_TTL_S:.0f} s")
            return
        session.writer.writelines(wire.control(wire.MARK_REQUEST, {"domain": domain, "name": name}))
        path.unlink(missing_ok=True)
        log.info("mark_requested", domain=domain, name=name)


def _read(path: Path) -> tuple[Any, float]:
    """(the JSON document, its age in seconds) of the regular file at ``path``, read
    without following a symlink or blocking on a FIFO; ``_Refused`` for anything else."""
    try:
        raw, st = read_small_file(path, REQUEST_BYTES_MAX)
    except NotRegularFile as exc:
        raise _Refused(f"{exc}, not a regular file") from None
    if len(raw) > REQUEST_BYTES_MAX:
        raise _Refused(f"{st.st_size} bytes, expected at most {REQUEST_BYTES_MAX}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Refused(f"not a JSON request: {type(exc).__name__}: {exc}") from None
    return doc, time.time() - st.st_mtime


def _utf8_len(name: str) -> int:
    """Bytes of ``name`` in UTF-8; 0 (no name) for one that has none, such as a lone surrogate."""
    try:
        return len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return 0


def _shown(name: str) -> str:
    """A file name as the log shows it: undecodable bytes escaped, at most 100 characters."""
    shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown if len(shown) <= 100 else shown[:100] + "..."
