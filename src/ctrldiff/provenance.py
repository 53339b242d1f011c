"""What a trained artefact was made by: the source files a module runs, found by reading its imports.

``import_closure("stages.finetune")`` is the stage's file and every ctrldiff module it imports,
directly or through others. The finetune checkpoint fingerprints their text (a fixed bug starts
afresh), and a test holds dvc.yaml's deps to the same list (a change reruns what it affects).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

PACKAGES = ("ctrldiff", "stages")  # our code; everything else is a pinned dependency


def _source(name: str) -> Path | None:
    """The file of module ``name`` if it is ours (found without importing anything), else None."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top) if top in PACKAGES else None
    if spec is None or not spec.submodule_search_locations:
        return None
    stem = Path(next(iter(spec.submodule_search_locations)), *rest)
    for path in (stem.with_suffix(".py"), stem / "__init__.py"):
        if path.is_file():
            return path
    return None  # `from module import function`: not a module


def import_closure(*modules: str) -> list[Path]:
    """The source files of ``modules`` and of every ctrldiff / stages module they import, sorted."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = _source(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return sorted(seen)


def source_hash(*modules: str) -> str:
    """Fingerprint of the text of ``import_closure(*modules)`` (file names and contents)."""
    digest = hashlib.sha256()
    for path in import_closure(*modules):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
