"""Who may import what: the benchmarks and the library never import the test tree, and
the library's own code never imports ``cdp.testing`` (the helpers shared by the tests and
the benchmarks), read from the source with ``ast``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("cdp", "drva", "rocva", "iofilter_sim")


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, statement, modules) of every import in ``path``, at any depth (a function's
    too): the modules it names, a relative import resolved against the file's package,
    and ``from a import b`` naming ``a`` and ``a.b`` (``b`` may be a module)."""
    package = list(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, ast.unparse(node), [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, ast.unparse(node), [module] + [f"{module}.{alias.name}" for alias in node.names]


def offending(dirs: tuple[str, ...], package: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``file:line: statement`` for every import of ``package`` (or a module in it) by a
    .py file under ``dirs`` (except those under ``skip``)."""
    found = []
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel.startswith(s + "/") for s in skip):
                continue
            for line, statement, modules in sorted(imports(path)):
                if any(m == package or m.startswith(package + ".") for m in modules):
                    found.append(f"{rel}:{line}: {statement}")
    return found


def test_no_benchmark_or_library_module_imports_the_tests():
    bad = offending(("benchmarks",) + LIBRARY, "tests")
    assert not bad, "imports of the test tree:\n" + "\n".join(bad)


def test_no_library_module_imports_cdp_testing():
    bad = offending(LIBRARY, "cdp.testing", skip=("cdp/testing",))
    assert not bad, "imports of cdp.testing outside it:\n" + "\n".join(bad)
