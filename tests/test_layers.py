"""The layers of DESIGN.md §1, kept by a test: every import of every module of `fieldsync`
(inside functions and `TYPE_CHECKING` blocks too) points down the diagram, and reaches another
subpackage only through its `__init__`, never through one of its private modules."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fieldsync

PACKAGE = Path(fieldsync.__file__).parent

# What each layer may import besides itself, from the bottom of the diagram up. A layer is a
# subpackage (`storage`) or a top-level module (`records`); `fieldsync` is the package's own
# `__init__` (its version). `errors` holds the error codes, shared like `records`; `rates`,
# `periodic` and `config` (the settings) are helpers that import nothing above that vocabulary.
EVERYTHING = frozenset({"*"})  # the modules that wire it all together
VOCABULARY = {"records", "errors"}
HELPERS = {"rates", "periodic", "config", "logs", "hints"}
MAY_IMPORT: dict[str, frozenset[str]] = {
    "fieldsync": frozenset(),
    "records": frozenset(),
    "errors": frozenset(),
    "rates": frozenset(),
    "periodic": frozenset(),
    "logs": frozenset(),
    "hints": frozenset(),  # commit hints between nodes (Redis), below everything
    "config": frozenset(VOCABULARY),
    "storage": frozenset({"records"}),
    "documents": frozenset(VOCABULARY),
    "auth": frozenset(VOCABULARY),
    "replication": frozenset({"auth", "documents", "storage", *VOCABULARY, *HELPERS}),
    "attachments": frozenset({"auth", "documents", "storage", *VOCABULARY, *HELPERS}),
    "api": frozenset(
        {"replication", "attachments", "auth", "documents", "storage", "fieldsync"}
        | VOCABULARY
        | HELPERS
    ),
    # `replication` only through its package surface (the write path's public face), as the
    # private-module rule below says of every layer; never `api`.
    "adapters": frozenset({"replication", "documents", "storage", *VOCABULARY, *HELPERS}),
    "client": frozenset({"replication", "fieldsync", *VOCABULARY}),  # a device's side
    # Backup and restore of the embedded data folder: the database file and the attachments'
    # content files, below the running server.
    "backup": frozenset({"attachments"}),
    "app": EVERYTHING,
    "cli": EVERYTHING,
    "admin": EVERYTHING,  # the operators' commands of `cli`
    "__main__": EVERYTHING,
    "demo": EVERYTHING,
}
# Beyond the standard library, the documents know only the CRDT library (and orjson, to read a
# root's JSON at once): no web framework, no database.
THIRD_PARTY = {"documents": frozenset({"pycrdt", "orjson"})}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module: "fieldsync.api._audit"
    target: str  # the module it imports from: "fieldsync.storage"
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE) -> Iterator[Import]:
    """Every import statement of the file, wherever it stands, relative ones resolved. For
    `from p import x`, the target is `p.x` when `x` is a module of ours (`from fieldsync import
    documents`) or a private name (`from p import _x` reaches into p as `p._x` does)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                hidden = alias.name.startswith("_") and not alias.name.endswith("__")
                inner = hidden or is_module(name, root)
                yield Import(module, name if inner else base, node.lineno)


def is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def all_imports(root: Path = PACKAGE) -> list[Import]:
    return [found for path in sorted(root.rglob("*.py")) for found in imports(path, root)]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward(found: Import) -> bool:
    """`found` reaches a layer its own may not import."""
    if found.target.split(".")[0] != "fieldsync":
        return False
    source, target = layer(found.module), layer(found.target)
    allowed = MAY_IMPORT[source]
    return source != target and allowed is not EVERYTHING and target not in allowed


def private(found: Import) -> bool:
    """`found` reaches into a private module of another subpackage (`fieldsync.x._y`)."""
    parts = found.target.split(".")
    return (
        len(parts) > 2
        and parts[0] == "fieldsync"
        and parts[2].startswith("_")
        and layer(found.module) != parts[1]
    )


def foreign(found: Import) -> bool:
    """`found` is a library beyond the standard one that its layer may not use."""
    allowed = THIRD_PARTY.get(layer(found.module))
    top = found.target.split(".")[0]
    return (
        allowed is not None
        and top not in allowed
        and top != "fieldsync"
        and top not in sys.stdlib_module_names
    )


def test_every_layer_is_in_the_table() -> None:
    layers = {layer(module_name(path, PACKAGE)) for path in PACKAGE.rglob("*.py")}
    assert layers - MAY_IMPORT.keys() == set(), "a new layer: say in MAY_IMPORT what it may use"


def test_the_readme_names_every_layer() -> None:
    """The README's layout names every subpackage and top-level module, and no other."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("Layout of `fieldsync/`:", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+)(?:\.py)?`", layout))
    layers = {layer(module_name(path, PACKAGE)) for path in PACKAGE.rglob("*.py")}
    assert layers - {"fieldsync", "__main__"} == named - {"fieldsync"}


def test_imports_point_down_the_diagram() -> None:
    wrong = [str(found) for found in all_imports() if upward(found)]
    assert wrong == [], "imports up the diagram of DESIGN.md §1:\n" + "\n".join(wrong)


def test_subpackages_are_used_through_their_surface() -> None:
    reaching = [found for found in all_imports() if private(found)]
    wrong = [str(found) for found in reaching]
    assert wrong == [], "private modules of another subpackage:\n" + "\n".join(wrong)


def test_the_documents_use_no_library_but_pycrdt() -> None:
    wrong = [str(found) for found in all_imports() if foreign(found)]
    assert wrong == [], "\n".join(wrong)


def test_imports_are_found_wherever_they_stand(tmp_path: Path) -> None:
    """Inside a `TYPE_CHECKING` block, inside a function, relative: each is seen and judged."""
    planted = tmp_path / "fieldsync" / "storage" / "_planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import _sqlite\n"
        "if TYPE_CHECKING:\n"
        "    from fieldsync.api import ApiRoutes\n"
        "def later():\n"
        "    import fieldsync.replication\n"
        "    from ..auth import _policy\n"
        "    from ..documents import Scratch\n"
        "    import aiohttp\n"
    )
    found = sorted(all_imports(tmp_path / "fieldsync"), key=lambda i: i.line)
    assert [(i.target, upward(i), private(i)) for i in found] == [
        ("typing", False, False),
        ("fieldsync.storage._sqlite", False, False),
        ("fieldsync.api", True, False),
        ("fieldsync.replication", True, False),
        ("fieldsync.auth._policy", True, True),
        ("fieldsync.documents", True, False),
        ("aiohttp", False, False),
    ]
    as_documents = Import("fieldsync.documents._x", "aiohttp", 1)
    assert foreign(as_documents)
    assert not foreign(Import("fieldsync.documents._x", "pycrdt", 1))
