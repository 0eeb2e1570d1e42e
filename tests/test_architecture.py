"""Layering promises of DESIGN.md that a refactor could silently break."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_federation_package_imports_flower():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "fedsecure").rglob("*.py")
                 if "federation" not in p.parts and any(n.split(".")[0] == "flwr" for n in _imports(p))]
    assert offenders == []


def test_library_never_imports_the_app_components():
    # server/ and client/ are thin Flower entry points; only the engines load them, lazily
    for p in (ROOT / "fedsecure").rglob("*.py"):
        bad = {n for n in _imports(p) if n.split(".")[0] in ("server", "client")}
        assert not bad or p.name == "engines.py", (p, bad)


def test_app_components_stay_thin():
    for p in (ROOT / "server" / "app.py", ROOT / "client" / "app.py"):
        assert len(p.read_text().splitlines()) < 100
