"""Compare the installed packages with the pins of constraints.txt, or rewrite the pins from them.

    python scripts/versions_moved.py constraints.txt          # print what moved (make test-latest)
    python scripts/versions_moved.py constraints.txt --write  # pin what is installed (make lock)

torch is left out on purpose: the Makefile's TORCH_SPEC picks it, so a CUDA build on a GPU box is never replaced.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

UNPINNED = {"torch", "compress", "pip", "setuptools", "wheel"}
HEADER = """\
# Versions the test suite is known to pass with: `make test` and `.ci/run` install inside these pins
# (pip install -c constraints.txt). pyproject.toml keeps ranges for users. `make test-latest` runs the suite on the
# newest allowed releases and lists what moved; `make lock` rewrites this file from .venv. torch comes from the
# Makefile's TORCH_SPEC instead, so a GPU box keeps its CUDA build.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}
    return {name: version for name, version in found.items() if name not in UNPINNED}


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def main() -> int:
    path = Path(sys.argv[1])
    now = installed()
    if "--write" in sys.argv:
        path.write_text(HEADER + "".join(f"{name}=={now[name]}\n" for name in sorted(now)))
        print(f"pinned {len(now)} packages in {path}")
        return 0
    pins = pinned(path) if path.exists() else {}
    moved = [(n, pins[n], now[n]) for n in sorted(now) if n in pins and pins[n] != now[n]]
    new = sorted(set(now) - set(pins))
    gone = sorted(set(pins) - set(now))
    print(f"{len(moved)} moved, {len(new)} new, {len(gone)} no longer installed, against {path}")
    for name, old, version in moved:
        print(f"  {name}: {old} -> {version}")
    for name in new:
        print(f"  {name}: new, {now[name]}")
    for name in gone:
        print(f"  {name}: {pins[name]}, no longer installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
