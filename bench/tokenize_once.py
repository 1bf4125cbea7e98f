"""What tokenizing an evaluation text costs, and what the token-id cache (compress/engine/context.py RunCache) saves.

WikiText-2 test (the local copy in ../shared/data, read as `load_text("wikitext2")` does) tokenized by
`tokenize_text` with the demo model's tokenizer and with a large byte-level BPE trained here on the texts in
../shared/data (the largest vocabulary those texts allow; no 128k tokenizer ships with the project). Against it:
the same ids read back from the cache by a new run (`RunCache(store).token_ids`, which also computes the
tokenizer's identity: the SHA-256 of its serialised backend), and the tokenizer identity alone.

Before this cache, a run tokenized each evaluation text once (baseline and final evaluation shared it) and the
calibration text again even when it was the same file; every run and every sweep trial paid it again.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/tokenize_once.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from compress.engine.cache import Cache
from compress.engine.context import RunCache
from compress.engine.data import load_text, tokenize_text, tokenizer_identity

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
OUTPUT = REPO / "bench" / "results" / "tokenize_once.md"
REPEATS = 3
LARGE_VOCAB = 128_256


def large_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on every text in ../shared/data, asked for a Llama-3-sized vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in (DATA / "wikitext2_raw" / "wiki.valid.raw", DATA / "tinyshakespeare" / "input.txt",
                       DATA / "hellaswag" / "hellaswag_val_full.txt", DATA / "wikitext2_raw" / "wiki.test.raw")
             if p.is_file()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=LARGE_VOCAB, special_tokens=["<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>")


def seconds(work, repeats: int = REPEATS) -> float:
    """Median CPU seconds of `work()` (all threads of this process: the machine is shared, so not wall time)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(name: str, tokenizer, text: str, source: tuple[str, str | None]) -> list[str]:
    load = os.getloadavg()[0]
    fresh = seconds(lambda: tokenize_text(tokenizer, text))
    identity = seconds(lambda: tokenizer_identity(tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        store = Cache(Path(folder))
        ids = RunCache(store).token_ids(source, tokenizer)  # fills the cache
        cached = seconds(lambda: RunCache(store).token_ids(source, tokenizer))
    vocabulary = len(tokenizer)
    return [f"| {name} | {vocabulary:,} | {ids.numel():,} | {fresh:.3f} | {cached:.3f} | {identity:.3f} | "
            f"{fresh / cached:.1f}x | {load:.1f} |"]


def main() -> None:
    source = ("wikitext2", str(DATA))
    text = load_text(*source)
    demo = AutoTokenizer.from_pretrained(str(REPO / "recipes" / "demo" / "model"))
    started = os.getloadavg()[0]
    rows = measure("demo model", demo, text, source)
    rows += measure("byte-level BPE trained here", large_tokenizer(), text, source)
    lines = [
        "## Tokenize once (bench/tokenize_once.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load {started:.1f} at the "
        f"start. WikiText-2 test ({len(text):,} characters). CPU seconds of this process (all threads), medians of {REPEATS}. `tokenize` is "
        "`tokenize_text` (what each run paid per text before the cache, and still pays the first time); "
        "`from cache` is a new run's `RunCache(store).token_ids` (tokenizer identity + reading the ids); "
        "`identity` is the tokenizer identity alone.",
        "",
        "| tokenizer | vocabulary | tokens | tokenize CPU s | from cache CPU s | identity CPU s | saving | load |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "A run that evaluates and calibrates on the same file now tokenizes it once (it was twice); a later run or "
        "sweep trial reads the ids back. The trained BPE's vocabulary is what the texts allow, below the 128,256 "
        "asked for: tokenizing costs grow with the text and the pre-tokenizer more than with the vocabulary, while "
        "the identity (hashing the serialised backend) grows with the vocabulary.",
    ]
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
