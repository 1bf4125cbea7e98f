#!/usr/bin/env python3
"""Build the small demo Llama model that ships with `compress`.

The demo model exists so that compression damage can be measured quickly on a
CPU: it must be a *really trained* causal LM (held-out perplexity far below a
unigram model), small (a few MB), and fully reproducible from permissively
licensed text.  The text is the reST source of the Python 3.11 documentation
as shipped in Debian's ``python3.11-doc`` package (PSF License Agreement v2;
code examples additionally 0BSD).  See PROVENANCE.md for the exact package.

Pipeline (run from recipes/demo/):

    apt-get download python3.11-doc                # fetches the .deb
    python build_demo_model.py corpus --deb python3.11-doc_*.deb --out _build
    python build_demo_model.py tokenizer --build _build --out model
    python build_demo_model.py train --build _build --model model --steps 1800
    python build_demo_model.py measure --build _build --model model

``corpus`` writes eval.txt and calib.txt next to this script (committed) and
the training/validation text into the build dir (not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Where the reST sources live inside the extracted Debian package.
SOURCES_SUBDIR = Path("usr/share/doc/python3.11/html/_sources")
SPLIT_SALT = "compress-demo-split-v1"
DOC_SEPARATOR = "\n\n"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama convention
SEQ_LEN = 512


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_sources(deb_or_dir: Path, scratch_dir: Path) -> Path:
    """Return the _sources directory, unpacking the .deb with dpkg -x if needed."""
    root = deb_or_dir
    if deb_or_dir.is_file():
        # dpkg -x only unpacks the data archive; nothing is installed.  The
        # unpacked tree (~70 MB) goes to a scratch dir, not the build dir.
        subprocess.run(["dpkg", "-x", str(deb_or_dir), str(scratch_dir)], check=True)
        root = scratch_dir
    for candidate in (root / SOURCES_SUBDIR, root):
        if candidate.is_dir() and any(candidate.rglob("*.rst.txt")):
            return candidate
    raise SystemExit(f"no *.rst.txt files found under {root}")


def read_document(path: Path) -> str:
    # Light normalization only: unify newlines and drop trailing blank space
    # so that the document separator is exactly DOC_SEPARATOR.
    text = path.read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").rstrip()


def split_key(relpath: str) -> str:
    # A salted hash gives an order that is deterministic but unrelated to the
    # directory layout, so held-out files come from all parts of the docs.
    return hashlib.sha256(f"{SPLIT_SALT}:{relpath}".encode()).hexdigest()


def assign_splits(sizes: dict[str, int], targets: list[tuple[str, int]],
                  max_heldout_file: int) -> dict[str, list[str]]:
    """Fill held-out splits in hash order until each reaches its byte target.

    Files larger than max_heldout_file are kept for training so that a single
    huge page cannot dominate (or overshoot) a small held-out split.
    """
    splits: dict[str, list[str]] = {name: [] for name, _ in targets}
    splits["train"] = []
    filled = {name: 0 for name, _ in targets}
    for relpath in sorted(sizes, key=split_key):
        size = sizes[relpath]
        destination = "train"
        if size <= max_heldout_file:
            for name, target in targets:
                if filled[name] < target:
                    destination = name
                    filled[name] += size + len(DOC_SEPARATOR)
                    break
        splits[destination].append(relpath)
    # Within a split keep the natural (sorted path) order for readability.
    return {name: sorted(paths) for name, paths in splits.items()}


def cmd_corpus(args: argparse.Namespace) -> None:
    build_dir = Path(args.out)
    build_dir.mkdir(parents=True, exist_ok=True)
    deb_path = Path(args.deb)
    with tempfile.TemporaryDirectory() as scratch:
        sources = locate_sources(deb_path, Path(scratch))
        files = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.rst.txt"))
        texts = {rel: read_document(sources / rel) for rel in files}
    sizes = {rel: len(text.encode("utf-8")) for rel, text in texts.items()}

    targets = [("eval", args.eval_bytes), ("calib", args.calib_bytes), ("valid", args.valid_bytes)]
    splits = assign_splits(sizes, targets, args.max_heldout_file)

    outputs = {
        "eval": Path(args.eval_out),
        "calib": Path(args.calib_out),
        "valid": build_dir / "valid.txt",
        "train": build_dir / "train.txt",
    }
    manifest = {
        "source": str(deb_path),
        "deb_sha256": sha256_file(deb_path) if deb_path.is_file() else None,
        "sources_dir": SOURCES_SUBDIR.as_posix(),
        "num_files": len(files),
        "split_salt": SPLIT_SALT,
        "splits": {},
    }
    for name, path in outputs.items():
        text = DOC_SEPARATOR.join(texts[rel] for rel in splits[name]) + "\n"
        path.write_text(text, encoding="utf-8")
        manifest["splits"][name] = {
            "path": str(path),
            "files": splits[name],
            "bytes": len(text.encode("utf-8")),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
        print(f"{name:6s} {len(splits[name]):4d} files {manifest['splits'][name]['bytes']:9d} bytes -> {path}")
    (build_dir / "corpus_manifest.json").write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def train_bpe(train_text: str, vocab_size: int):
    """Byte-level BPE: every byte is representable, so no text is ever <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Feed documents one by one; the trainer parallelizes over the iterator.
    tokenizer.train_from_iterator(train_text.split(DOC_SEPARATOR), trainer=trainer)
    # Prepend <s> like Llama tokenizers do; eval/calibration rely on it.
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    build_dir, out_dir = Path(args.build), Path(args.out)
    train_text = (build_dir / "train.txt").read_text(encoding="utf-8")
    raw = train_bpe(train_text, args.vocab_size)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # keep decode() an exact inverse
        model_max_length=1024,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    write_compat_files(out_dir)
    check_round_trip(out_dir, Path(args.eval_text))


def write_compat_files(out_dir: Path) -> None:
    """Make the saved tokenizer loadable by older transformers versions too.

    transformers 5 records its internal "TokenizersBackend" class and no longer
    writes special_tokens_map.json; the generic fast-tokenizer class name and
    the map are understood by both 4.x and 5.x.
    """
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    mapping = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(mapping, indent=2) + "\n")


def check_round_trip(model_dir: Path, text_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = text_path.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id, "tokenizer must prepend <s>"
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text, "decode(encode(text)) must round-trip"
    print(f"tokenizer ok: {type(tokenizer).__name__}, vocab {len(tokenizer)}, "
          f"{text_path.name}: {len(ids)} tokens, {len(text.encode()) / len(ids):.2f} bytes/token, "
          f"{len(ids) // SEQ_LEN} windows of {SEQ_LEN}")


# --------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------

def encode_stream(tokenizer, text: str):
    """Token ids of a whole text as one stream (with the leading <s>)."""
    import torch

    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # the initial weights depend only on the seed
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def sample_batch(stream, batch_size: int, generator):
    """Random SEQ_LEN windows from the training stream (labels = inputs; HF shifts)."""
    import torch

    starts = torch.randint(0, len(stream) - SEQ_LEN, (batch_size,), generator=generator)
    return torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()])


def windows(stream):
    """Non-overlapping SEQ_LEN windows, the GPTQ perplexity protocol."""
    count = len(stream) // SEQ_LEN
    return stream[: count * SEQ_LEN].view(count, SEQ_LEN)


def mean_nll(model, stream, device, batch_size: int = 16, autocast: bool = False) -> float:
    """Mean next-token NLL over all predicted tokens of non-overlapping windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows(stream).split(batch_size):
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=batch).logits
            logits = logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
            total += loss.item()
            count += targets.numel()
    model.train()
    return total / count


def train_loop(model, train_stream, valid_stream, device, args):
    """AdamW training; returns the best (lowest validation loss) state and a log."""
    import torch

    use_bf16 = device.type == "cuda"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    generator = torch.Generator().manual_seed(args.seed)
    best = {"valid_loss": float("inf"), "step": 0, "state": None}
    history, running = [], []
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sample_batch(train_stream, args.batch_size, generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())

        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            valid_loss = mean_nll(model, valid_stream, device, autocast=use_bf16)
            entry = {"step": step + 1, "train_loss": sum(running) / len(running),
                     "valid_loss": valid_loss, "valid_ppl": math.exp(valid_loss),
                     "lr": lr_at(step, args), "elapsed_s": round(time.time() - start, 1)}
            history.append(entry)
            running = []
            print(json.dumps(entry), flush=True)
            if valid_loss < best["valid_loss"]:
                # Keep the best weights in host memory: that is the checkpoint we ship.
                best = {"valid_loss": valid_loss, "step": step + 1,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    return best, history, time.time() - start


def hardware_description(device) -> str:
    import torch

    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    return f"CPU ({platform.processor() or platform.machine()})"


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    build_dir, model_dir = Path(args.build), Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
    train_stream = encode_stream(tokenizer, (build_dir / "train.txt").read_text(encoding="utf-8"))
    valid_stream = encode_stream(tokenizer, (build_dir / "valid.txt").read_text(encoding="utf-8"))
    print(f"train tokens {len(train_stream)}, valid tokens {len(valid_stream)}", flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(tokenizer, args.seed).to(device)
    best, history, seconds = train_loop(model, train_stream, valid_stream, device, args)

    # Ship the best checkpoint in float16: half the size, and the demo's
    # reference numbers are measured from exactly these stored weights.
    model.load_state_dict(best["state"])
    model = model.to("cpu", dtype=torch.float16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_compat_files(model_dir)

    log = {
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * args.batch_size * SEQ_LEN,
        "train_tokens": len(train_stream), "valid_tokens": len(valid_stream),
        "epochs": args.steps * args.batch_size * SEQ_LEN / len(train_stream),
        "best_step": best["step"], "best_valid_loss": best["valid_loss"],
        "best_valid_ppl": math.exp(best["valid_loss"]),
        "train_seconds": round(seconds, 1), "hardware": hardware_description(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "warmup": args.warmup, "schedule": "cosine", "min_lr_ratio": args.min_lr_ratio,
                      "grad_clip": 1.0},
        "seed": args.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
        "history": history,
    }
    (model_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved best step {best['step']} (valid ppl {math.exp(best['valid_loss']):.2f}) to {model_dir}")


# --------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------

def unigram_nll(train_stream, eval_stream, vocab_size: int) -> float:
    """Mean NLL of the eval windows' predicted tokens under an add-one unigram model.

    Uses exactly the tokens the LM is scored on (positions 1..SEQ_LEN-1 of
    each non-overlapping window) so the two perplexities are comparable.
    """
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = windows(eval_stream)[:, 1:].reshape(-1)
    return -log_probs[targets].mean().item()


def cmd_measure(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_dir, model_dir = Path(args.build), Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    eval_stream = encode_stream(tokenizer, Path(args.eval_text).read_text(encoding="utf-8"))
    calib_stream = encode_stream(tokenizer, Path(args.calib_text).read_text(encoding="utf-8"))
    train_stream = encode_stream(tokenizer, (build_dir / "train.txt").read_text(encoding="utf-8"))

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_ppl = math.exp(mean_nll(model, eval_stream, torch.device("cpu"), batch_size=8))
    unigram_ppl = math.exp(unigram_nll(train_stream[1:], eval_stream, len(tokenizer)))
    results = {
        "eval_tokens": len(eval_stream), "eval_windows": len(eval_stream) // SEQ_LEN,
        "calib_tokens": len(calib_stream), "train_tokens": len(train_stream),
        "heldout_ppl_fp32": round(model_ppl, 3), "unigram_ppl": round(unigram_ppl, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(results, indent=1))
    (model_dir / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_model_card(model_dir, results)


def write_model_card(model_dir: Path, results: dict) -> None:
    log = json.loads((model_dir / "training_log.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    card = MODEL_CARD.format(
        params=results["parameters"], params_m=results["parameters"] / 1e6, size_mb=size_mb,
        hidden=config["hidden_size"], inter=config["intermediate_size"], layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"], vocab=config["vocab_size"], ctx=config["max_position_embeddings"],
        steps=log["steps"], best_step=log["best_step"], batch=log["batch_size"], seq=log["seq_len"],
        tokens_seen=log["tokens_seen"], train_tokens=log["train_tokens"], epochs=log["epochs"],
        seconds=log["train_seconds"], hardware=log["hardware"], precision=log["precision"],
        lr=log["optimizer"]["lr"], wd=log["optimizer"]["weight_decay"], warmup=log["optimizer"]["warmup"],
        seed=log["seed"], valid_ppl=log["best_valid_ppl"], versions=log["versions"],
        eval_tokens=results["eval_tokens"], eval_windows=results["eval_windows"],
        calib_tokens=results["calib_tokens"], ppl=results["heldout_ppl_fp32"], uni=results["unigram_ppl"],
    )
    (model_dir / "README.md").write_text(card)
    print(f"wrote {model_dir / 'README.md'}")


MODEL_CARD = """\
---
license: other
license_name: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, demo, tiny]
---

# compress demo model: tiny Llama trained on the Python 3.11 docs

A deliberately small, but genuinely trained, Llama-architecture causal LM that
ships with `compress` so that quantization/pruning damage can be measured in
seconds on a CPU. It is **not** a useful assistant; it writes Python-docs-like reST.

## Architecture

| | |
|---|---|
| type | `LlamaForCausalLM` |
| parameters | {params:,} ({params_m:.2f} M; input/output embeddings tied) |
| hidden / intermediate | {hidden} / {inter} |
| layers / heads / kv heads | {layers} / {heads} / {heads} |
| vocab | {vocab} (byte-level BPE, `<unk>`=0 `<s>`=1 `</s>`=2 `<pad>`=3; `<s>` is prepended) |
| max positions | {ctx} (RoPE theta 10000) |
| stored weights | `model.safetensors`, float16, {size_mb:.1f} MB |

## Training

- Data: reST sources (`_sources/**/*.rst.txt`) of the Python 3.11.2 documentation
  from Debian's `python3.11-doc` package; held-out files split off by a salted hash
  of their path (see `../PROVENANCE.md`). Training split: {train_tokens:,} tokens.
- {steps} steps x {batch} sequences x {seq} tokens = {tokens_seen:,} tokens seen
  ({epochs:.1f} epochs); random windows from the training token stream.
- AdamW (lr {lr}, betas 0.9/0.95, weight decay {wd}), {warmup} warmup steps, cosine decay,
  grad clip 1.0, {precision}, seed {seed}.
- Shipped checkpoint: best validation loss at step {best_step} (validation ppl {valid_ppl:.2f}).
- Wall time {seconds:.0f} s on {hardware}; torch {versions[torch]}, transformers {versions[transformers]}.
- Full per-step log: `training_log.json`.

## Evaluation (held-out, `../eval.txt`)

GPTQ protocol: the whole text is tokenized once ({eval_tokens:,} tokens), cut into
{eval_windows} non-overlapping windows of {seq} tokens, perplexity = exp(mean NLL over
all predicted tokens); weights loaded from the fp16 file into float32 on CPU.

| model | perplexity |
|---|---|
| this model | **{ppl:.2f}** |
| add-one unigram fitted on the training tokens | {uni:.2f} |

Calibration text `../calib.txt`: {calib_tokens:,} tokens (disjoint files from eval).

## License

Trained on the Python 3.11 documentation: "Copyright © 2001-2023 Python Software
Foundation; All Rights Reserved", licensed under the **PSF License Agreement for
Python 3.11 (PSF License Version 2)**; examples, recipes and other code in the
documentation are additionally under the **Zero-Clause BSD** license. The full texts
are in the docs' `license.rst` (section "Terms and conditions for accessing or otherwise
using Python") and in `/usr/share/doc/python3.11-doc/copyright` of the Debian package.
The weights are a derivative work distributed under the same PSF License v2 terms.
Summary of changes (PSF License clause 3): the documentation's reST text was used,
unmodified, as training data for this model; `../eval.txt` and `../calib.txt` are
verbatim excerpts of it. See `../PROVENANCE.md`.

## Reproduce

```sh
cd recipes/demo
apt-get download python3.11-doc   # python3.11-doc_3.11.2-6+deb12u9_all.deb
python build_demo_model.py corpus --deb python3.11-doc_3.11.2-6+deb12u9_all.deb --out _build
python build_demo_model.py tokenizer --build _build --out model
python build_demo_model.py train --build _build --model model --steps {steps}
python build_demo_model.py measure --build _build --model model
```
"""


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="extract and split the Python docs text")
    corpus.add_argument("--deb", required=True, help="python3.11-doc .deb, or a directory it was extracted to")
    corpus.add_argument("--out", required=True, help="build directory (train/valid text, manifest)")
    corpus.add_argument("--eval-out", default=str(HERE / "eval.txt"))
    corpus.add_argument("--calib-out", default=str(HERE / "calib.txt"))
    corpus.add_argument("--eval-bytes", type=int, default=180_000)
    corpus.add_argument("--calib-bytes", type=int, default=180_000)
    corpus.add_argument("--valid-bytes", type=int, default=300_000)
    corpus.add_argument("--max-heldout-file", type=int, default=40_000,
                        help="larger files always go to training")
    corpus.set_defaults(func=cmd_corpus)

    tok = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    tok.add_argument("--build", required=True)
    tok.add_argument("--out", required=True, help="model directory to save the tokenizer into")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.add_argument("--eval-text", default=str(HERE / "eval.txt"))
    tok.set_defaults(func=cmd_tokenizer)

    train = sub.add_parser("train", help="train the model (CUDA if available)")
    train.add_argument("--build", required=True)
    train.add_argument("--model", required=True, help="output model directory")
    train.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    train.add_argument("--steps", type=int, default=1800)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1.5e-3)
    train.add_argument("--min-lr-ratio", type=float, default=0.1)
    train.add_argument("--warmup", type=int, default=200)
    train.add_argument("--weight-decay", type=float, default=0.3)
    train.add_argument("--eval-every", type=int, default=100)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--cpu", action="store_true", help="force CPU (slow)")
    train.set_defaults(func=cmd_train)

    measure = sub.add_parser("measure", help="held-out and unigram perplexity; writes the model card")
    measure.add_argument("--build", required=True)
    measure.add_argument("--model", required=True)
    measure.add_argument("--eval-text", default=str(HERE / "eval.txt"))
    measure.add_argument("--calib-text", default=str(HERE / "calib.txt"))
    measure.set_defaults(func=cmd_measure)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
