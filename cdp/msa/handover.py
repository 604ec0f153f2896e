"""``handovers/<domain>.json`` (FORMAT.md §13.14): what this site's last quiesce of a
domain handed over — the final mark and its seq — kept until the domain is protected
here again.

A quiesce (``MsaDaemon.quiesce``: for a planned failover at the protected site, for a
failback at the site the domain had failed over to) pauses the VMs, commits a final
mark, writes this record, powers the VMs off and stops protecting the domain. If the
site that asked dies before it records the answer (or before its fork), its rerun asks
again; without this record the domain is no longer protected here and the second
quiesce could only be refused ("nothing to hand over"), leaving the failover or failback
unable to resume. With it, the same answer is given again: the VMs have stayed off
since (they are refused power-on while it is here), so the mark is still the domain's
final point here. Written before the power-off, it also lets the next quiesce finish
one killed between its mark and its end. Protecting the domain here again removes it,
and a quiesce asked after that hands over a new final mark.

``ask_handover`` is the other side: the site failing the domain over (planned) or back
asks its peer for that quiesce. A planned failover rerun before its fork asks again
rather than trusting the mark it recorded: the peer may have protected and run the
domain since, and then only a new quiesce gives a point with no acknowledged write
after it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdp import durable
from cdp.errors import CdpError, FailoverRefused
from cdp.logs import get_logger
from cdp.msa.job_records import read_domain_record, write_domain_record

log = get_logger("cdp.msa.handover")

VERSION = 1
RECORD_BYTES_MAX = 64 << 10


def handover_path(state_dir: Path, domain: str) -> Path:
    return state_dir / "handovers" / f"{domain}.json"


def _valid(doc: dict[str, Any]) -> bool:
    return (isinstance(doc.get("mark"), str) and isinstance(doc.get("seq"), int) and not isinstance(doc["seq"], bool)
            and doc["seq"] >= 0)


def read_handover(state_dir: Path, domain: str) -> dict[str, Any] | None:
    """The last handover of ``domain`` (None: none since it was last protected here);
    ``ConfigError`` naming the file when it is not a valid record."""
    return read_domain_record(handover_path(state_dir, domain), domain, version=VERSION,
                              bytes_max=RECORD_BYTES_MAX, what="handover", valid=_valid)


def write_handover(state_dir: Path, domain: str, mark: str, seq: int) -> None:
    write_domain_record(handover_path(state_dir, domain),
                        {"version": VERSION, "domain": domain, "mark": mark, "seq": int(seq), "ns": time.time_ns()})


def forget_handover(state_dir: Path, domain: str) -> None:
    """The domain is protected here again: a quiesce from now on hands over a new point.
    Removed durably: back after a power loss, it would answer a quiesce with a mark the
    VMs have written past."""
    durable.remove(handover_path(state_dir, domain))


async def ask_handover(daemon: Any, name: str, job: Any, *, failback: bool = False,
                       resumes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ask the peer site (``[peer]``) to quiesce ``name`` and hand it over at a final mark
    (``POST /v1/domains/{name}/quiesce``); that job's output. ``failback``: the domain
    comes back to this site (the messages say so). ``resumes``: the handover an
    unfinished run of this planned failover recorded — the peer answers with that mark
    again while it has not run the domain since, else with a new one; a peer that cannot
    answer leaves that mark unvouched for, and the refusal says so."""
    from cdp.msa.client import MsaClient

    cfg = daemon.cfg
    doing = "a failback" if failback else "a planned failover"
    instead = ("the domain cannot come back without that site's final mark (its writes since the failover "
               "are only there)" if failback else "fail over unplanned (without --planned) if it is gone")
    if resumes is not None:
        instead = (f"its earlier final mark {resumes.get('mark')!r} (seq {resumes.get('seq')}) can no longer be "
                   f"vouched for: that site may have run the domain since; rerun this failover once it answers, "
                   f"or, if it is truly gone, fail over unplanned at the latest point (`cdp failover {name} "
                   f"--latest`)")
    if cfg.peer is None:
        hint = ", or fail over unplanned (without --planned) from the store alone"
        if failback:
            hint = ""
        elif resumes is not None:
            hint = f"; {instead}"
        raise FailoverRefused(f"{doing} asks the other site to hand domain {name} over, and {cfg.path.name} has no "
                              f"[peer] (its site, api and token_env); add it{hint}")
    mark = f"handover-to-{cfg.site}-{time.time_ns() // 1_000_000_000}"
    job.progress("quiesce", 0, 1)
    try:
        async with MsaClient.for_peer(cfg, daemon.env) as peer:
            record = await peer.post(f"/v1/domains/{name}/quiesce", {"mark": mark}, wait=True)
    except CdpError as exc:
        raise FailoverRefused(f"site {cfg.peer.site} ({cfg.peer.api}) did not hand domain {name} over: "
                              f"{exc.message}; {doing} needs that site's daemon — {instead}") from None
    if not isinstance(record, dict) or record.get("state") != "succeeded" or not isinstance(record.get("output"), dict):
        raise FailoverRefused(f"site {cfg.peer.site} could not hand domain {name} over: {_why_not(record)}" +
                              (f"; {instead}" if resumes is not None else ""))
    out = record["output"]
    job.progress("quiesce", 1, 1)
    log.info("domain_handed_over", domain=name, peer=cfg.peer.site, mark=mark, seq=out.get("seq"),
             acked_seq=out.get("acked_seq"), failback=failback, again=bool(out.get("again")))
    # The peer names the mark it handed over at: its own earlier one when it had already
    # handed the domain over to a run of this job that died before recording it (or
    # before its fork), and has not run it since.
    return {"site": cfg.peer.site, "mark": out.get("mark") or mark, "seq": out.get("seq"),
            "acked_seq": out.get("acked_seq")}


def _why_not(record: object) -> str:
    """What the peer's quiesce job record says went wrong, readably and bounded (the
    peer's text is shown, not a dump of its record)."""
    if not isinstance(record, dict):
        return f"its answer is not a job record ({type(record).__name__})"
    error = record.get("error")
    if isinstance(error, str) and error:
        return error[:300] + ("…" if len(error) > 300 else "")
    state = record.get("state")
    return f"its quiesce job ended {str(state)[:40]!r} with no output" if state == "succeeded" else \
        f"its quiesce job ended {str(state)[:40]!r} with no error given"
