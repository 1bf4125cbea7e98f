"""The size of report.html for a 32-layer model: a narrow (64-wide) random-weight Llama, 32 decoder layers,
through GPTQ W4 and through the bit allocator + GPTQ, so every chart the page draws is there with 32 rows.

    PYTHONPATH=. python bench/report_page.py      # writes bench/results/report_page.md

The page's size depends on the layer and module count (one cell per module per chart), not on the widths, so
a narrow model stands for a wide one of the same depth.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compress.app.builtins  # noqa: E402,F401
from compress.app.runner import run_recipe  # noqa: E402
from compress.recipe.schema import load_recipe  # noqa: E402
from tests.conftest import recipe_text  # noqa: E402
from tests.tiny_models import save_tiny_model, synthetic_text  # noqa: E402

LAYERS = 32
PASSES = {
    "gptq": "  - gptq: {bits: 4, group_size: 32}",
    "pruning + gptq": "  - wanda: {sparsity: 0.5}\n  - gptq: {bits: 4, group_size: 32}",
    "mixed precision": "  - allocate: {sensitivity: io_similarity, candidates: [2, 4, 8], budget: {avg_bits: 4.5}}\n"
                       "  - gptq: {bits: 4, group_size: 32}",
}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = save_tiny_model(root / "model", "llama", layers=LAYERS)
        text = root / "text.txt"
        text.write_text(synthetic_text(), encoding="utf-8")
        for name, passes in PASSES.items():
            recipe = root / f"{len(rows)}.yaml"
            recipe.write_text(recipe_text(model, text, passes, text) + "report: {new_tokens: 16}\n", encoding="utf-8")
            start = time.perf_counter()
            run_recipe(load_recipe(recipe), root / f"run{len(rows)}")
            page = (root / f"run{len(rows)}" / "report.html").stat().st_size
            rows.append((name, page, time.perf_counter() - start))
    load = os.getloadavg()[0]
    lines = ["## report.html size at 32 decoder layers", "",
             f"A random-weight Llama, {LAYERS} decoder layers, hidden 64 (224 linears); 16 new tokens for 3 prompts. "
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, load {load:.1f}.", "",
             "| recipe | report.html bytes | MiB |", "|---|---:|---:|"]
    lines += [f"| {name} | {size:,} | {size / 2**20:.2f} |" for name, size, _ in rows]
    out = ROOT / "bench" / "results" / "report_page.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
