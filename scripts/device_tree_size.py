"""How many bytes a ``run`` call on the lent GPU would send: the working tree that travels against its 64 MiB limit.

The device tool copies the tracked files, the untracked files git does not ignore, ``shared/`` and the ``carry``
paths (``/work/.library/device/README.md``); over 64 MiB it refuses the call. Run this before a device call:

    python scripts/device_tree_size.py --carry .carry        # exit 1, with the largest folders, when over

Without the carry folder at hand (a clean checkout, CI), ``--assume-carry-mib`` counts what it would add
(``scripts/gpu_carry.sh`` writes about 2.8 MiB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

LIMIT_BYTES = 64 * 1024 * 1024
MIB = 1024 * 1024


def travelling_files(root: Path) -> list[Path]:
    """Tracked files plus untracked files git does not ignore, as the device tool copies them."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return [root / p for p in out.decode().split("\0") if p and (root / p).is_file()]


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(root: Path, carry: list[str], assume_carry_mib: float) -> dict[str, Any]:
    """Bytes by part (tree, shared/, carry) and the tree's largest folders (each zoo model on its own)."""
    files = travelling_files(root)
    by_folder: Counter[str] = Counter()
    for f in files:
        rel = f.relative_to(root).parts
        depth = 4 if rel[:3] == ("mmeff", "zoo", "models") else 3 if rel[0] == "mmeff" else 2
        by_folder["/".join(rel[:depth])] += f.stat().st_size
    tree = sum(by_folder.values())
    shared = folder_bytes(root / "shared") if (root / "shared").is_dir() else 0
    present = [c for c in carry if (root / c).exists()]
    carried = sum(folder_bytes(root / c) for c in present)
    if not present:
        carried = int(assume_carry_mib * MIB)
    total = tree + shared + carried
    return {"limit_bytes": LIMIT_BYTES, "total_bytes": total, "tree_bytes": tree, "shared_bytes": shared,
            "carry_bytes": carried, "carry_measured": bool(present), "fits": total <= LIMIT_BYTES,
            "headroom_mib": round((LIMIT_BYTES - total) / MIB, 2),
            "largest": [[k, v] for k, v in by_folder.most_common(8)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--carry", nargs="*", default=[".carry"], help="the carry paths of the planned call")
    ap.add_argument("--assume-carry-mib", type=float, default=2.9,
                    help="MiB to count for the carry when none of its paths exists here")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    a = ap.parse_args(argv)
    m = measure(a.root, a.carry, a.assume_carry_mib)
    print(json.dumps(m, indent=1))
    if not m["fits"]:
        print(f"the device call would send {m['total_bytes'] / MIB:.1f} MiB (limit 64): ship smaller files, gzip "
              "superseded results, or carry less (scripts/gpu_carry.sh)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
