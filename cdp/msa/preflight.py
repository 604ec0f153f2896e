"""Preflight checks: the seed's Invoke-PreflightJetDRSystemCheck, Invoke-PreflightJetDRInstall
and Invoke-PreflightJetDRUninstall.

Each preflight runs a list of checks and changes nothing that matters: the only writes
are a probe object in the store (deleted again) and a scratch file beside each log
partition (deleted again) to time ``fdatasync``. A check is ``pass``, ``warn`` (works,
but look at it) or ``fail`` (install / the DRVAs would not work); a preflight is ``ok``
when nothing failed. A check that cannot run at all (an I/O error, an unreachable store)
is a failure of that check, never an exception out of the preflight.

- ``preflight_system``: Python and the modules the engine imports; the secrets the site
  needs (names only); the store reachable and writable (put, get, compare, delete a
  probe) with latencies; the store's clock against ours (store locks tolerate
  ``SKEW_DEFAULT_S`` of skew: fail above it, warn above ``SKEW_WARN_S``); per DRVA, its
  log partition (present, or room to create it; size), ``fdatasync`` latency where it
  lives, and its metadata repository.
- ``preflight_install``: the site and cluster files agree; each protected domain's VMs
  and hosts; the simulated disk images; name clashes (DRVAs, VMs, hosts; two DRVAs on
  one port); the directories install writes in are ours alone (``dirs``: the check
  install makes first); the ports free (DRVAs by convention on 32873–32878); no
  installation of another site in the store nor in the state directory.
- ``preflight_uninstall``: the installation (deployment record, daemon); the state
  directory ours alone (``dirs``); what uninstall would remove — the partitions the
  install record names, still the files install made — and what it keeps (every other
  partition, and each domain's objects unless ``--purge``, or even then when another
  site owns them).

A directory ``dirs`` refuses is reported there only: a check that would read in it (the
state directory's installation and pid file, the TLS directory, the install record) is
not run, as install and uninstall stop before reading it; the ports are checked without
asking the daemon.

The parts, one job each::

    preflight_check             Check, running the steps, the report, the probes all three share
    preflight_system_checks     preflight_system: runtime, secrets, the stores, each DRVA's partitions
    preflight_install_checks    preflight_install: site and cluster files, names, dirs, ports, TLS
    preflight_uninstall_checks  preflight_uninstall: the installation, what is removed and what kept

This module keeps the names callers import from it (``preflight_system``, ``Check``,
``check_tls``, ...), re-exported below.
"""

from __future__ import annotations

from cdp.msa.preflight_check import (
    STATUSES, STORE_OP_TIMEOUT_S, Check, Progress, format_checks, format_size, summarize,
)
from cdp.msa.preflight_install_checks import (
    check_disk_images, check_dirs, check_domains, check_installation, check_local_state, check_names,
    check_ports, check_site, check_tls, preflight_install,
)
from cdp.msa.preflight_system_checks import (
    CLOCK_SAMPLES, FSYNC_SAMPLES, FSYNC_WARN_P99_S, FSYNC_WRITE_BYTES, LOG_SIZE_WARN, META_BYTES, MODULES,
    PROBE_BYTES, PYTHON_MIN, SKEW_FAIL_S, SKEW_WARN_S, check_clock, check_fsync, check_log_partition, check_meta,
    check_modules, check_peer_store, check_runtime, check_secrets, check_store, check_store_writable,
    preflight_system,
)
from cdp.msa.preflight_uninstall_checks import (
    Verdicts, check_kept_data, check_removal, check_site_removal, check_state_dirs, preflight_uninstall,
)

__all__ = [
    "CLOCK_SAMPLES", "FSYNC_SAMPLES", "FSYNC_WARN_P99_S", "FSYNC_WRITE_BYTES", "LOG_SIZE_WARN", "META_BYTES",
    "MODULES", "PROBE_BYTES", "PYTHON_MIN", "SKEW_FAIL_S", "SKEW_WARN_S", "STATUSES", "STORE_OP_TIMEOUT_S",
    "Check", "Progress", "Verdicts", "check_clock", "check_dirs", "check_disk_images", "check_domains",
    "check_fsync", "check_installation", "check_kept_data", "check_local_state", "check_log_partition",
    "check_meta", "check_modules", "check_names", "check_peer_store", "check_ports", "check_removal",
    "check_runtime", "check_secrets", "check_site", "check_site_removal", "check_state_dirs", "check_store",
    "check_store_writable", "check_tls", "format_checks", "format_size", "preflight_install",
    "preflight_system", "preflight_uninstall", "summarize",
]
