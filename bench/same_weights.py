"""Every shipped recipe compresses to the same bytes as before the speed work: `weights_sha256` then and now.

Speed changes must change time, not weights (issue 19). For each recipe in recipes/*.yaml this runs
`compress run` twice in fresh processes, once from a checkout of `--before` (a git revision, extracted with
`git archive` into a scratch folder) and once from this tree, and compares report.json's `weights_sha256` (the
digest of every compressed tensor the run would export). Each side runs its own copy of the recipe and the demo
model; a recipe that did not exist at `--before` is compared against `--before-new` (the first revision that
shipped it, given by the caller) or reported as new. Evaluation is cut to 2 windows: it does not touch the weights.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/same_weights.py --before d298d0d --before-new b1b3440^1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FAST_EVAL = "evaluate.perplexity[0].max_windows=2"


def extract(revision: str, into: Path) -> Path:
    """The tree of `revision` as plain files in `into` (no .git: nothing there can move this checkout)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def weights_digest(tree: Path, recipe: str, output: Path) -> str:
    """`weights_sha256` of one `compress run` of `tree`'s recipes/`recipe`, in a fresh process importing `tree`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree),
           "COMPRESS_CACHE_DIR": str(output.parent / "cache")}
    command = [sys.executable, "-m", "compress.cli.main", "run", str(tree / "recipes" / recipe), "--output",
               str(output), "--overwrite", "--json", "--no-checkpoints", "--set", FAST_EVAL]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
    return str(json.loads(done.stdout)["weights_sha256"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="d298d0d", help="the revision before the speed work")
    parser.add_argument("--before-new", default="", help="revision for recipes that --before did not ship")
    parser.add_argument("--recipes", nargs="*", default=sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
    parser.add_argument("--output", type=Path, default=RESULTS / "same_weights.md")
    args = parser.parse_args()
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    now_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="same-weights-") as scratch:
        trees = {rev: extract(rev, Path(scratch) / f"tree-{i}") for i, rev in enumerate(filter(None, [args.before, args.before_new]))}
        for recipe in args.recipes:
            before_rev = next((rev for rev, tree in trees.items() if (tree / "recipes" / recipe).exists()), None)
            before = weights_digest(trees[before_rev], recipe, Path(scratch) / "before" / recipe) if before_rev else "new"
            now = weights_digest(REPO, recipe, Path(scratch) / "now" / recipe)
            rows.append((recipe, before_rev or "—", before, now))
            print(f"{recipe}: {before[:16]} / {now[:16]}", flush=True)
    compared = [row for row in rows if row[2] != "new"]  # a recipe no earlier revision shipped has nothing to match
    same = sum(1 for *_, b, n in compared if b == n)
    lines = ["## Same weights after the speed work (bench/same_weights.py)", "",
             f"{started}; `compress run` of every shipped recipe from a checkout of the earlier revision and from "
             f"this tree ({now_rev}), fresh processes, evaluation cut to 2 windows (it does not touch the weights). "
             f"{same} of the {len(compared)} recipes an earlier revision shipped give the same `weights_sha256`"
             f"{f' ({len(rows) - len(compared)} new since)' if len(rows) > len(compared) else ''}.", "",
             "| recipe | earlier revision | weights_sha256 then | now | same |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {rev} | `{b[:16]}` | `{n[:16]}` | {'new' if b == 'new' else 'yes' if b == n else 'NO'} |"
              for r, rev, b, n in rows]
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    raise SystemExit(0 if same == len(compared) else 1)


if __name__ == "__main__":
    main()
