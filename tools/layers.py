"""Which cdsam folders import which, read from the code (ast, no imports run), and whether
that keeps to the layers docs/architecture.md draws.

    python tools/layers.py            # the folder graph as a mermaid diagram (docs/architecture.md)
    python tools/layers.py --check    # exit 1 naming every import that crosses a layer upwards

A folder may import the shared top-level modules and the folders listed for it in ALLOWED;
evaluation never imports training, so the evaluate stage's code deps hold no trainer module.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cdsam"
TOP = "top"  # the shared modules at cdsam/ itself: errors, io, runtime, distributed, ...
ENTRY = ("cdsam.cli", "cdsam.presets", "cdsam.__init__")  # entry points: may import anything

ALLOWED: dict[str, set[str]] = {
    TOP: set(),
    "config": {TOP},
    "data": {TOP, "config"},
    "models": {TOP, "config", "data"},
    "evaluation": {TOP, "config", "data", "models", "inference"},
    "inference": {TOP, "config", "data", "models"},
    "training": {TOP, "config", "data", "models", "evaluation"},
}


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else TOP


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts)


def imports(path: Path) -> set[str]:
    """cdsam modules ``path`` imports at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cdsam."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cdsam":
                found.update(f"cdsam.{a.name}" for a in node.names
                             if (PACKAGE / f"{a.name}.py").is_file())
            elif node.module.startswith("cdsam."):
                found.add(node.module)
    return found


def edges() -> dict[tuple[str, str], list[str]]:
    """(from folder, to folder) -> the importing modules, for every cross-folder import."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        if src in ENTRY:
            continue
        for dst in imports(path):
            a, b = folder_of(src), folder_of(dst)
            if a != b:
                out[(a, b)].append(f"{src} -> {dst}")
    return out


def violations() -> list[str]:
    return [line for (a, b), lines in sorted(edges().items())
            if b not in ALLOWED.get(a, set()) for line in lines]


def mermaid() -> str:
    lines = ["flowchart BT"]
    for (a, b), found in sorted(edges().items()):
        lines.append(f"  {a} -->|{len(found)}| {b}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        bad = violations()
        for line in bad:
            print(f"import against the layers: {line}", file=sys.stderr)
        return 1 if bad else 0
    print(mermaid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
