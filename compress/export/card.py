"""The model card (README.md) every export writes: recipe, metrics, how to load it, which runtimes read it."""

from __future__ import annotations

from typing import Any

import yaml

# Verified here: transformers 5.23 + compressed-tensors 0.20 load and run the export on CPU. vLLM could not be
# installed on the CPU-only machine that wrote this; vLLM 0.33.0's package metadata pins compressed-tensors==0.17.0.
VLLM_NOTE = (
    "vLLM reads `quantization_config` (`quant_method: compressed-tensors`, `format`, `config_groups[*].targets`, "
    "`weights.{num_bits,type,symmetric,strategy,group_size}`, `input_activations.{strategy,dynamic}`, `ignore`, "
    "`sparsity_config`) and the tensors `weight_packed`, `weight_scale`, `weight_shape`, `weight_zero_point`. "
    "Its WNA16 kernels take 4- and 8-bit weight groups (2/3-bit groups load in transformers only); int8 W8A8 "
    "uses its W8A8 kernels. Written by compressed-tensors {version}; vLLM releases pin their own "
    "compressed-tensors (vLLM 0.33.0 pins 0.17.0), and the 4/8-bit packing is the same in both. Not run in vLLM here."
)

LOAD = {
    "compressed-tensors": (
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")  # needs `pip install compressed-tensors`\n```\n\n"
        "```console\n$ vllm serve {path}\n$ python -c \"from vllm import LLM; print(LLM('{path}').generate('def main():'))\"\n```"
    ),
    "gptq": (
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")  # needs `pip install optimum gptqmodel`\n```\n\n"
        "```console\n$ vllm serve {path} --quantization gptq\n```"
    ),
    "dense": "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{path}\")\n```",
    "bitsandbytes": (
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(\"{path}\")  # needs `pip install bitsandbytes`\n```"
    ),
    "gguf": (
        "```console\n$ llama-cli -m {path}/model.gguf -p \"Once upon a time\"\n"
        "$ llama-perplexity -m {path}/model.gguf -f text.txt\n```\n\n"
        "```python\nfrom llama_cpp import Llama  # pip install llama-cpp-python\nllm = Llama(\"{path}/model.gguf\")\n```"
    ),
}


def _metric_lines(report: dict[str, Any] | None) -> list[str]:
    if not report or not report.get("metrics"):
        return ["No metrics were recorded for this run."]
    lines = ["| metric | dataset | baseline | compressed |", "|---|---|---:|---:|"]
    for metric, per_dataset in report["metrics"].items():
        for label, values in per_dataset.items():
            lines.append(f"| {metric} | {label} | {values.get('baseline', float('nan')):.4f} | "
                         f"{values.get('compressed', float('nan')):.4f} |")
    size = report.get("size")
    if size:
        quantized = size.get("quantized_bits_per_weight")
        lines += ["", f"Bits per weight (report): {size['bits_per_weight']} over the whole model, "
                      + (f"{quantized} in the quantized layers" if quantized is not None else "no layer quantized")
                      + f"; parameters {size['parameters']:,}."]
    return lines


def model_card(fmt: str, path: str, report: dict[str, Any] | None, details: dict[str, Any]) -> str:
    """Markdown for README.md in the checkpoint."""
    recipe = (report or {}).get("recipe")
    source = (report or {}).get("model", {}).get("name", "unknown")
    lines = [f"# {source}, compressed ({fmt})", "", f"Written by `compress` from `{source}`.", "", "## Metrics", ""]
    lines += _metric_lines(report)
    lines += ["", "## How to load", "", LOAD[fmt].format(path=path)]
    adapter = details.get("adapter")
    if adapter:
        lines += ["", f"The low-rank corrections (`lorc`, ranks {', '.join(map(str, adapter['ranks']))} on "
                      f"{adapter['modules']} modules) are the LoRA adapter in `{adapter['path']}/`; without it the "
                      "model is the quantized base alone, which is not what the metrics above measured:", "",
                  "```python\nfrom peft import PeftModel  # pip install peft\n"
                  f"model = PeftModel.from_pretrained(model, \"{path}/{adapter['path']}\")\n```"]
    if fmt == "compressed-tensors":
        lines += ["", "## Runtimes", "", VLLM_NOTE.replace("{version}", str(details.get("compressed_tensors_version", "?")))]
    if details.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in details["notes"]]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"
