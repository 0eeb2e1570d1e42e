"""Layering promises of DESIGN.md that a refactor could silently break."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedsecure"

#: The library's layers, bottom up. A package may import only from its own layer and the layers below it;
#: one layer per row, so any import from a later row is an upward import and fails the test.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_durable"),  # the exception tree; durable files, canonical JSON, hash chains
    ("config",),  # typed sections; imports nothing of fedsecure but errors
    ("audit",),  # the hash-chained audit log
    ("data",),  # datasets, tokenizer, synthetic notes
    ("model",),  # base models, LoRA, adapter state
    ("crypto",),  # sealed files, keys
    ("store",),  # keyrings, run directory, a site's state: sealed-or-plain decided once
    ("privacy",),  # accounting, ledger, site policy and guard, noise, client-level DP
    ("training",),  # local steps and DP-SGD
    ("attestation",),  # evidence, policy, round protocol, one module per TEE
    ("transport",),  # the update codec and its session
    ("secagg",),  # secure aggregation: the protocol, its sites' and coordinator's sides (no Flower)
    ("reports", "observe"),  # documents for people; the Prometheus endpoint for operators
    ("federation",),  # Flower glue: the only Flower importer
    ("launch",),  # simulation, engines, deployment processes, certificates
    ("cli",),  # wiring of the command line; nothing imports it
]
LAYER_OF = {name: i for i, row in enumerate(LAYERS) for name in row}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _library_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py")


def test_every_library_package_has_a_layer():
    missing = sorted({_package_of(p) for p in _library_modules()} - set(LAYER_OF) - {"__init__"})
    assert missing == [], f"add {missing} to LAYERS"


def test_imports_point_down_the_layers_only():
    upward = []
    for path in _library_modules():
        own = _package_of(path)
        if own == "__init__":
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "fedsecure" or len(parts) < 2:
                continue
            target = parts[1]
            if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {name} ({own} -> {target})")
    assert upward == []


def test_the_layer_test_can_fail():
    # the same check, on a module that imports upward: it is found
    tree = ast.parse("from fedsecure.federation.site import handle_train\n")
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert any(LAYER_OF[n.split(".")[1]] > LAYER_OF["privacy"] for n in names)


def test_only_the_federation_package_imports_flower():
    offenders = [str(p.relative_to(ROOT)) for p in _library_modules()
                 if _package_of(p) != "federation" and any(n.split(".")[0] == "flwr" for n in _imports(p))]
    assert offenders == []


def test_library_never_imports_the_app_components():
    # server/ and client/ are thin Flower entry points; only the engines load them, lazily
    for p in _library_modules():
        bad = {n for n in _imports(p) if n.split(".")[0] in ("server", "client")}
        assert not bad or p.relative_to(PACKAGE).as_posix() == "launch/engines.py", (p, bad)


def test_app_components_stay_thin():
    for p in (ROOT / "server" / "app.py", ROOT / "client" / "app.py"):
        assert len(p.read_text().splitlines()) < 100


def test_only_the_coordinators_records_feed_metrics():
    """The metrics and InfluxDB settings travel in the run config, which a site also receives: no site code may act
    on them (a coordinator's run config must not make a site open an endpoint or push figures anywhere)."""
    users = sorted(str(p.relative_to(PACKAGE)) for p in _library_modules()
                   if any(n.startswith("fedsecure.observe") and n != "fedsecure.observe.hardware" for n in _imports(p))
                   and p.parent.name != "observe")
    # the coordinator's records; the site supervisors (deployment, simulation) that feed a site's own endpoint
    # from its events file, with the site's own settings (site.yaml), never with a run config's
    assert users == ["federation/bookkeeping.py", "launch/deploy.py", "launch/simulate.py"], users
    # the site code reads only its GPUs' energy counter (EnergyMeter), and serves nothing
    site_uses = {n for p in (PACKAGE / "federation").glob("site*.py") for n in _imports(p)
                 if n.startswith("fedsecure.observe")}
    assert site_uses <= {"fedsecure.observe.hardware"}, site_uses
    assert "serve(" not in (PACKAGE / "federation" / "site.py").read_text()
    for p in (PACKAGE / "federation").glob("site*.py"):
        assert ".metrics" not in p.read_text(), p


def test_no_library_file_is_over_400_lines():
    big = {str(p.relative_to(ROOT)): n for p in _library_modules() if (n := len(p.read_text().splitlines())) > 400}
    assert big == {}


# --------------------------------------------------------------------------- one name for each fact
#: Names the ε budget went by before it had one (``epsilon_budget``). The ledger still reads format-1 entries
#: written by earlier releases under their old field name, in exactly one place (``_FORMAT1_FIELDS``).
OLD_EPSILON_NAMES = re.compile(r"\b(target_epsilon|budget_epsilon|max_epsilon)\b|privacy\.epsilon(?![_\w])")


def _text_files() -> list[Path]:
    roots = [PACKAGE, ROOT / "server", ROOT / "client", ROOT / "configs", ROOT / "docs"]
    return [p for r in roots for p in r.rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()]


def test_the_epsilon_budget_has_one_name():
    hits = []
    for p in [*_text_files(), ROOT / "README.md"]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if OLD_EPSILON_NAMES.search(line) and "_FORMAT1_FIELDS = " not in line:
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []


def test_node_config_keys_are_defined_only_in_keys_py():
    # a site's node config is its SiteSettings flattened under keys.SITE_PREFIX (names from the dataclass
    # fields); Flower's own keys and the prefix are spelled out only in federation/keys.py, and no code
    # reads a node config with a key literal
    literal = re.compile(r"""["'](partition-id|num-partitions|site-name|data-dir|state-dir|worker-socket|"""
                         r"""attestation-provider|dataset-id)["']|node_config(\.get\(|\[)\s*["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _library_modules() if p.name != "keys.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert hits == []


@pytest.mark.parametrize("needle", ["from fedsecure.fsutil", "OBSERVERS"])
def test_removed_seams_stay_removed(needle):
    assert not [p for p in _library_modules() if needle in p.read_text()]


def test_the_readme_module_map_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in section.splitlines():
        cells = [c.strip() for c in row.split("|")]
        if len(cells) > 3 and cells[1].startswith("`fedsecure/"):
            folder = cells[1].strip("`")
            listed |= {folder + m for m in re.findall(r"`([\w]+\.py)`", cells[2])}
    on_disk = {p.relative_to(ROOT).as_posix() for p in _library_modules() if p.name != "__init__.py"}
    assert listed == on_disk, (sorted(on_disk - listed), sorted(listed - on_disk))
