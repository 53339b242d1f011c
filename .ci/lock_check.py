"""Is every dvc.lock current for the code and params it records?  (CI step; exit 1 when not)

The committed metrics are what the committed code computes: for every stage of the root pipeline
and of every study (studies/*/dvc.yaml), DVC's own status must find its recorded code deps
(files in the checkout), params and command unchanged. Deps and outputs that do not exist here
(data/, models/: a clean clone has none) are not failures. A stage with no lock entry records no
hashes to compare: it is listed as never run (so a pipeline not yet reproduced is visible) but does
not fail the check. (paper/ needs Stable Diffusion weights and
GPUs; CI runs its wiring on tiny stand-ins instead.)

Usage: python .ci/lock_check.py [REPO]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

NOT_HERE = {"deleted"}  # a dependency absent from this checkout: data or models of a clean clone


def stale_reasons(entries: list) -> list[str]:
    """Why one stage's `dvc status` entries make it stale (empty: current)."""
    reasons = []
    for entry in entries:
        if isinstance(entry, str):  # "changed command", "always changed"
            reasons.append(entry)
            continue
        for path, change in entry.get("changed deps", {}).items():
            if isinstance(change, dict):  # a params file: {key: "modified" | "new" | "deleted"}
                reasons += [f"param {key} {how}" for key, how in change.items()]
            elif change not in NOT_HERE:
                reasons.append(f"{path} {change}")
    return reasons


def main(root: str = ".") -> int:
    root = Path(root).resolve()
    pipelines = ["dvc.yaml", *sorted(str(p.relative_to(root)) for p in root.glob("studies/*/dvc.yaml"))]
    recorded = set()
    for pipeline in pipelines:
        lock = (root / pipeline).with_name("dvc.lock")
        prefix = "" if pipeline == "dvc.yaml" else f"{pipeline}:"
        if lock.is_file():
            recorded |= {prefix + name for name in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})}
    with Repo(str(root)) as repo:
        status = repo.status(targets=pipelines)
        stages = [s for p in pipelines for s in repo.stage.collect(p)]
    never = sorted(name for name in status if name not in recorded)
    stale = {
        name: why for name, entries in status.items() if name in recorded and (why := stale_reasons(entries))
    }
    for name in never:
        print(f"never run: {name}")
    for name, why in sorted(stale.items()):
        print(f"stale: {name}: {', '.join(why[:8])}" + (" ..." if len(why) > 8 else ""))
    print(f"lock check: {len(stale)} of {len(stages)} stages stale, {len(never)} never run")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
