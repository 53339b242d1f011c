"""Rewrite every stage's code deps in the DVC pipelines to the import closure of the modules it runs.

    python tools/sync_deps.py [dvc.yaml ...]   # default: every dvc.yaml of the repository

Data deps (anything not under src/ or stages/) are kept as written, and every stage but
`validate_params` gets that stage's output (so DVC validates params.yaml before it removes any output);
tests/test_pipeline.py checks the result. Only the `deps: [...]` flow lists are rewritten, so comments
elsewhere survive.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the `stages` package, as DVC runs it from the root

from ctrldiff.provenance import import_closure  # noqa: E402
from stages.validate_params import VALID  # noqa: E402


def modules(cmd: str) -> list[str]:
    words = shlex.split(cmd.replace("${run}", "python -m"))
    return [
        words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m" and words[i + 1].startswith("stages.")
    ]


def wrap(items: list[str], indent: int, width: int = 110) -> str:
    lines, line = [], "deps: ["
    pad = " " * indent
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "]")
        if len(pad) + len(line) + len(piece) + 1 > width and not line.endswith("["):
            lines.append(line.rstrip())
            line = " " * 7 + piece + " "
        else:
            line += piece + " "
    lines.append(line.rstrip())
    return ("\n" + pad).join(lines)


def sync(pipeline: Path) -> None:
    text = pipeline.read_text()
    wdir_default = pipeline.parent
    out, pos = [], 0
    for m in re.finditer(r"^( *)cmd: (>-\n(?:\1  .*\n)+|.*\n)", text, flags=re.M):
        cmd = " ".join(line.strip() for line in m.group(2).removeprefix(">-\n").splitlines())
        deps = re.compile(r"^( *)deps: \[([^\]]*)\]", re.M).search(text, m.end())
        if not deps or not modules(cmd):
            continue
        wdir = re.search(r"wdir: (\S+)", text[max(0, m.start() - 200) : m.start()])
        base = (wdir_default / wdir.group(1)).resolve() if wdir else wdir_default.resolve()
        # A study's command runs in the root (`cd ../.. && python ...`), beside the params.yaml it checks.
        runs_in = re.match(r"cd (\S+) && ", cmd)
        valid = os.path.relpath((base / runs_in.group(1)) / VALID, base) if runs_in else VALID
        items = [d.strip() for d in deps.group(2).replace("\n", " ").split(",") if d.strip()]
        keep = [d for d in items if not re.match(r'"?(\.\./)*(src|stages)/', d) and d != valid]
        if "stages.validate_params" not in modules(cmd):
            keep.insert(0, valid)  # written where the stage runs, beside the params.yaml it validates
        code = set()
        for module in modules(cmd):
            code |= {
                os.path.relpath(p, base)
                for p in import_closure(module)
                if p.name != "__init__.py" or "guidance" in p.parts or "solvers" in p.parts
            }
        out.append(text[pos : deps.start()])
        out.append(deps.group(1) + wrap(keep + sorted(code), len(deps.group(1))))
        pos = deps.end()
    out.append(text[pos:])
    pipeline.write_text("".join(out))


if __name__ == "__main__":
    os.chdir(ROOT)
    targets = [Path(a) for a in sys.argv[1:]] or sorted(
        p.relative_to(ROOT) for p in ROOT.glob("**/dvc.yaml") if ".venv" not in p.parts
    )
    for t in targets:
        sync(ROOT / t)
        print(f"synced {t}")
