"""Build the demo cloze task `cloze.jsonl` from the held-out demo text `eval.txt`.

Each document is a stretch of prose from eval.txt (up to three sentences of one paragraph) and four
candidate next sentences: the true one and three distractors drawn from far away in the same text
(another page of the docs), of similar length (within a factor of 1.25, so the length of a choice gives nothing away). The model never saw
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
FAR_CHARS = 20_000
LENGTH_RATIO = 1.25
STEM_WORDS = 4


def prose_paragraphs(text: str) -> list[tuple[int, list[str]]]:
    """(character offset, sentences) of every prose paragraph; reST directives, code, tables and headings are
    left out."""
    paragraphs = []
    for match in re.finditer(r"(?:[^\n]+\n?)+", text):
        lines = [line.strip() for line in match.group(0).strip("\n").split("\n")]
        if not lines or any(line.startswith(("..", ">>>", "+", "|", "=", "-", "*", "#")) or line.endswith("::") for line in lines):
            continue
        sentences = [s for s in SENTENCE_END.split(" ".join(lines)) if MIN_CHARS <= len(s) <= MAX_CHARS]
        if len(sentences) >= 2 and all(s[0].isupper() for s in sentences):
            paragraphs.append((match.start(), sentences))
    return paragraphs


def split_words(sentence: str) -> tuple[str, str]:
    words = sentence.split(" ")
    return " ".join(words[:STEM_WORDS]), " ".join(words[STEM_WORDS:])


def build(text: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    paragraphs = prose_paragraphs(text)
    pool = [(offset, s) for offset, sentences in paragraphs for s in sentences]
    candidates = [(p, i) for p, (_, sentences) in enumerate(paragraphs) for i in range(1, len(sentences))]
    rng.shuffle(candidates)
    docs = []
    for p, i in candidates:
        offset, sentences = paragraphs[p]
        true = sentences[i]
        # Distractors come from far away in the text (another page of the docs, another topic), so the context
        # decides; similar length keeps the length of a choice from giving the answer away.
        similar = [s for o, s in pool if abs(o - offset) > FAR_CHARS and s.count(" ") > STEM_WORDS and 1 / LENGTH_RATIO <= len(s) / len(true) <= LENGTH_RATIO]
        if len(similar) < 3 or true.count(" ") <= STEM_WORDS:
            continue
        # The next sentence's first words stay in the context: a 4.5M-parameter model judges how a sentence
        # goes on far better than which sentence comes next, and the distractors are cut at the same word.
        stem, ending = split_words(true)
        choices = [split_words(s)[1] for s in rng.sample(similar, 3)]
        gold = rng.randrange(4)
        choices.insert(gold, ending)
        docs.append({"context": " ".join(sentences[max(0, i - 3) : i] + [stem]), "choices": choices, "gold": gold})
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
