"""The data set names a recipe may use instead of a file: read from the Hugging Face hub when online."""

from __future__ import annotations

# name -> (datasets args, split, text field, how documents are joined). The GPTQ/SparseGPT/AWQ papers join
# WikiText-2 test with "\n\n" and use C4's first validation shard; we follow them so numbers compare.
HUB_DATASETS: dict[str, tuple[tuple[str, ...], dict[str, str], str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text", "\n\n"),
    "c4": (
        ("allenai/c4",),
        {"split": "validation", "data_files": "en/c4-validation.00000-of-00008.json.gz"},
        "text",
        "\n\n",
    ),
}


def is_hub_dataset(ref: str) -> bool:
    return ref in HUB_DATASETS
