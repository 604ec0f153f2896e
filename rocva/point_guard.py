"""The mount's hold on its point: its recovery lease, kept for as long as it serves.

``PointGuard`` keeps the mount's recovery lease for as long as it serves: a lease lost
(a stall past its renewal window) is taken again at once, and the point checked before
the store is read for it again; a point retention took apart meanwhile fails every read
with ``EIO`` rather than serve half of it (FORMAT.md §18).

Split out of ``rocva.mount_source`` (which reads the point; this decides whether it may).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno

from cdp.catalog import load_catalog
from cdp.errors import CdpError, NotFound, StoreError
from cdp.gather import gather_bounded
from cdp.layout import parse_base_manifest_key
from cdp.locks import Lease
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from rocva.plan import RecoveryPlan
from rocva.recover import take_recovery_lease

logger = get_logger("rocva.mount")

#: Once the mount's recovery lease is lost, a read of the store waits at most this long
#: for a new lease and the point's check (``PointGuard``), then fails with EIO.
RECHECK_WAIT_S = 30.0
#: Retries of a new lease, or of the point's check, when the store fails: at most this apart.
RECHECK_RETRY_S_MAX = 5.0
#: Objects of the plan looked at in flight, and per batch, when the point is checked.
RECHECK_CONCURRENCY = 8
RECHECK_BATCH_MAX = 1024


class PointGuard:
    """A mount's recovery lease, kept while it serves, and whether the store still holds
    the point (FORMAT.md §11.3, §18).

    Invariant: while ``trusted``, every object the plan reads is either held by a live
    lease of this mount (retention deletes nothing of the domain then) or was found
    named by the catalog, and in the store, after the lease now held was taken. When the
    lease is lost (a stall past its renewal window: a suspended VM, SIGSTOP), a new one
    is taken at once; reads of the store wait (``RECHECK_WAIT_S`` at most) until the
    point is checked again: the catalog loaded under the new lease must still hold every
    seq after the plan's oldest base on the plan's timeline, and every segment and
    manifest the plan reads must exist. Otherwise ``lost`` says why and every read fails
    with ``EIO``: a retention that ran while no lease was live may have deleted part of
    the point, and half of a point is never served."""

    def __init__(self, store: ObjectStore, plan: RecoveryPlan, lease: Lease | None, owner: str) -> None:
        self.store = store
        self.plan = plan
        self.lease = lease
        self.owner = owner
        self.lost: str | None = None
        self.leases_retaken = 0
        self._checked = asyncio.Event()
        self._checked.set()
        self._task: asyncio.Task | None = None

    @property
    def trusted(self) -> bool:
        return self.lost is None and self._checked.is_set()

    def start(self) -> None:
        if self.lease is not None:
            self._task = asyncio.create_task(self._keep(), name=f"mount lease {self.plan.domain}")

    async def wait_trusted(self) -> None:
        """Return once the point is trusted; ``OSError(EIO)`` when it is lost, or not
        checked again within ``RECHECK_WAIT_S``."""
        try:
            async with asyncio.timeout(RECHECK_WAIT_S):
                await self._checked.wait()
        except TimeoutError:
            raise OSError(errno.EIO, f"domain {self.plan.domain}: the mount's recovery lease was lost and the "
                                     f"point is not checked again yet (after {RECHECK_WAIT_S:.0f} s)") from None
        if self.lost is not None:
            raise OSError(errno.EIO, self.lost)

    async def close(self) -> None:
        """Stop watching and release the lease held now."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lease is not None:
            lease, self.lease = self.lease, None
            await lease.release()

    async def _keep(self) -> None:
        domain = self.plan.domain
        while self.lease is not None:
            reason = await self.lease.wait_lost()
            self._checked.clear()
            logger.error("mount_lease_lost", domain=domain, lease=self.lease.key, reason=reason)
            old, self.lease = self.lease, None
            with contextlib.suppress(CdpError):
                await old.release()  # expired already: only its object goes
            try:
                self.lease = await self._retrying(lambda: take_recovery_lease(self.store, domain, self.owner))
                self.leases_retaken += 1
                logger.warning("mount_lease_retaken", domain=domain, lease=self.lease.key if self.lease else None)
                problem = await self._retrying(self._problem)
            except CdpError as exc:  # nothing says the point is whole
                problem = f"the point cannot be checked again ({exc.message})"
            if problem is None:
                logger.info("mount_point_checked", domain=domain, seq=self.plan.seq, segments=len(self.plan.segments))
            else:
                self.lost = (f"domain {domain} seq {self.plan.seq}: the mount lost its recovery lease, and the point "
                             f"may be gone from the store: {problem}; every read fails (EIO): mount the point "
                             f"again, or another one")
                logger.error("mount_point_lost", domain=domain, seq=self.plan.seq, reason=problem)
            self._checked.set()
            if problem is not None:
                return

    @staticmethod
    async def _retrying(call):
        """``await call()``, again after a transient store failure (the mount waits for its store)."""
        attempt = 0
        while True:
            try:
                return await call()
            except StoreError as exc:
                if not exc.retryable:
                    raise
                attempt += 1
                logger.warning("mount_recheck_failed", attempt=attempt, error=exc.message)
                await asyncio.sleep(min(RECHECK_RETRY_S_MAX, 0.1 * 2 ** min(attempt, 6)))

    async def _problem(self) -> str | None:
        """Why the store may no longer hold what the plan reads (None: it does, and keeps
        it while the new lease lives)."""
        plan = self.plan
        state, _ = await load_catalog(self.store, plan.domain)
        tl = None if state is None else state.timelines.get(plan.timeline)
        if tl is None:
            return f"the catalog holds no timeline {plan.timeline} any more"
        low = min((d.base_seq for d in plan.disks), default=plan.seq)
        if tl.horizon_seq > low:
            return (f"retention moved timeline {plan.timeline}'s horizon to seq {tl.horizon_seq}, past seq {low} the "
                    f"point is rebuilt from")
        named = {b["key"] for t in state.timelines.values() for b in t.bases}
        manifests = [d.manifest.key for d in plan.disks if d.manifest is not None]
        for key in manifests:
            _, key_tl, seq, _ = parse_base_manifest_key(key)
            owner = state.timelines.get(key_tl)
            if key not in named and (owner is None or seq < owner.horizon_seq):
                return f"base manifest {key} is no longer in the catalog"
        missing: list[str] = []

        async def look(key: str) -> None:
            try:
                await self.store.stat(key)
            except NotFound:
                missing.append(key)

        keys = [s.key for s in plan.segments] + manifests
        for at in range(0, len(keys), RECHECK_BATCH_MAX):  # bounded: not one task per segment of a long plan
            await gather_bounded((look(k) for k in keys[at : at + RECHECK_BATCH_MAX]), RECHECK_CONCURRENCY)
        if missing:
            return f"{sorted(missing)[0]} is gone ({len(missing)} of the objects it reads)"
        return None
