"""Why a domain's VMs may not be powered on at this site, though it is not failed over
elsewhere: a failback here that has not finished, or a planned failover handing the
domain over from here. The MSA asks at every power-on and at its start
(``cdp.msa.daemon``); None means no such reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from cdp.errors import ConfigError
from cdp.msa.config import SiteConfig
from cdp.msa.runner import ClaimKey, quiesce_claim


def half_failed_back(cfg: SiteConfig, domain: str) -> str | None:
    """Why ``domain``'s disks may not be run on, else None: a failback here has not
    reached ``protected`` yet (``cdp.msa.failback``) — its disks may be half-written
    (``handed_over``), or its DRVA still serves the old, fenced timeline (``forked``:
    VMs started now would have nothing they write acknowledged, for good) — or this
    site handed the domain back to the site it came from, which reads these disks as
    they were at the final mark (``handed_back``)."""
    from cdp.msa.failback import handed_back, in_progress

    if (why := handed_back(cfg, domain)) is not None:
        return why
    doc = in_progress(cfg.state_dir, domain)
    if doc is None or doc["phase"] not in ("handed_over", "forked", "unreadable"):
        return None
    if doc["phase"] == "forked":
        return (f"a failback of domain {domain} brought its disks to the final mark and forked the new timeline, "
                f"and its DRVA does not serve that timeline yet (phase forked): VMs started now would meet "
                f"the old, fenced one and nothing they write would be acknowledged; run `cdp failback "
                f"{domain}` again to finish it (it powers them on)")
    return (f"a failback of domain {domain} started and its disks are not brought back yet (phase "
            f"{doc['phase']}): they may be half-written; run `cdp failback {domain}` again to finish it")


def handing_over(cfg: SiteConfig, claims: Mapping[ClaimKey, str], domain: str) -> str | None:
    """Why ``domain``'s VMs may not be powered on because this site is handing it over
    for a planned failover, else None: its quiesce is running (``claims``: the job
    runner's; between its pause and its handover record a power-on would pass every
    other check), or it committed a final mark to hand the domain over at (the record is
    written before the power-off) and has not protected it since. A recovery site forks
    at that mark and reports no loss; writes made here after it would be lost, and both
    sites would run the VMs."""
    from cdp.msa.handover import read_handover

    holder = claims.get(quiesce_claim(domain))
    if holder is not None:
        return (f"domain {domain} is being handed over for a planned failover ({holder}): its VMs stay off "
                f"until it ends")
    try:
        back = read_handover(cfg.state_dir, domain)
    except ConfigError as exc:
        return f"domain {domain}: its handover record cannot be read ({exc.message}); its VMs stay off"
    if back is None or domain in cfg.isolated:
        return None
    return (f"domain {domain} was handed over at its final mark {back['mark']!r} (seq {back['seq']}) for a "
            f"planned failover: the recovery site runs it from that point, and writes made here would be lost; "
            f"to run it here again, once the recovery site's failover has failed or been given up (one still "
            f"running forks at that mark), protect it here first (`cdp protect {domain}`)")
