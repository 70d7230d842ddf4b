"""The layer rule: a module imports only from its own layer or the layers below it.

Read from the source (every `import`, also those inside functions), so a lazy import
that pulls a higher layer in fails here as well. The layers are those of the
architecture: tokenizer < model < data < engines (train, infer) < methods (eval, ...)
< applications (serve, cli, ...); `errors`, `options` and `io` are the base everyone
may use; `lmforge.api` and the package root only re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

LAYERS = {
    "errors": 0, "options": 0, "io": 0,
    "tokenizer": 1,
    "model": 2,
    "data": 3,
    "train": 4, "infer": 4,
    "eval": 5, "tune": 5, "align": 5, "rag": 5, "guard": 5, "agent": 5, "vlm": 5, "interpret": 5,
    "serve": 6, "assistant": 6, "monitor": 6, "cli": 6,
    "api": 7, "__init__": 7, "__main__": 7,
}
ROOT = Path(lmforge.__file__).parent


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, list[str]]]:
    """(line, dotted name as parts) of every lmforge module that `path` (or `source` placed there) imports."""
    source = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, str(path))
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts)[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if len(target) == 1 and target[0] == "lmforge":  # `from lmforge import x`: x is the module
                found += [(node.lineno, ["lmforge", alias.name]) for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name[0] == "lmforge"]


def layer_of(parts: list[str]) -> int:
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"lmforge.{top} is in no layer: add it to LAYERS (and to the architecture)"
    return LAYERS[top]


def test_every_import_goes_down_or_sideways():
    violations = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 100
    for path in files:
        own = layer_of(module_name(path))
        for line, target in imported_modules(path):
            if layer_of(target) > own:
                violations.append(f"{path.relative_to(ROOT.parent)}:{line} imports {'.'.join(target)}")
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def test_the_checker_sees_relative_lazy_and_package_imports():
    source = ("from . import config\nfrom .config import ModelConfig\n"
              "def f():\n    from ..serve import app\n    import lmforge.cli\n    from lmforge import api\n")
    found = [".".join(n) for _, n in imported_modules(ROOT / "model" / "probe.py", source)]
    assert found == ["lmforge.model", "lmforge.model.config", "lmforge.serve", "lmforge.cli", "lmforge.api"]
    assert [layer_of(n.split(".")) > LAYERS["model"] for n in found] == [False, False, True, True, True]


def test_layer_packages_hold_no_command_line_code():
    stray = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
             if p.parent.name != "cli" and (p.name == "commands.py" or p.name.startswith("cli_")
                                            or "add_subparsers" in p.read_text(encoding="utf-8"))]
    assert not stray, f"command-line code outside lmforge/cli: {stray}"
