"""Quality against bytes below 4 bits on the demo model: perplexity and KL divergence against bits per weight for
RTN, GPTQ and signround (ours) and the peers AutoRound and HQQ, at W2 g64 / g128, W3 g128 and W4 g128.

    python bench/frontier.py                                  # writes bench/results/frontier.md, a row as each ends
    python bench/frontier.py --only rtn,gptq --configs 3:128  # a subset
    PEER_PYTHON=/work/venv-autoround/bin/python python bench/frontier.py   # the venv with auto-round and hqq

Protocol: the same 128 calibration windows of 512 tokens (recipes/demo/calib.txt, seed 0) for every calibrated
method, peers included; perplexity and KL (evaluators/kl_divergence.py, top_k 128) on the demo eval text and on
WikiText-2 test (../shared/data, out of domain), disjoint 512-token windows. Peers' dequantized weights are loaded
into our model and scored with the same code. Bits per weight: every bit of the quantized decoder linears (codes,
16-bit scales, zero points) over their weights, from our size accounting (`UniformAffine.planned_bits`; HQQ stores
a 16-bit scale and zero per group, counted as such). Seconds are wall-clock of the quantization alone, with the
machine's load beside them: on a shared machine they are not timings to quote.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import compress.app.builtins  # noqa: E402,F401
from compress.app.runner import run_passes  # noqa: E402
from compress.recipe.schema import parse_recipe  # noqa: E402
from compress.engine.context import RunContext, RunInputs  # noqa: E402
from compress.engine.data import contiguous_windows, sample_windows, tokenize_text  # noqa: E402
from compress.engine.model_io import load_model  # noqa: E402
from compress.evaluators.kl_divergence import KLDivergenceConfig, compare_to_baseline, record_baseline  # noqa: E402
from compress.evaluators.perplexity import perplexity_of  # noqa: E402
from compress.quant.modules import find_linears, weight_matrix  # noqa: E402
from compress.quant.primitives import PerGroup, QuantSpec  # noqa: E402
from compress.quant.records import UniformAffine  # noqa: E402

DEMO = REPO / "recipes" / "demo"
SHARED = Path(os.environ.get("COMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
OUTPUT = REPO / "bench" / "results" / "frontier.md"
CONFIGS = [(2, 64), (2, 128), (3, 128), (4, 128)]
METHODS = ["rtn", "gptq", "signround", "gptq+lorc", "signround+lorc", "squeezellm", "squeezellm+lorc", "mixed+gptq",
           "mixedlut+gptq", "mixed+signround", "autoround", "hqq"]
SEQ_LEN = 512


def texts() -> dict[str, str]:
    found = {"demo eval": (DEMO / "eval.txt").read_text(encoding="utf-8")}
    wiki = SHARED / "wikitext2_raw" / "wiki.test.raw"
    if wiki.is_file():
        found["WikiText-2 test"] = wiki.read_text(encoding="utf-8")
    return found


def our_passes(method: str, bits: int, group: int, lorc_bits: float) -> str:
    """The recipe's pass list for one of our methods, `[mixed|mixedlut+]quantizer[+lorc]`: squeezellm is per-row
    tables of 2^bits entries (no groups, no outliers); `mixed` puts an `allocate` pass first choosing per module
    among integer widths 2 / 3 / 4 at this group size (`mixedlut`: and per-row tables lut:2 / lut:3 / lut:4, which
    gptq fills by Hessian-weighted k-means), by Hessian-trace costs and the ILP, under `bits` + 0.25 bits per
    weight less the correction's share when `+lorc` follows; `+lorc` adds `lorc_bits` per weight of low-rank
    correction after the quantizer."""
    parts = method.split("+")
    quantizer = next(p for p in parts if p in ("rtn", "gptq", "signround", "squeezellm"))
    passes = [f"{{squeezellm: {{bits: {bits}, outliers: 0.0}}}}" if quantizer == "squeezellm"  # tables per row, no groups
              else f"{{{quantizer}: {{bits: {bits}, group_size: {group}}}}}"]
    if "lorc" in parts:
        passes.append(f"{{lorc: {{bits_per_weight: {lorc_bits}}}}}")
    if "mixed" in parts or "mixedlut" in parts:
        budget = bits + 0.25 - (lorc_bits if "lorc" in parts else 0.0)
        candidates = '2, 3, 4, "lut:2", "lut:3", "lut:4"' if "mixedlut" in parts else "2, 3, 4"
        # 4 windows and 8 probes for the Hessian traces, as bench/llama_cpp_quantize.py: the costs rank the
        # candidates; more windows change few choices and cost minutes of backward passes
        passes.insert(0, f"{{allocate: {{candidates: [{candidates}], samples: 4, max_probes: 8, "
                         f"budget: {{avg_bits: {budget:.4f}}}}}}}")
    return "[" + ", ".join(passes) + "]"


def ours(method: str, bits: int, group: int, calib: torch.Tensor, lorc_bits: float = 0.0):
    """Our passes on a fresh demo model, through the recipe path users run: (handle, seconds, bits per weight of
    the quantized linears from their records: codes, scales, zero points, low-rank factors)."""
    recipe = parse_recipe(f"calibration: {{dataset: calib.txt, samples: {len(calib)}, seq_len: {SEQ_LEN}}}\n"
                          f"passes: {our_passes(method, bits, group, lorc_bits)}\n",
                          filename="<bench frontier>", base_dir=DEMO)
    handle = load_model(str(DEMO / "model"))
    run = RunContext(RunInputs(device=handle.device, calibration=calib, calibration_batch_size=8))
    start = time.perf_counter()
    run_passes(handle, recipe.passes, run)
    seconds = time.perf_counter() - start
    records = run.results.records.values()
    bits_total = sum(r.storage_bits().total for r in records)
    return handle, seconds, bits_total / sum(r.shape[0] * r.shape[1] for r in records)


def peer(method: str, bits: int, group: int, calib: torch.Tensor):
    """A peer in its own venv; its dequantized linears loaded into our model."""
    from safetensors import safe_open

    python = os.environ.get("PEER_PYTHON", "/work/venv-autoround/bin/python")
    with tempfile.TemporaryDirectory() as folder:
        windows, output = Path(folder) / "calib.pt", Path(folder) / "deq.safetensors"
        torch.save(calib, windows)
        subprocess.run([python, str(REPO / "bench" / "frontier_peer.py"), method, "--bits", str(bits), "--group-size",
                        str(group), "--model", str(DEMO / "model"), "--windows", str(windows), "--output", str(output)],
                       check=True)
        handle = load_model(str(DEMO / "model"))
        linears = find_linears(handle.layers, handle.layers_prefix)
        with safe_open(str(output), "pt") as file:
            seconds = float(file.metadata()["seconds"])
            for name in file.keys():
                weight_matrix(linears[name]).copy_(file.get_tensor(name))
    spec = QuantSpec(bits, method == "autoround", PerGroup(group))  # AutoRound's default grid is symmetric
    total = weights = 0
    for module in linears.values():
        rows, columns = weight_matrix(module).shape
        weights += rows * columns
        total += (rows * columns * bits + rows * -(-columns // group) * 32 if method == "hqq"
                  else UniformAffine.planned_bits(rows, columns, spec).total)
    return handle, seconds, total / weights


def llama_cpp(quant_type: str, samples: int):
    """llama-quantize's `quant_type` with an importance matrix from the calibration text (bench/frontier_llama_cpp.py),
    dequantized by the gguf package into our model; bits per weight are the bytes its file stores for the linears."""
    from frontier_llama_cpp import llama_cpp_dequantized

    weights, seconds, bits = llama_cpp_dequantized(DEMO / "model", DEMO / "calib.txt", quant_type, chunks=samples)
    handle = load_model(str(DEMO / "model"))
    linears = find_linears(handle.layers, handle.layers_prefix)
    for name, weight in weights.items():
        weight_matrix(linears[name]).copy_(weight)
    return handle, seconds, bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(METHODS))
    parser.add_argument("--configs", default=",".join(f"{b}:{g}" for b, g in CONFIGS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--lorc-bits", type=float, default=0.1, help="bits per weight of the +lorc rows' corrections")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--max-windows", type=int, default=128, help="evaluation windows per text, from its start")
    args = parser.parse_args()
    methods = args.only.split(",")
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    base = load_model(str(DEMO / "model"))
    calib = sample_windows(tokenize_text(base.tokenizer, (DEMO / "calib.txt").read_text()), args.samples, SEQ_LEN, 0)
    # the first --max-windows disjoint windows of each text (WikiText-2 test holds ~600: four passes over it per row
    # would be most of the bench's time)
    evals = {label: tokenize_text(base.tokenizer, text)[: args.max_windows * SEQ_LEN] for label, text in texts().items()}
    kl_cfg = KLDivergenceConfig(dataset="-", seq_len=SEQ_LEN, top_k=128)
    baselines = {label: record_baseline(base.model, contiguous_windows(ids, SEQ_LEN), kl_cfg, base.device)
                 for label, ids in evals.items()}
    fp = {label: perplexity_of(base.model, ids, SEQ_LEN, 8, base.device)[0] for label, ids in evals.items()}
    load = os.getloadavg()
    lines = [
        "## Below 4 bits: perplexity and KL against bits per weight (demo model)", "",
        f"{datetime.date.today()}, torch {torch.__version__}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"(a shared machine: the seconds are not timings to quote). {args.samples} calibration windows of {SEQ_LEN} "
        "tokens; KL(baseline || compressed) with the baseline's top 128 tokens plus one bucket (a lower bound; see "
        f"evaluators/kl_divergence.py), on the first {args.max_windows} disjoint windows of each text. fp32: " + ", ".join(f"{k} ppl {v:.3f}" for k, v in fp.items()) + ".", "",
        "| method | bits | group | bits/weight | " + " | ".join(f"{k} ppl | {k} KL | {k} top-1" for k in evals)
        + " | seconds | load |",
        "|---|---|---|---|" + "---|---|---|" * len(evals) + "---|---|",
    ]
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for bits, group in configs:
        for method in methods:
            try:
                if method in ("autoround", "hqq"):
                    handle, seconds, bpw = peer(method, bits, group, calib)
                elif method.startswith("llama.cpp:"):  # e.g. llama.cpp:IQ2_XS: its own type and group, imatrix
                    handle, seconds, bpw = llama_cpp(method.removeprefix("llama.cpp:"), args.samples)
                else:
                    handle, seconds, bpw = ours(method, bits, group, calib, args.lorc_bits)
            except Exception as exc:  # a peer that fails is a row saying so, not a missing row
                lines.append(f"| {method} | {bits} | {group} | — | failed: {type(exc).__name__}: {str(exc)[:80]} |")
                args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
                continue
            cells = []
            for label, ids in evals.items():
                ppl = perplexity_of(handle.model, ids, SEQ_LEN, 8, handle.device)[0]
                kl = compare_to_baseline(handle.model, contiguous_windows(ids, SEQ_LEN), kl_cfg, handle.device,
                                         baselines[label])
                cells.append(f"{ppl:.3f} | {kl.mean_kl:.4f} | {kl.top1_agreement:.3f}")
            lines.append(f"| {method} | {bits} | {group} | {bpw:.3f} | " + " | ".join(cells)
                         + f" | {seconds:.0f} | {os.getloadavg()[0]:.1f} |")
            args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")  # a row as soon as it is known
            print(lines[-1], flush=True)
    for records in baselines.values():
        records.remove()


if __name__ == "__main__":
    main()
