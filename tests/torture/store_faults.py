"""Campaign 5, store faults: a real DRVA ingests while its stores fail, slow down and lie.

A moto S3 server and an Azurite blob service run as processes; an HTTP-aware fault proxy
(``tests/torture/fault_proxy.py``) stands in front of each, and the DRVA's stores are
``FaultyStore`` wrappers (``cdp/store/faulty.py``) around S3/Azure clients pointed at the
proxies. One DRVA, in process, serves two domains — ``erp`` shipped to S3 and ``crm`` to
Azure — fed by a simulated filter at a few MB/s. The campaign has two parts, run side by
side:

**Ingest** (``parts`` holds "ingest"). Each round switches faults on for ``round_s``
seconds — at the proxies 503 ``SlowDown``/``ServerBusy``, 500, timeouts (no answer past
the client's read timeout), connections reset in the middle of a PUT body or of a GET's
answer, GET answers cut short, PUTs forwarded whole whose answer is lost, slow listings;
in the store wrapper lost replies, failed calls and a hang of every PUT — each kind
forced once a round and then drawn at random, and at the end a storm of 503s on every
request (``storm_s``) so that the RPO lag climbs; then switches them off and waits for the
RPO lag of both domains to come back under ``RPO_HEALTHY_S`` with the load still running
(else ``failures``). At the end the load stops, the filters drain and, read straight from
moto and Azurite (no proxy): every acknowledged seq is committed in the catalog (each
one missing counts in ``lost``) and the replay of the store equals the primary disk
(a difference counts in ``lost``); a domain the DRVA fenced counts in ``false_fences``
(nobody else writes these domains), a DRVA task that died in ``daemon_crashes``. Then
each domain is recovered (``rocva.recover``) ``recoveries`` times through its faulting
proxy, with resets and truncations of GET answers — also ``short_get``, whose
``Content-Length`` is rewritten so that only the object formats can tell: each attempt
must give images equal to the primaries or raise an error whose message names the
object it could not read (else ``failures``). A refused recovery is run again into the
same directory (a resume), with fewer faults, the last attempt with none: it must then
be exact.

**Locks** (``parts`` holds "locks"). Per backend, through a proxy of its own, a holder
takes a maintenance lock (FORMAT.md §11.2) with a short TTL, its conditional create's
answer lost (refused as ``Busy``: ``false_fences``); its renewals meet a lost PUT reply,
503s and slow listings. A second process whose clock runs ahead *within* the skew
allowance must be refused (``Busy``) and the holder must keep its lease through two
renewals (else ``false_fences``); then one whose clock runs ahead *past* the allowance
must be refused by the store's clock (``ConfigError``, FORMAT.md §11.1; else ``failures``),
and one that judges the lock expired (a right clock, a negative allowance: as if the
holder had stalled) takes it, and the holder must notice it lost it within its renewal
window (else ``failures``: two holders). Clock skew is per asyncio task (``_SkewedTime``): each
"process" has its own clock, like hosts do.

``faults`` counts every fault injected; ``notes["faults"]`` by kind (the proxies' kinds,
``store_injected`` and ``store_hang`` for the store wrapper, ``clock_skew``);
``notes["outcomes"]`` what the recoveries and the lock scenarios came to;
``notes["rpo_lag_max_s"]`` and ``notes["rpo_recovery_s"]`` per round, the worst RPO lag
while the faults fired and how long it took to get healthy once they stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

import cdp.locks
import drva.lanes
from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.digest import sha256_file
from cdp.errors import Busy, CdpError, ConfigError, LeaseLost
from cdp.locks import maintenance_lock
from cdp.store import FaultyStore
from rocva.recover import recover as rocva_recover
from rocva.recover_options import RecoverOptions
from tests.drva.harness import SECRET, Disk, check_store, config, domain_doc, drva_doc, random_writes
from tests.services import AZURITE_KEY, Azurite, MotoServer, connection_string
from tests.torture.fault_proxy import FaultProxy
from tests.torture.result import Result
from tests.waiting import wait_until

NAME = "store_faults"
DISK = 16 << 20
# The store clients' bounds: short, so that a timeout costs seconds, not minutes.
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 3.0
ATTEMPTS = 3
AZURE_BACKOFF = (0.2, 0.5, 0.1)  # initial, increment base, jitter: 0.7 s, then 0.45 s (see _azure)
# A "timeout" fault holds the request past the client's read timeout.
PROXY_TIMEOUT_S = READ_TIMEOUT_S + 0.5
SLOW_LIST_S = 1.0
# What a healthy path's RPO lag stays under (segments seal every 0.3 s), and how long it
# may take to get back there once the faults stop (SDK retries back off for seconds).
RPO_HEALTHY_S = 3.0
RPO_RECOVERY_S = 60.0
# Draining the filters and the DRVA's last segments once the load stops.
DRAIN_S = 90.0
STORE_HANG_S = 1.0
# Faults drawn per fitting request while a round's faults are on (each kind is also
# forced once a round).
INGEST_RATES = {"error_503": 0.04, "error_500": 0.02, "reset_put": 0.03, "lost_put_reply": 0.05,
                "reset_get": 0.1, "truncate_get": 0.1, "slow_list": 0.3}
INGEST_FORCED = ("timeout", "error_503", "error_500", "reset_put", "lost_put_reply", "slow_list")
STORE_LOST_REPLY_RATE = 0.03  # FaultyStore: a put that landed, reported failed
STORE_ERROR_RATE = 0.03  # FaultyStore: a get or a list that fails
RECOVERY_RATES = {"error_503": 0.02, "reset_get": 0.02, "truncate_get": 0.02, "short_get": 0.02}
RECOVERY_FORCED = ("short_get", "reset_get", "truncate_get", "error_503")
# A refused recovery is run again into the same directory (it resumes), with fewer faults;
# the last attempt meets none and must be exact.
RECOVERY_RETRY_RATES = {k: 0.005 for k in RECOVERY_RATES}
RECOVERY_ATTEMPTS = 4
# Locks: a short TTL (renewed every TTL / 3) and skew allowance, so that a scenario
# takes seconds; the faults its renewals meet.
LOCK_TTL_S = 9.0
LOCK_SKEW_S = 2.0
LOCK_DOMAIN = 99
LOCK_RATES = {"error_503": 0.05, "slow_list": 0.3}
CREDS = ("torture-access-key", "torture-secret-key")


@dataclass(frozen=True)
class Plan:
    rounds: int  # fault rounds of the ingest
    round_s: float  # seconds of faults a round
    storm_s: float  # then seconds of 503s on every request
    recoveries: int  # recoveries per domain through the faulting proxy
    lock_scenarios: int  # lock scenarios per backend


QUICK = Plan(rounds=1, round_s=3.0, storm_s=3.0, recoveries=1, lock_scenarios=1)
LONG = Plan(rounds=6, round_s=15.0, storm_s=4.0, recoveries=4, lock_scenarios=3)

# ------------------------------------------------------------------ clocks per task

_SKEW_NS: contextvars.ContextVar[int] = contextvars.ContextVar("torture_clock_skew_ns", default=0)


class _SkewedTime:
    """``cdp.locks``' view of ``time``: ``time_ns`` runs ahead by the skew of the calling
    task's context (a task inherits its creator's: a lease's renewals keep its clock)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time_ns() -> int:
        return time.time_ns() + _SKEW_NS.get()


@contextlib.contextmanager
def _clock_ahead(seconds: float):
    token = _SKEW_NS.set(int(seconds * 1e9))
    try:
        yield
    finally:
        _SKEW_NS.reset(token)


# ------------------------------------------------------------------ stores


def _s3(endpoint: str, bucket: str, prefix: str = "") -> Any:
    from cdp.store.s3 import S3Store

    return S3Store(bucket, prefix, endpoint_url=endpoint, region="us-east-1", access_key=CREDS[0],
                   secret_key=CREDS[1], connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                   max_attempts=ATTEMPTS)


def _azure(port: int, container: str, prefix: str = "") -> Any:
    from cdp.store.azure import AzureBlobStore

    store = AzureBlobStore(container, prefix, connection_string=connection_string(port, AZURITE_KEY),
                           connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, max_attempts=ATTEMPTS)
    # The SDK's backoff as the product sets it waits 2-4 s before a first retry: shortened
    # here, so that the campaign's hundreds of retries take seconds. What a retry finds is
    # under test, not how long it waited first.
    retry = store._client._config.retry_policy
    retry.initial_backoff, retry.increment_base, retry.random_jitter_range = AZURE_BACKOFF
    return store


@dataclass
class Backend:
    """One store service, its container, the proxies in front of it and how to reach it."""

    kind: str  # "s3" or "azure"
    port: int  # the service's own port
    container: str
    ingest: FaultProxy
    locks: FaultProxy

    def store(self, port: int | None = None, prefix: str = "site-a") -> Any:
        """A client of the container, through ``port`` (a proxy) or straight to the service."""
        port = port or self.port
        if self.kind == "s3":
            return _s3(f"http://127.0.0.1:{port}", self.container, prefix)
        return _azure(port, self.container, prefix)

    def url(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.container}/site-a?endpoint={self.ingest.endpoint}&region=us-east-1"
        return f"azure://{self.container}/site-a"


# ------------------------------------------------------------------ the campaign


class _Run:
    def __init__(self, plan: Plan, seed: int, progress: Callable[[str], None], res: Result, tmp: Path) -> None:
        self.plan, self.seed, self.progress, self.res, self.tmp = plan, seed, progress, res, tmp
        self.kinds: Counter[str] = Counter()  # faults by kind, other than the proxies'
        self.outcomes: Counter[str] = Counter()
        self.refusals: list[str] = []  # the first words of each refused recovery
        self.rpo_recovery_s: list[float] = []  # per round: from the faults' end to a healthy lag
        self.rpo_lag_max_s: list[float] = []  # per round: the worst lag seen while faults fired
        self.backends: list[Backend] = []
        self.faulty: dict[str, FaultyStore] = {}
        self.undrained: set[int] = set()  # domains whose captured writes are not all in the store

    # -- ingest ------------------------------------------------------------

    async def ingest(self) -> None:
        from drva.daemon import Drva
        from iofilter_sim.client import FilterClient
        from iofilter_sim.filter import DomainFilter

        res, tmp = self.res, self.tmp
        s3, az = self.backends
        doms = [domain_doc(1, "erp", [("vm1", "d0", DISK)]), domain_doc(2, "crm", [("vm2", "d0", DISK)])]
        doms[1]["store"] = az.url()
        doc = drva_doc(tmp, "drva-faults", doms, store=s3.url(), log_size="256MiB", seal_bytes="1MiB",
                       seal_age_s=0.3, version=2)
        self.faulty = {b.url(): FaultyStore(b.store(b.ingest.port), seed=self.seed + i)
                       for i, b in enumerate(self.backends)}
        disks = [Disk(tmp / "erp-d0.img", DISK), Disk(tmp / "crm-d0.img", DISK)]
        filters = [DomainFilter(1, [disks[0]]), DomainFilter(2, [disks[1]])]
        with mock.patch.object(drva.lanes, "open_store", lambda url: self.faulty[url]):
            d = Drva(config(doc), exit_on_task_failure=False)
            await d.start()
        client = FilterClient(filters, "127.0.0.1", d.port, SECRET.encode(), "host-1")
        client_task = asyncio.create_task(client.run())
        stop = asyncio.Event()

        async def load() -> None:
            rng = np.random.default_rng(self.seed)
            while not stop.is_set():
                for f in filters:
                    f.capture(*random_writes(rng, [DISK], 8, 32))  # ~64 KiB a batch
                await asyncio.sleep(0.03)  # ~2 MB/s a domain

        load_task = asyncio.create_task(load())
        try:
            await wait_until(lambda: all(dom.committed_seq > 0 for dom in d.domains.values()), RPO_RECOVERY_S,
                             "a first commit in both domains")
            for r in range(self.plan.rounds):
                await self._fault_round(d, r)
            stop.set()
            await load_task
            await self._drain(d, filters)
        finally:
            stop.set()
            await asyncio.gather(load_task, return_exceptions=True)
            client_task.cancel()
            await asyncio.gather(client_task, return_exceptions=True)
            await d.stop()
        for dom in d.domains.values():
            if dom.fenced:
                res.problem("false_fences", f"domain {dom.id} fenced with no other writer: {dom.stats.last_error}")
        if d.failure is not None:
            res.problem("daemon_crashes", f"a DRVA task failed: {d.failure!r}")
        await self._check_store(filters, disks)
        self.progress(f"{NAME}: {self.res.acked_checked} acknowledged seqs checked in the store")
        await self._recoveries(disks)

    async def _fault_round(self, d: Any, r: int) -> None:
        for b in self.backends:
            b.ingest.set_rates(INGEST_RATES)
            b.ingest.force(*INGEST_FORCED)
        for faulty in self.faulty.values():
            faulty.fail_next("put", 1, after=True)  # a put that lands, reported failed
            faulty.fail_next("put", 1)  # a put that fails
            faulty.set_error_rate("put", STORE_LOST_REPLY_RATE, seed=self.seed + r, after=True)
            faulty.set_error_rate("get", STORE_ERROR_RATE, seed=self.seed + r)
            faulty.set_error_rate("list", STORE_ERROR_RATE, seed=self.seed + r)
        lags: list[float] = []

        async def sample() -> None:
            while True:
                lags.append(max(dom.rpo_lag_s() for dom in d.domains.values()))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            # The faults last round_s: the wait is the point. Halfway, every PUT hangs a while.
            await asyncio.sleep(self.plan.round_s / 2)
            for faulty in self.faulty.values():
                faulty.hang("put")
                self.kinds["store_hang"] += 1
            await asyncio.sleep(STORE_HANG_S)
            for faulty in self.faulty.values():
                faulty.release("put")
            await asyncio.sleep(max(0.0, self.plan.round_s / 2 - STORE_HANG_S))
            # Then a storm: every request throttled, long enough for the RPO lag to climb
            # past what a healthy path shows, so that its coming back means something.
            for b in self.backends:
                b.ingest.set_rates({"error_503": 1.0})
            await asyncio.sleep(self.plan.storm_s)
        finally:
            for b in self.backends:
                b.ingest.clear()
            for faulty in self.faulty.values():
                faulty.clear()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        self.rpo_lag_max_s.append(round(max(lags, default=0.0), 2))
        off = time.monotonic()
        self.res.cases += 1
        try:
            await wait_until(lambda: all(dom.rpo_lag_s() < RPO_HEALTHY_S for dom in d.domains.values()
                                         if not dom.fenced), RPO_RECOVERY_S,
                             f"the RPO lag back under {RPO_HEALTHY_S} s")
            self.rpo_recovery_s.append(round(time.monotonic() - off, 2))
        except AssertionError as exc:
            lags = {dom.id: round(dom.rpo_lag_s(), 1) for dom in d.domains.values()}
            self.res.problem("failures", f"round {r}: {exc}: lags {lags}, last errors "
                             f"{[dom.stats.last_error for dom in d.domains.values()]}")
        self.progress(f"{NAME}: round {r + 1}/{self.plan.rounds}: faults so far {dict(self._faults())}, "
                      f"RPO lag at most {self.rpo_lag_max_s[-1]} s, back under {RPO_HEALTHY_S:g} s in "
                      f"{self.rpo_recovery_s[-1:]} s")

    async def _drain(self, d: Any, filters: list[Any]) -> None:
        def drained() -> bool:
            return all(f.acked_seq == f.next_seq - 1 and d.domains[f.domain].committed_seq >= f.acked_seq
                       for f in filters if not d.domains[f.domain].fenced)

        try:
            await wait_until(drained, DRAIN_S, "every captured write acknowledged and committed")
        except AssertionError as exc:
            state = {f.domain: (f.next_seq - 1, f.acked_seq, d.domains[f.domain].committed_seq) for f in filters}
            self.res.problem("failures", f"{exc}: (captured, acked, committed) {state}")

    async def _check_store(self, filters: list[Any], disks: list[Any]) -> None:
        """Read straight from the services: every acked seq committed, the replay exact."""
        await asyncio.gather(*(self._check_domain(*args) for args in zip(filters, disks, self.backends)))

    async def _check_domain(self, f: Any, disk: Any, b: Backend) -> None:
        store = b.store()
        try:
            head, generation = await load_catalog(store, f.domain)
            committed = 0 if head is None else CatalogView(store, head, generation).committed_seq
            self.res.acked_checked += f.acked_seq
            if committed < f.acked_seq:
                self.res.problem("lost", f"domain {f.domain} ({b.kind}): acknowledged up to seq {f.acked_seq}, "
                                 f"the catalog commits only {committed}", f.acked_seq - committed)
            if committed < f.next_seq - 1:
                # Not drained (reported): the primary holds writes the store does not have,
                # so neither the replay nor a recovery can be compared with it.
                self.undrained.add(f.domain)
                return
            try:
                await check_store(store, f.domain, [disk.sha256()], self.tmp)
            except (AssertionError, CdpError) as exc:
                self.res.problem("lost", f"domain {f.domain} ({b.kind}): the store's replay is not the "
                                 f"primary: {exc}")
        finally:
            await store.close()

    async def _recoveries(self, disks: list[Any]) -> None:
        """Recover each domain through its faulting proxy (the two side by side), as an
        operator would: again into the same directory (a resume) after a refusal, with
        fewer faults, the last attempt with none. Each attempt is exact or refused naming
        the object; the last is exact."""
        await asyncio.gather(*(self._recover_domain(domain, disk, b)
                               for domain, (disk, b) in enumerate(zip(disks, self.backends), start=1)))

    async def _recover_domain(self, domain: int, disk: Any, b: Backend) -> None:
        if domain in self.undrained:
            return
        direct = b.store()
        try:
            keys = {info.key async for info in direct.list("")}
        finally:
            await direct.close()
        expected = disk.sha256()
        for i in range(self.plan.recoveries):
            out = self.tmp / f"recovered-{domain}-{i}"
            try:
                for attempt in range(RECOVERY_ATTEMPTS):
                    if await self._recovery(domain, b, out, expected, keys, i, attempt):
                        break
            finally:
                shutil.rmtree(out, ignore_errors=True)
        self.progress(f"{NAME}: domain {domain} ({b.kind}): {self.plan.recoveries} recoveries, "
                      f"outcomes so far {dict(self.outcomes)}")

    async def _recovery(self, domain: int, b: Backend, out: Path, expected: str, keys: set[str], i: int,
                        attempt: int) -> bool:
        """One attempt; True when it ended (exact, or wrong: a failure counted)."""
        self.res.cases += 1
        last = attempt == RECOVERY_ATTEMPTS - 1
        seed = self.seed + 100 + 10 * i + attempt
        store = FaultyStore(b.store(b.ingest.port), seed=seed)
        if attempt == 0:
            b.ingest.set_rates(RECOVERY_RATES)
            b.ingest.force(*RECOVERY_FORCED)
            store.set_error_rate("get", STORE_ERROR_RATE, seed=seed)
        elif not last:
            b.ingest.set_rates(RECOVERY_RETRY_RATES)
        try:
            summary = await rocva_recover(store, domain, RecoverOptions("latest", out))
        except CdpError as exc:
            self._refused(domain, b, str(exc), keys)
            if last:
                self.res.problem("failures", f"domain {domain} ({b.kind}): recovery {i} refused with the faults "
                                 f"stopped: {exc}")
            return last
        finally:
            b.ingest.clear()
            self.kinds["store_injected"] += sum(store.injected.values())
            await store.close()
        got = [sha256_file(Path(im["path"])) for im in summary["images"]]
        if got == [expected]:
            self.outcomes[f"exact_at_attempt_{attempt + 1}"] += 1
        else:
            self.res.problem("failures", f"domain {domain} ({b.kind}): recovery {i} (attempt {attempt + 1}, "
                             f"resumed: {summary.get('resumed')}) through the faulting proxy gave a wrong image "
                             f"and raised nothing")
        return True

    def _refused(self, domain: int, b: Backend, message: str, keys: set[str]) -> None:
        named = any(k in message for k in keys) or re.search(r"l/recovery/[0-9a-f]{8}/[0-9a-f]{32}\.lock", message)
        if named:
            self.outcomes["refused_naming_the_object"] += 1
            self.refusals.append(message[:300])
        else:
            self.res.problem("failures", f"domain {domain} ({b.kind}): recovery refused without naming the "
                             f"object: {message[:300]}")

    # -- locks -------------------------------------------------------------

    async def locks(self) -> None:
        await asyncio.gather(*(self._lock_scenarios(b) for b in self.backends))

    async def _lock_scenarios(self, b: Backend) -> None:
        for i in range(self.plan.lock_scenarios):
            holder, other = b.store(b.locks.port, f"locks-{i}"), b.store(b.locks.port, f"locks-{i}")
            try:
                await self._lock_scenario(b, holder, other, i)
            except CdpError as exc:  # a store call failed past its retries: not a guarantee broken
                self.outcomes["lock_scenario_store_errors"] += 1
                self.progress(f"{NAME}: {b.kind} lock scenario {i}: {type(exc).__name__}: {exc}")
            finally:
                b.locks.clear()
                await holder.close()
                await other.close()

    async def _lock_scenario(self, b: Backend, holder: Any, other: Any, i: int) -> None:
        res = self.res
        res.cases += 1
        b.locks.force("lost_put_reply")  # the holder's conditional create lands, its answer is lost
        try:
            lease = await maintenance_lock(holder, LOCK_DOMAIN, owner="torture holder", ttl_s=LOCK_TTL_S,
                                           skew_s=LOCK_SKEW_S)
        except Busy as exc:
            res.problem("false_fences", f"{b.kind}: a lock whose create's answer was lost is refused to its "
                        f"own taker: {exc}")
            return
        self.outcomes["lock_taken_through_a_lost_reply"] += 1
        first_expiry = lease.expires_ns
        try:
            b.locks.set_rates(LOCK_RATES)
            b.locks.force("lost_put_reply")  # the holder's first renewal lands, its answer is lost
            res.cases += 1
            self.kinds["clock_skew"] += 1
            with _clock_ahead(LOCK_SKEW_S * 0.9):  # within the allowance: the lock is still live
                try:
                    taken = await maintenance_lock(other, LOCK_DOMAIN, owner="torture skewed, within",
                                                   ttl_s=LOCK_TTL_S, skew_s=LOCK_SKEW_S)
                except Busy:
                    self.outcomes["skew_within_refused"] += 1
                else:
                    res.problem("false_fences", f"{b.kind}: a process {LOCK_SKEW_S * 0.9:g} s ahead (allowance "
                                f"{LOCK_SKEW_S:g} s) took the live lock {lease.key}: {taken.key}")
                    await taken.release()
            two_renewals_ns = int(LOCK_TTL_S / 3 * 1.5 * 1e9)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: lease.lost is not None or lease.expires_ns - first_expiry >= two_renewals_ns,
                                 LOCK_TTL_S * 3, "two renewals of the holder's lease")
            res.cases += 1
            try:
                lease.check()
                if lease.expires_ns - first_expiry < two_renewals_ns:
                    res.problem("failures", f"{b.kind}: the holder's lease {lease.key} was not renewed twice "
                                f"in {LOCK_TTL_S * 3:g} s")
                else:
                    self.outcomes["lease_kept_through_faults"] += 1
            except LeaseLost as exc:
                res.problem("false_fences", f"{b.kind}: the holder lost its lease with nobody else holding it "
                            f"(faults {dict(b.locks.injected)}): {exc}")
                return
            res.cases += 1
            self.kinds["clock_skew"] += 1
            b.locks.set_rates({"slow_list": LOCK_RATES["slow_list"]})
            ahead = LOCK_TTL_S + LOCK_SKEW_S + 1.0
            with _clock_ahead(ahead):  # past the allowance: the store's clock says so (§11.1)
                try:
                    taken = await maintenance_lock(other, LOCK_DOMAIN, owner="torture skewed, past",
                                                   ttl_s=LOCK_TTL_S, skew_s=LOCK_SKEW_S)
                except ConfigError:
                    self.outcomes["skew_past_refused"] += 1
                else:
                    await taken.release()
                    res.problem("failures", f"{b.kind}: a process {ahead:g} s ahead of the store took {taken.key}")
                    return
            try:  # sees the live lock expired, as if its holder had stalled past its window
                taken = await maintenance_lock(other, LOCK_DOMAIN, owner="torture successor", ttl_s=LOCK_TTL_S,
                                               skew_s=-ahead)
            except Busy as exc:
                res.problem("failures", f"{b.kind}: a successor was refused an expired lock: {exc}")
                return
            try:
                try:
                    await wait_until(lambda: lease.lost is not None, LOCK_TTL_S, "the holder to see its lock taken")
                    lease.check()
                    res.problem("failures", f"{b.kind}: the holder's check() passes after losing {lease.key}")
                except LeaseLost:
                    self.outcomes["holder_saw_takeover"] += 1
                except AssertionError:
                    res.problem("failures", f"{b.kind}: two holders: {taken.key} taken, and {lease.key}'s holder "
                                f"still renews it {LOCK_TTL_S:g} s later")
            finally:
                await taken.release()
        finally:
            await lease.release()

    # -- figures -----------------------------------------------------------

    def _faults(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for b in self.backends:
            out.update(b.ingest.injected)
            out.update(b.locks.injected)
        for faulty in self.faulty.values():
            out["store_injected"] += sum(faulty.injected.values())
        return out


async def _campaign(run_: _Run, parts: tuple[str, ...]) -> None:
    moto, azurite = MotoServer(), Azurite()
    proxies: list[FaultProxy] = []
    saved_time = cdp.locks.time
    try:
        started = await asyncio.gather(asyncio.to_thread(moto.start), asyncio.to_thread(azurite.start),
                                       return_exceptions=True)  # both done before either is stopped
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        name = f"faults-{uuid.uuid4().hex[:12]}"
        for i, (kind, port) in enumerate((("s3", moto.port), ("azure", azurite.port))):
            ingest = await FaultProxy(port, kind, seed=run_.seed * 7 + i).start()
            locks = await FaultProxy(port, kind, seed=run_.seed * 7 + 10 + i).start()
            proxies += [ingest, locks]
            for p in (ingest, locks):
                p.timeout_s, p.slow_list_s = PROXY_TIMEOUT_S, SLOW_LIST_S
            run_.backends.append(Backend(kind, port, name, ingest, locks))
        for b in run_.backends:
            admin = b.store(prefix="")
            try:
                await (admin.create_bucket() if b.kind == "s3" else admin.create_container())
            finally:
                await admin.close()
        cdp.locks.time = _SkewedTime()
        run_.progress(f"{NAME}: moto on {moto.port}, Azurite on {azurite.port}, proxies up")
        jobs = []
        if "ingest" in parts:
            jobs.append(run_.ingest())
        if "locks" in parts:
            jobs.append(run_.locks())
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                run_.res.problem("failures", f"the campaign stopped: {type(outcome).__name__}: {outcome}")
    finally:
        cdp.locks.time = saved_time
        for p in proxies:
            await p.close()
        moto.stop()
        azurite.stop()


def run(quick: bool = False, seed: int = 14, progress: Callable[[str], None] = lambda s: None,
        parts: tuple[str, ...] = ("ingest", "locks"), plan: Plan | None = None) -> Result:
    """The campaign (its ``parts``), in the size ``quick`` says unless ``plan`` is given."""
    plan = plan or (QUICK if quick else LONG)
    res = Result(NAME)
    t0 = time.monotonic()
    # The DRVA, the SDKs and the leases log every fault they meet: with no handler set up
    # (the command line), Python would print each warning on stderr; keep them quiet.
    root = logging.getLogger()
    quiet = None if root.handlers else logging.NullHandler()
    if quiet is not None:
        root.addHandler(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="torture-store-") as tmp:
            run_ = _Run(plan, seed, progress, res, Path(tmp))
            asyncio.run(_campaign(run_, parts))
    finally:
        if quiet is not None:
            root.removeHandler(quiet)
    kinds = run_._faults() + run_.kinds
    res.faults = sum(kinds.values())
    res.elapsed_s = time.monotonic() - t0
    res.notes = {"faults": dict(sorted(kinds.items())), "outcomes": dict(run_.outcomes),
                 "refusals": run_.refusals[:10],
                 "rpo_lag_max_s": run_.rpo_lag_max_s, "rpo_recovery_s": run_.rpo_recovery_s,
                 "lock_faults": {b.kind: dict(b.locks.injected) for b in run_.backends},
                 "requests": {b.kind: dict(b.ingest.requests + b.locks.requests) for b in run_.backends}}
    return res
