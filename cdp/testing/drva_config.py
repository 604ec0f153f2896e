"""DRVA configurations for the tests and the benchmarks: the site secret they share,
free local ports (``cdp.ports.free_port``), a DRVA's configuration document and its
domains, written as TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdp.ports import free_port  # noqa: F401  (the tests and benchmarks take it from here)

SECRET = "test-site-secret-0123456789"


def drva_doc(tmp: Path, name: str, domains: list[dict], *, port: int = 0, store: str | None = None,
             log_size: str = "64MiB", seal_bytes: str = "4MiB", seal_age_s: float = 0.3,
             **extra: Any) -> dict[str, Any]:
    d = tmp / name
    doc = {
        "name": name, "listen": f"127.0.0.1:{port}", "state_dir": str(d),
        "store": store or f"file://{tmp / 'store'}",
        "log": {"path": str(d / "replog"), "size": log_size}, "meta": {"path": str(d / "meta")},
        "seal": {"bytes": seal_bytes, "age_s": seal_age_s}, "domains": domains,
    }
    doc.update(extra)
    return doc


def domain_doc(domain_id: int, name: str, disks: list[tuple[str, str, int]]) -> dict[str, Any]:
    return {"id": domain_id, "name": name,
            "disks": [{"vm": vm, "name": dn, "size": size} for vm, dn, size in disks]}


def write_toml(doc: dict[str, Any], path: Path) -> Path:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        return "[" + ", ".join(val(x) for x in v) + "]"
    lines = [f"{k} = {val(v)}" for k, v in doc.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
