"""Record, or compare against a record, what every shipped recipe and benchmark scheme produces.

A restructuring must not change behaviour: the same recipe gives the same weights and the same numbers. This
script runs each case through the `compress` CLI (so it works on any commit, whatever the import names) and
keeps `weights_sha256` and every metric of `report.json`.

    python scripts/fingerprint.py record  fingerprints.json    # on the commit before the change
    python scripts/fingerprint.py compare fingerprints.json    # after it: exit 1 on any difference

Calibration is cut to 16 windows (`--samples`) and perplexity to 16 windows so a full pass takes minutes on a
laptop CPU; both commits run the very same settings, so the comparison is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
# The benchmark schemes (bench/schemes.py) as `passes:` lists, run on the demo recipe.
SCHEMES = {
    "rtn-w3": "[{rtn: {bits: 3, group_size: 128, symmetric: true}}]",
    "gptq-w4": "[{gptq: {bits: 4, group_size: 128, symmetric: true, damp: 0.01, block_size: 128, true_sequential: false}}]",
    "gptq-w3-ts": "[{gptq: {bits: 3, group_size: 128, symmetric: true, damp: 0.01, block_size: 128, true_sequential: true}}]",
    "awq-w4": "[{awq: {bits: 4, group_size: 128, symmetric: true, grid: 20}}]",
    "sq-w8a8": "[{smoothquant: {alpha: 0.5}}, {gptq: {bits: 8, group_size: null, damp: 0.01, true_sequential: false, "
               "activations: {bits: 8, per: token}}}]",
}


def cases(samples: int) -> dict[str, list[str]]:
    common = ["--set", f"calibration.samples={samples}", "--set", "evaluate.perplexity[0].max_windows=16"]
    found = {name: [name, *common] for name in RECIPES}
    found.update({f"scheme:{key}": ["demo", "--set", f"passes={passes}", *common] for key, passes in SCHEMES.items()})
    return found


def metrics_of(report: dict) -> dict:
    return {"weights_sha256": report["weights_sha256"], "metrics": report["metrics"], "size": report.get("size")}


def without_checkout_paths(value):
    """Data set paths name the checkout (/work/main/recipes/demo/eval.txt); compare them from `recipes/` on."""
    if isinstance(value, dict):
        return {key: without_checkout_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_checkout_paths(item) for item in value]
    if isinstance(value, str) and value.startswith("/") and "/recipes/" in value:
        return "<checkout>/recipes/" + value.split("/recipes/", 1)[1]
    return value


def run_case(args: list[str], scratch: Path) -> dict:
    out = scratch / "run"
    shutil.rmtree(out, ignore_errors=True)
    compress = shutil.which("compress", path=str(Path(sys.executable).parent)) or "compress"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([compress, "run", *args, "--output", str(out), "--quiet"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    return metrics_of(json.loads((out / "report.json").read_text()))


def main() -> int:
    mode, path = sys.argv[1], Path(sys.argv[2])
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
    results = {}
    with tempfile.TemporaryDirectory(prefix="compress-fingerprint-") as scratch:
        for name, args in cases(samples).items():
            if only and name not in only:
                continue
            results[name] = run_case(args, Path(scratch))
            print(f"{name}: {results[name].get('weights_sha256', results[name].get('error'))}", flush=True)
    if mode == "record":
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        return 0
    recorded = without_checkout_paths(json.loads(path.read_text()))
    results = without_checkout_paths(results)
    differ = [name for name in results if results[name] != recorded.get(name)]
    for name in differ:
        print(f"DIFFERS {name}:\n  before {json.dumps(recorded.get(name))[:600]}\n  after  {json.dumps(results[name])[:600]}")
    print(f"{len(results) - len(differ)} of {len(results)} cases identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
