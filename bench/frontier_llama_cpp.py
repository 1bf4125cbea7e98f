"""llama.cpp's IQ-type (and k-quant) quantization of a model, dequantized back into Hugging Face weight names, for
bench/frontier.py to score with our own perplexity code.

    python bench/frontier_llama_cpp.py          # IQ2_XS of the demo model: bits/weight, tensor types, perplexity

The F16 GGUF is our writer's (bench/llama_cpp_quantize.f16_gguf), the importance matrix `llama-imatrix -c 512
--chunks N` on the calibration text, then `llama-quantize --imatrix`. Every 2-D decoder tensor (blk.*) of the
result is dequantized with gguf-py (`gguf.quants.dequantize`, which covers IQ1_S ... IQ4_XS), its q/k rows put back
from GGML's rotary layout into Hugging Face's (the inverse of gguf_format._row_order), and named by its HF module.
Bits per weight count the bytes llama-quantize actually stored for those tensors, whatever type it chose for each
(it bumps some, e.g. attn_v and ffn_down, above the requested type).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llama_cpp_quantize import f16_gguf  # noqa: E402
from tests.export.test_gguf_llama_cpp import llama_cpp_bin  # noqa: E402

DEMO = REPO / "recipes" / "demo"
SEQ_LEN = 512


def _tool(tool: str, *args: str) -> None:
    """A llama.cpp tool from scripts/llama_cpp.sh's build, looked up when called (the build may finish after import)."""
    bin_dir = llama_cpp_bin()
    if bin_dir is None:
        raise RuntimeError("no finished llama.cpp build: run scripts/llama_cpp.sh first")
    done = subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")


def _hf_names(model_dir: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """GGUF tensor name -> HF module fqn for the decoder linears, and the inverse row order of each tensor the writer
    permuted (q/k on Llama-family models), keyed by GGUF name; only the config is read (the model is built on the
    meta device)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.export.gguf_format import _arch_enum, _architecture, _row_order

    config = AutoConfig.from_pretrained(model_dir)
    arch, permute = _architecture(config)
    names = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    to_hf, inverse = {}, {}
    for fqn, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or fqn == "lm_head":
            continue
        gguf_name = names.get_name(fqn)  # e.g. model.layers.0.self_attn.q_proj -> blk.0.attn_q
        if gguf_name is None or not gguf_name.startswith("blk."):
            continue
        to_hf[f"{gguf_name}.weight"] = fqn
        rows = _row_order(f"{fqn}.weight", module.out_features, config) if permute else None
        if rows is not None:  # written[i] = original[rows[i]]  =>  original = written[argsort(rows)]
            inverse[f"{gguf_name}.weight"] = np.argsort(rows)
    return to_hf, inverse


def read_dequantized(path: Path, model_dir: Path) -> tuple[dict[str, torch.Tensor], float, dict[str, int]]:
    """The decoder linears of a GGUF file as {HF fqn: float32 (out, in)}, their stored bits per weight and the
    count of each tensor type among them."""
    import gguf
    from gguf.quants import dequantize

    to_hf, inverse = _hf_names(model_dir)
    weights, stored, elements, types = {}, 0, 0, {}
    for tensor in gguf.GGUFReader(path).tensors:
        if not tensor.name.startswith("blk.") or len(tensor.shape) != 2:
            continue
        if tensor.name not in to_hf:
            raise KeyError(f"{path}: no Hugging Face module for {tensor.name}")
        columns, rows = (int(n) for n in tensor.shape)  # GGML order: ne0 (the input dimension) first
        matrix = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(rows, columns)
        if tensor.name in inverse:
            matrix = matrix[inverse[tensor.name]]
        weights[to_hf[tensor.name]] = torch.from_numpy(np.ascontiguousarray(matrix))
        stored += int(tensor.n_bytes)
        elements += int(tensor.n_elements)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    missing = set(to_hf.values()) - set(weights)
    if missing:
        raise KeyError(f"{path}: no tensor for {sorted(missing)}")
    return weights, 8 * stored / elements, types


def llama_cpp_quantized(model_dir: Path, calib_text: Path, quant_type: str, folder: Path,
                        chunks: int = 128) -> tuple[Path, float]:
    """`llama-quantize --imatrix` of the model at `quant_type`, written in `folder`; returns the file and the
    seconds spent in llama-imatrix + llama-quantize (the F16 conversion not counted)."""
    threads = str(os.cpu_count() or 2)
    source = f16_gguf(model_dir, folder / "f16")
    imatrix, out = folder / "imatrix.gguf", folder / "out.gguf"
    start = time.perf_counter()
    _tool("llama-imatrix", "-m", str(source), "-f", str(calib_text), "-o", str(imatrix), "-c", str(SEQ_LEN),
          "--chunks", str(chunks), "-t", threads, "--no-ppl")
    _tool("llama-quantize", "--imatrix", str(imatrix), str(source), str(out), quant_type, threads)
    return out, time.perf_counter() - start


def llama_cpp_dequantized_with_types(model_dir: Path, calib_text: Path, quant_type: str, chunks: int = 128
                                     ) -> tuple[dict[str, torch.Tensor], float, float, dict[str, int]]:
    """As `llama_cpp_dequantized`, plus the count of each tensor type llama-quantize chose for the decoder linears."""
    with tempfile.TemporaryDirectory(prefix="compress-bench-llama-cpp-") as scratch:
        out, seconds = llama_cpp_quantized(Path(model_dir), Path(calib_text), quant_type, Path(scratch), chunks)
        weights, bits, types = read_dequantized(out, Path(model_dir))
    return weights, seconds, bits, types


def llama_cpp_dequantized(model_dir: Path, calib_text: Path, quant_type: str, chunks: int = 128
                          ) -> tuple[dict[str, torch.Tensor], float, float]:
    """llama.cpp's `quant_type` (IQ2_XS, IQ2_XXS, IQ3_XXS, Q2_K, ...) of the model with an importance matrix from
    `calib_text`: ({HF fqn of each decoder linear: float32 (out, in) dequantized weight}, seconds of llama-imatrix +
    llama-quantize, bits per weight actually stored for those linears)."""
    weights, seconds, bits, _types = llama_cpp_dequantized_with_types(model_dir, calib_text, quant_type, chunks)
    return weights, seconds, bits


def main() -> None:
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.engine.data import tokenize_text
    from compress.evaluators.perplexity import perplexity_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="IQ2_XS")
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--model", type=Path, default=DEMO / "model")
    parser.add_argument("--calib", type=Path, default=DEMO / "calib.txt")
    parser.add_argument("--eval", type=Path, default=DEMO / "eval.txt")
    args = parser.parse_args()

    weights, seconds, bits, types = llama_cpp_dequantized_with_types(args.model, args.calib, args.type, args.chunks)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tokenizer, args.eval.read_text(encoding="utf-8"))
    device = torch.device("cpu")
    reference = perplexity_of(model, ids, SEQ_LEN, 8, device, max_windows=128)[0]
    errors = []
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            original = modules[name].weight
            errors.append(float((weight - original).norm() / original.norm()))
            original.copy_(weight)
    quantized = perplexity_of(model, ids, SEQ_LEN, 8, device, max_windows=128)[0]
    print(f"{args.type}: {len(weights)} linears, {bits:.4f} bits/weight, types "
          f"{', '.join(f'{n} {t}' for t, n in sorted(types.items()))}")
    print(f"relative Frobenius error: mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")
    print(f"perplexity: float32 {reference:.4f}, {args.type} {quantized:.4f} ({100 * (quantized / reference - 1):+.2f}%)")
    print(f"imatrix + quantize: {seconds:.1f} s (load average {load})")


if __name__ == "__main__":
    main()
