"""RocVA: point-in-time recovery of a protection domain from the object store alone.

::

    from rocva import RecoverOptions, Target, recover
    result = await recover(store, domain, RecoverOptions(Target.mark("app-quiesced"), "/srv/restore"))

Modules: ``target`` (``--seq/--mark/--at/--latest`` -> a checked seq, and the set of
recovery points), ``extents`` (vectorised last-writer resolution), ``plan`` (the
planner: bases, segment indexes, extents per disk), ``work_units`` (the plan cut into
units and groups), ``fetch`` (running units: ranged GETs of block runs and base chunks,
decoding, digests), ``image_writes`` (sparse pwrites, early write-out), ``recover`` (images, verification,
publication), ``recover_options`` (what a recovery is asked for, checked once),
``resume`` (the state file and what a resume must prove), ``destination`` (where a
recovery may write, and opening its directory without following links), ``errors``.
"""

import cdp  # noqa: F401 - first: it sets up the environment numpy is loaded in (cdp/__init__.py)
from rocva.errors import InconsistentPoint, InvalidTarget, OutsideRetention, RecoveryError
from rocva.plan import DiskPlan, RecoveryPlan, build_plan, plan_recovery
from rocva.recover import execute_plan, recover
from rocva.recover_options import RecoverOptionError, RecoverOptions
from rocva.target import ResolvedTarget, Target, recoverable_ranges, resolve_target

__all__ = [
    "DiskPlan", "InconsistentPoint", "InvalidTarget", "OutsideRetention", "RecoveryError",
    "RecoverOptionError", "RecoverOptions", "RecoveryPlan", "ResolvedTarget", "Target", "build_plan",
    "execute_plan", "plan_recovery",
    "recover", "recoverable_ranges", "resolve_target",
]
