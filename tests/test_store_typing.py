"""Every parameter that takes an object store says so: a parameter named ``store`` or
``*_store`` in the library and the benchmarks is annotated, and its annotation names
``ObjectStore`` (``cdp.store.base``: the one contract every backend and wrapper meets),
read from the source with ``ast``. The few parameters of that name that hold something
else are listed in ``NOT_STORES``, each with the reason. (A lambda's parameters cannot be
annotated, and are not checked.)"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("cdp", "rocva", "drva", "iofilter_sim", "benchmarks")

#: (file, function's qualified name, parameter) -> why it is not typed ObjectStore.
NOT_STORES = {
    ("cdp/site_files.py", "site", "store"): "the site file's store directory name (a str)",
    ("cdp/testing/drva_config.py", "drva_doc", "store"): "a DRVA configuration's store URL (a str)",
    ("cdp/msa/jobs.py", "Job.__init__", "store"): "the MSA's job records (a JobStore), not an object store",
    ("cdp/msa/jobs.py", "run_job", "store"): "the MSA's job records (a JobStore), not an object store",
    ("cdp/msa/runner.py", "JobRunner.__init__", "store"): "the MSA's job records (a JobStore), not an object store",
    ("cdp/store/crypt.py", "Unopened.__init__", "store"): "the EncryptedStore whose sealed pages these are "
                                                         "(opened with its private key material)",
    ("benchmarks/nbd.py", "build_result", "store"): "the store directory's byte counts by kind (a dict)",
    ("benchmarks/storage.py", "store_bytes_by_kind", "store"): "a file store's directory (a Path)",
}


def is_store_name(name: str) -> bool:
    return name == "store" or name.endswith("_store")


def store_parameters(path: Path) -> Iterator[tuple[int, str, str, ast.expr | None]]:
    """(line, function's qualified name, parameter, annotation) of every parameter of a
    function (or method, at any depth) in ``path`` named ``store`` or ``*_store``."""

    def walk(node: ast.AST, scope: tuple[str, ...]) -> Iterator[tuple[int, str, str, ast.expr | None]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = ".".join((*scope, child.name))
                a = child.args
                for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
                    if arg is not None and is_store_name(arg.arg):
                        yield arg.lineno, qualname, arg.arg, arg.annotation
                yield from walk(child, (*scope, child.name))
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, (*scope, child.name))
            else:
                yield from walk(child, scope)

    yield from walk(ast.parse(path.read_text(), str(path)), ())


def untyped_stores() -> tuple[list[str], set[tuple[str, str, str]]]:
    """The offending parameters as ``file:line: function(parameter: annotation)``, and the
    ``NOT_STORES`` entries that were seen."""
    bad, seen = [], set()
    for d in DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, qualname, name, annotation in store_parameters(path):
                if (rel, qualname, name) in NOT_STORES:
                    seen.add((rel, qualname, name))
                    continue
                text = None if annotation is None else ast.unparse(annotation)
                if text is None or "ObjectStore" not in text:
                    bad.append(f"{rel}:{line}: {qualname}({name}: {text or 'no annotation'})")
    return bad, seen


def test_every_store_parameter_is_typed_object_store():
    bad, _ = untyped_stores()
    assert not bad, ("store parameters not typed ObjectStore (annotate them, or add a non-store one to "
                     "NOT_STORES with the reason):\n" + "\n".join(bad))


def test_every_exception_still_exists():
    _, seen = untyped_stores()
    stale = sorted(set(NOT_STORES) - seen)
    assert not stale, "NOT_STORES entries that match no parameter any more:\n" + "\n".join(map(str, stale))
