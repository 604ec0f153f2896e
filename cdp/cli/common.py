"""What every ``cdp`` verb shares: the common options, printing a result for people or
as JSON, the progress bar, parsing sizes and durations, opening the store.

Nothing here imports a verb module, so the verb modules import from here and
``cdp.cli`` (the group) imports them: no cycle.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cdp.errors import ConfigError
from cdp.layout import U32_MAX
from cdp.store.base import ObjectStore
from cdp.tomlread import printable
from cdp.units import parse_size

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class FiniteRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and the infinities: click's lets NaN
    through (every comparison with it is false), and ``cdp verify --sample nan`` then
    deep-checked nothing and reported OK."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses an empty or blank path: click turns "" into
    ``Path(".")``, and ``cdp recover --to ""`` wrote its images into the current directory."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            blank = "an empty" if not value else "a blank"
            self.fail(f"{value!r} is {blank} path; give a path (\".\" for the current directory).", param, ctx)
        return super().convert(value, param, ctx)


def point_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--at, --seq, --mark, --latest: one recovery point (``one_point``)."""
    for option in reversed((
            click.option("--at", "at", default=None, help="A time: ISO 8601 (with zone) or relative, e.g. -15m."),
            click.option("--seq", "seq", type=int, default=None, help="A seq number."),
            click.option("--mark", "mark", default=None, help="A mark's name."),
            click.option("--latest", is_flag=True, help="The newest consistent point."))):
        f = option(f)
    return f


def one_point(at: str | None, seq: int | None, mark: str | None, latest: bool) -> Any:
    """The ``rocva.Target`` of ``point_options``; a usage error unless exactly one is given."""
    from rocva import Target

    chosen = [t for t in (at is not None and Target.at(at), seq is not None and Target.seq(seq),
                          mark is not None and Target.mark(mark), latest and Target.latest()) if t]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --at, --seq, --mark, --latest")
    return chosen[0]


def emit(as_json: bool, result: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    """``result`` as JSON (its control characters escaped by JSON), or as ``human`` writes
    it for people from ``result`` with every string's control characters escaped
    (``printable_doc``): much of it is a daemon's, a peer's or a record's text."""
    click.echo(json.dumps(result, sort_keys=True) if as_json else human(printable_doc(result)))


def printable_doc(value: Any) -> Any:
    """``value`` (JSON) with every string in it, keys too, through ``cdp.tomlread.printable``."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_doc(k): printable_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_doc(v) for v in value]
    return value


def parse_size_option(text: str) -> int:
    """'64MiB', '1G', '4096' -> bytes."""
    try:
        return parse_size(text, "size")
    except ConfigError as exc:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4096, 64MiB, 1GiB)") from exc


config_option = click.option(
    "--config", "config_path", envvar="CDP_CONFIG", required=True, type=NonEmptyPath(path_type=Path),
    help="The site file (see examples/site.toml; env CDP_CONFIG).")

store_option = click.option(
    "--store", "store_url", envvar="CDP_STORE", required=True,
    help="Object store URL: file:///path, s3://bucket/prefix, azure://container/prefix (env CDP_STORE).")


async def with_store(url: str, work: Callable[[Any], Any]) -> Any:
    from cdp.store import open_store

    store = open_store(url)
    try:
        return await work(store)
    finally:
        await store.close()


#: A domain id as a DOMAIN argument gives it: ASCII decimal digits only (``str.isdigit``
#: also takes "²" and "٣", which ``int`` then refused with a traceback, or read as 3).
_DOMAIN_ID_TEXT = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class DomainRef:
    """A DOMAIN argument: ``7`` or ``id:7`` (an id), ``erp`` or ``name:erp`` (a name).
    ``explicit`` when given with its prefix: the user said which, so it is never ambiguous.
    Cluster-file names cannot hold ':' (``cdp.tomlread.NAME``), so the prefixes clash with none."""

    text: str  # as given, for messages
    domain_id: int | None = None
    name: str | None = None
    explicit: bool = False


class DomainArg(click.ParamType):
    """The DOMAIN argument of the store verbs, parsed before the store is opened: a bad one
    is a usage error (exit 2), not a traceback."""

    name = "domain"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> DomainRef:
        if isinstance(value, DomainRef):
            return value
        text = str(value)
        prefix, colon, rest = text.partition(":")
        if colon and prefix == "name":
            if not rest:
                self.fail("name: needs a domain name after it (e.g. name:erp).", param, ctx)
            return DomainRef(text, name=rest, explicit=True)
        if colon and prefix == "id":
            return DomainRef(text, domain_id=self._domain_id(rest, text, param, ctx), explicit=True)
        if _DOMAIN_ID_TEXT.fullmatch(text) or text.isdigit():
            return DomainRef(text, domain_id=self._domain_id(text, text, param, ctx))
        if not text.strip():
            self.fail(f"{text!r} is not a domain id or name.", param, ctx)
        return DomainRef(text, name=text)

    def _domain_id(self, digits: str, text: str, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if not _DOMAIN_ID_TEXT.fullmatch(digits) or int(digits) > U32_MAX:
            self.fail(f"{text!r} is not a domain id: expected decimal digits 0-9, at most {U32_MAX} "
                      f"(a name: name:NAME).", param, ctx)
        return int(digits)


domain_argument = click.argument("domain", type=DomainArg())


async def domain_id_of(store: ObjectStore, domain: DomainRef) -> int:
    """The id a DOMAIN argument names (``DomainArg``): a name through
    ``cdp.catalog.find_domain``; a number is an id (README), without a walk of the store:
    the cluster file refuses numeric domain names, and ``name:7`` reaches one written
    before that."""
    from cdp.catalog import AmbiguousDomain, find_domain

    if domain.domain_id is not None:
        return domain.domain_id
    assert domain.name is not None, "a DomainRef holds an id or a name"
    try:
        found = await find_domain(store, domain.name)
    except AmbiguousDomain as exc:
        raise AmbiguousDomain(f"{exc.message}: give the one meant as id:N", exc.ids) from None
    if found is None:
        raise ConfigError(f"no domain named {domain.name!r} in {store.describe()}")
    return found[0]


def progress_bar(desc: str, as_json: bool) -> tuple[Any, Callable[[int, int], None]]:
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
               disable=as_json or not sys.stderr.isatty(), leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, update


def ns_text(ns: int | None) -> str:
    if ns is None:
        return "-"
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="milliseconds")


metadata_option = click.option(
    "--metadata", "metadata", type=NonEmptyPath(path_type=Path, dir_okay=False), multiple=True,
    help="A DRVA's metadata repository (its [meta] path; repeatable): a catalog older than what it "
         "last saw committed is reported as rolled back.")


def seen_from_metadata(paths: tuple[Path, ...], domain_id: int) -> tuple[Any, ...]:
    from rocva.integrity import seen_in_metadata

    found = (seen_in_metadata(p, domain_id, f"the DRVA metadata {p}") for p in paths)
    return tuple(s for s in found if s is not None)


timeline_option = click.option("--timeline", "timeline", type=click.IntRange(1, (1 << 32) - 1), default=None,
                               help="The timeline (default: the current one; see `cdp points`).")


def parse_duration_option(text: str | None, option: str, policy_key: str) -> float | None:
    """Seconds of a duration option, at most the upper bound of the MSA policy key it
    stands for (``cdp.msa.config.POLICY_LIMITS``: a verb run by hand is bounded as the
    daemon's job is); a usage error naming ``option`` otherwise. The bound keeps every
    instant computed from it (now minus it) an int the store's u64 times can hold: a
    400-digit value read as infinity and crashed the job on ``int(inf)``. The policy's
    lower bounds are not taken: ``--retention 0`` (keep nothing older than now) is a
    meaningful one-off run."""
    from cdp.msa.config import POLICY_LIMITS
    from cdp.units import parse_duration, shown_value

    if text is None:
        return None
    try:
        seconds = parse_duration(text, option)
    except ConfigError as exc:
        raise click.BadParameter(exc.message.removeprefix(f"{option}: "), param_hint=option) from exc
    cap = POLICY_LIMITS[policy_key][1]
    if seconds > cap:
        raise click.BadParameter(f"{shown_value(text)} is longer than {cap / 86400:g} days ({cap:.0f} s), the "
                                 f"longest allowed", param_hint=option)
    return seconds
