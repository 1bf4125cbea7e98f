"""Build the demo cloze task `cloze.jsonl` from the held-out demo text `eval.txt`.

Each document is a stretch of prose from eval.txt (up to three sentences of one paragraph) and four
candidate next sentences: the true one and three distractors drawn from other paragraphs of the same text,
of similar length (within a factor of 1.5, so the length of a choice gives nothing away). The model never saw
eval.txt in training; a model that reads the context scores well above the 25% of chance.

Format: the generic zero-shot JSONL `{"context": ..., "choices": [...], "gold": i}` that
`compress eval --zero-shot recipes/demo/cloze.jsonl` and `evaluate: {zero_shot: {tasks: [demo/cloze.jsonl]}}`
read; each choice is scored as " " + choice after the context.

    python recipes/demo/build_cloze.py            # rewrites recipes/demo/cloze.jsonl (deterministic, seed 0)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SENTENCE_END = re.compile(r"(?<=[a-z0-9)`*][.!?])\s+(?=[A-Z])")
MIN_CHARS, MAX_CHARS = 30, 220


def prose_paragraphs(text: str) -> list[list[str]]:
    """Sentences of every prose paragraph (reST directives, code blocks, tables and headings left out)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip("\n").split("\n")]
        if not lines or any(line.startswith(("..", ">>>", "+", "|", "=", "-", "*", "#")) or line.endswith("::") for line in lines):
            continue
        flat = " ".join(lines)
        sentences = [s for s in SENTENCE_END.split(flat) if MIN_CHARS <= len(s) <= MAX_CHARS]
        if len(sentences) >= 2 and all(s[0].isupper() for s in sentences):
            paragraphs.append(sentences)
    return paragraphs


def build(text: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    paragraphs = prose_paragraphs(text)
    pool = [(index, s) for index, sentences in enumerate(paragraphs) for s in sentences]
    candidates = [(p, i) for p, sentences in enumerate(paragraphs) for i in range(1, len(sentences))]
    rng.shuffle(candidates)
    docs = []
    for p, i in candidates:
        true = paragraphs[p][i]
        similar = [s for q, s in pool if q != p and 1 / 1.5 <= len(s) / len(true) <= 1.5 and s != true]
        if len(similar) < 3:
            continue
        choices = rng.sample(similar, 3)
        gold = rng.randrange(4)
        choices.insert(gold, true)
        docs.append({"context": " ".join(paragraphs[p][max(0, i - 3) : i]), "choices": choices, "gold": gold})
        if len(docs) == count:
            break
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=str(HERE / "eval.txt"))
    parser.add_argument("--output", default=str(HERE / "cloze.jsonl"))
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = build(Path(args.text).read_text(encoding="utf-8"), args.count, args.seed)
    Path(args.output).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {args.output}")


if __name__ == "__main__":
    main()
