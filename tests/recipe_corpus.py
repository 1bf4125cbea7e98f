"""A seeded generator of malformed recipes: mutations of the shipped recipes and of a minimal one.

Every mutation is wrong by construction (a wrong type under strict types, a number outside its declared range,
an unknown key or name, a missing file, a broken regex, a duplicate key, broken YAML, bytes that are not UTF-8, a
control character, a self-referencing anchor or alias bomb, a huge value, a refused pass order), so the property
tests/test_recipe_corpus.py checks is exact: every one is exit 2 with a located message.

    corpus = list(malformed_recipes(count=5000, seed=15))   # [(mutation name, bytes)], the same every time
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = {
    "model": "demo/model",
    "passes": [{"rtn": {"bits": 4}}],
    "evaluate": {"perplexity": [{"dataset": "demo/eval.txt", "seq_len": 64}]},
}

# Numbers outside what each field declares (the fields the shipped recipes use), per key name.
OUT_OF_RANGE: dict[str, list[Any]] = {
    "bits": [0, 1, 9, 16, 32, -4],
    "samples": [0, -5, 100_001, 10**12],
    "seq_len": [0, 7, 3_000_000_000, 10**30],  # (calibration allows 10^6, evaluators the integer ceiling)
    "seed": [-1, 2**63, 2**64, -(2**70)],
    "group_size": [0, -2, -128, 2_000_000],
    "damp": [0, 1, 1.5, -0.1],
    "alpha": [-0.5, 1.5, 100],
    "grid": [0, 201, -3],
    "max_probes": [0, 10_001],
    "avg_bits": [0, -1, 33],
    "block_size": [0, -1, 2_000_000],
    "candidates": [[1], [], [9], [2, 3, 64]],
    "batch_size": [0, -1, 100_001],
}
BAD_REGEXES = ["re:(", "re:[", "re:*x", "re:(?P<a", "re:a{2,1}", "re:\\", "re:(?<=a+)b", "re:[z-a]"]
NOT_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xc0\xaf"]
CONTROL = [chr(c) for c in [*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x80, 0x9F, 0xFFFE]]
SYNTAX_BREAKERS = ["key: [unclosed", "key: {a: 1", "key: \"unclosed", "  - : :\n bad", "@at", "`tick`", "*undefined_alias",
                   "\tindented: with a tab", "a: b: c", "- item\nkey: after a list", "? complex\n: [", "%YAML 9.9\n---",
                   "!!python/object/apply:os.system ['true']", "key: !!binary ###", "]", "}", "'single"]
VALUE_NOT_SCALAR: list[Any] = [["x"], {"k": "v"}, [], {}]


def sources() -> list[tuple[str, dict[str, Any]]]:
    """(name, data) of each base recipe: the shipped ones and the minimal one."""
    out = [(path.stem, yaml.safe_load(path.read_text(encoding="utf-8"))) for path in SHIPPED]
    return out + [("minimal", copy.deepcopy(MINIMAL))]


# ---------------------------------------------------------------------------------------------------
# Finding places in a recipe


Loc = tuple[Any, ...]


def leaves(data: Any, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Every (location, value) below the root, containers included."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield loc + (key,), value
        yield from leaves(value, loc + (key,))


def set_at(data: Any, loc: Loc, value: Any) -> None:
    for key in loc[:-1]:
        data = data[key]
    data[loc[-1]] = value


def delete_at(data: Any, loc: Loc) -> None:
    for key in loc[:-1]:
        data = data[key]
    del data[loc[-1]]


def dump(data: Any) -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter: the corpus is built in a second or two
    return yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True, width=10_000)


ALL_FIELD_NAMES: set[str] = set()  # filled by tests/test_recipe_corpus.py from the registries: typos must miss them


def typo(rng: random.Random, word: str) -> str:
    """A misspelling that is not any field name (swap, drop, double or change a letter)."""
    for _ in range(50):
        chars = list(word) or ["x"]
        i = rng.randrange(len(chars))
        op = rng.randrange(4)
        if op == 0 and len(chars) > 1:
            j = min(i + 1, len(chars) - 1)
            chars[i], chars[j] = chars[j], chars[i]
        elif op == 1 and len(chars) > 1:
            del chars[i]
        elif op == 2:
            chars.insert(i, chars[i])
        else:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz_")
        candidate = "".join(chars)
        if candidate != word and candidate not in ALL_FIELD_NAMES:
            return candidate
    return word + "_typo_x"


# ---------------------------------------------------------------------------------------------------
# Mutations: each takes (rng, data) and returns the recipe's bytes


def _scalar_leaves(data: dict[str, Any]) -> list[tuple[Loc, Any]]:
    return [(loc, v) for loc, v in leaves(data) if not isinstance(v, (dict, list)) and loc[0] != "max_memory"]


def wrong_type(rng: random.Random, data: dict[str, Any]) -> bytes:
    """A value of a type its field does not take: strict types refuse every one of these."""
    loc, value = rng.choice(_scalar_leaves(data))
    if isinstance(value, bool):
        bad = rng.choice(["yes", "no", 1, 0, "true", 1.0, None, *VALUE_NOT_SCALAR])
    elif isinstance(value, int):
        bad = rng.choice(["four", True, False, 4.5, "128", "1e3", *VALUE_NOT_SCALAR])
    elif isinstance(value, float):
        bad = rng.choice(["half", True, "0.5", float("nan"), float("inf"), -float("inf"), *VALUE_NOT_SCALAR])
    elif value is None:
        bad = rng.choice(["none", "null-ish", True, *VALUE_NOT_SCALAR])
    else:  # strings: names, enums, paths
        bad = rng.choice([5, True, 2.5, *VALUE_NOT_SCALAR])
    set_at(data, loc, bad)
    return dump(data).encode()


def out_of_range(rng: random.Random, data: dict[str, Any]) -> bytes:
    places = [(loc, loc[-1]) for loc, _ in leaves(data) if loc and loc[-1] in OUT_OF_RANGE]
    loc, key = rng.choice(places)
    set_at(data, loc, copy.deepcopy(rng.choice(OUT_OF_RANGE[key])))
    return dump(data).encode()


def unknown_key(rng: random.Random, data: dict[str, Any]) -> bytes:
    """A misspelt key beside an existing one (or the existing one renamed) in a config mapping."""
    mappings = [(loc, v) for loc, v in [((), data), *leaves(data)] if isinstance(v, dict) and v
                and (not loc or loc[-1] not in ("max_memory",)) and not (len(loc) == 2 and loc[0] == "passes")]
    loc, mapping = rng.choice(mappings)
    key = rng.choice(list(mapping))
    wrong = typo(rng, str(key))
    if rng.random() < 0.5:
        mapping[wrong] = mapping.pop(key)
    else:
        mapping[wrong] = copy.deepcopy(mapping[key])
    return dump(data).encode()


def unknown_name(rng: random.Random, data: dict[str, Any]) -> bytes:
    """A pass or evaluator name with a typo."""
    if rng.random() < 0.6 and data.get("passes"):
        index = rng.randrange(len(data["passes"]))
        item = data["passes"][index]
        name = next(iter(item))
        data["passes"][index] = {typo(rng, name): item[name]}
    else:
        name = next(iter(data["evaluate"]))
        data["evaluate"][typo(rng, name)] = data["evaluate"].pop(name)
    return dump(data).encode()


def missing_required(rng: random.Random, data: dict[str, Any]) -> bytes:
    choices: list[Loc] = [("evaluate", "perplexity", 0, "dataset")]
    if "calibration" in data:
        choices.append(("calibration", "dataset"))
    if any("allocate" in item for item in data["passes"]):
        index = next(i for i, item in enumerate(data["passes"]) if "allocate" in item)
        choices.append(("passes", index, "allocate", "budget"))
    delete_at(data, rng.choice(choices))
    return dump(data).encode()


def missing_file(rng: random.Random, data: dict[str, Any]) -> bytes:
    places: list[Loc] = [("evaluate", "perplexity", 0, "dataset"), ("model",)]
    if "calibration" in data:
        places.append(("calibration", "dataset"))
    loc = rng.choice(places)
    name = f"./no/such/{rng.randrange(10**6)}" + ("" if loc == ("model",) else ".txt")
    set_at(data, loc, name)
    return dump(data).encode()


def unusable_path(rng: random.Random, data: dict[str, Any]) -> bytes:
    places: list[Loc] = [("evaluate", "perplexity", 0, "dataset"), ("model",)]
    if "calibration" in data:
        places.append(("calibration", "dataset"))
    set_at(data, rng.choice(places), rng.choice(["a\x00b", "x" * rng.randrange(4100, 6000), "d/" + "y" * 300]))
    return dump(data).encode()


def bad_regex(rng: random.Random, data: dict[str, Any]) -> bytes:
    index = rng.randrange(len(data["passes"]))
    name = next(iter(data["passes"][index]))
    params = data["passes"][index][name] or {}
    params["ignore"] = ["lm_head", rng.choice(BAD_REGEXES)]
    data["passes"][index][name] = params
    return dump(data).encode()


def duplicate_key(rng: random.Random, data: dict[str, Any]) -> bytes:
    """A `key: value` line written twice in its mapping (the copy's value changed half the time)."""
    lines = dump(data).splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("- ")
                  and line.split(":")[0].strip().isidentifier()]
    i = rng.choice(candidates)
    copy_line = lines[i]
    if rng.random() < 0.5:
        key = copy_line.split(":")[0]
        copy_line = f"{key}: {rng.choice(['true', 'false', '3', 'other'])}\n"
    return "".join(lines[: i + 1] + [copy_line] + lines[i + 1:]).encode()


def yaml_syntax(rng: random.Random, data: dict[str, Any]) -> bytes:
    lines = dump(data).splitlines(keepends=True)
    i = rng.randrange(len(lines) + 1)
    return "".join(lines[:i] + [rng.choice(SYNTAX_BREAKERS) + "\n"] + lines[i:]).encode()


def not_utf8(rng: random.Random, data: dict[str, Any]) -> bytes:
    raw = dump(data).encode()
    i = rng.randrange(len(raw) + 1)
    return raw[:i] + rng.choice(NOT_UTF8) + raw[i:]


def control_character(rng: random.Random, data: dict[str, Any]) -> bytes:
    text = dump(data)
    i = rng.randrange(len(text) + 1)
    return (text[:i] + rng.choice(CONTROL) + text[i:]).encode("utf-8")


def anchors(rng: random.Random, data: dict[str, Any]) -> bytes:
    """Self-referencing anchors, alias bombs and undefined aliases in place of a section."""
    text = dump({k: v for k, v in data.items() if k != "passes"})
    levels, width = rng.randint(6, 10), rng.randint(8, 12)
    bomb = ["x0: &x0 [" + ", ".join(["lol"] * width) + "]"]
    bomb += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * width) + "]" for i in range(1, levels)]
    kind = rng.randrange(4)
    if kind == 0:
        return (text + "passes: &p [*p]\n").encode()
    if kind == 1:
        return (text + "passes:\n  - rtn: &r {bits: 4, ignore: [*r]}\n").encode()
    if kind == 2:
        return (text + "\n".join(bomb) + f"\npasses: *x{levels - 1}\n").encode()
    return (text + f"passes: *missing{rng.randrange(100)}\n").encode()


def huge_value(rng: random.Random, data: dict[str, Any]) -> bytes:
    kind = rng.choices(range(4), weights=[10, 10, 1, 10])[0]  # few files past the size cap: they are 1 MB each
    if kind == 0:  # an integer of 20 to 6,000 digits where a count goes (past every bound, seeds' 2^63 included)
        places = [loc for loc, v in leaves(data) if isinstance(v, int) and not isinstance(v, bool)]
        set_at(data, rng.choice(places), "__HUGE__")
        return dump(data).replace("__HUGE__", "9" * rng.randint(20, 6000), 1).encode()
    if kind == 1:  # a very long string where a name goes
        data["dtype"] = "__LONG__"
        return dump(data).replace("__LONG__", "f" * rng.randint(10_000, 200_000), 1).encode()
    if kind == 2:  # a file past the size cap
        return dump(data).encode() + b"# padding\n" * rng.randint(100_001, 120_000)
    depth = rng.randint(70, 3000)
    return (dump({k: v for k, v in data.items() if k != "passes"}) + "passes: " + "[" * depth + "]" * depth + "\n").encode()


def wrong_order(rng: random.Random, data: dict[str, Any]) -> bytes:
    """A pass order the recipe rules refuse: after a quantizer, a second quantizer, or restructuring after pruning."""
    quantizer = rng.choice([{"rtn": {"bits": 4}}, {"gptq": {"bits": 4}}, {"awq": {"bits": 4}}])
    after = rng.choice([{"magnitude": {"sparsity": 0.5}}, {"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 8}},
                        {"gptq": {}}, {"smoothquant": {"alpha": 0.5}}, {"layer_drop": {"count": 1}},
                        {"width_prune": {"mlp_ratio": 0.25}}, {"sparsegpt": {"pattern": "2:4"}}])
    orders = [[quantizer, after], [{"magnitude": {"sparsity": 0.5}}, {"layer_drop": {"count": 1}}],
              [{"wanda": {"sparsity": 0.5}}, {"width_prune": {"attention_ratio": 0.25}}, quantizer]]
    data["passes"] = copy.deepcopy(rng.choice(orders))
    data.setdefault("calibration", {"dataset": "demo/calib.txt", "samples": 4, "seq_len": 64})
    return dump(data).encode()


def not_a_mapping(rng: random.Random, data: dict[str, Any]) -> bytes:
    n = rng.randrange(10**9)
    return rng.choice([f"- model: x{n}\n", f"just a string {n}\n", f"{n}\n", f"[{n}, 2, 3]\n", f"passes{n}\n",
                       dump(list(data.items()))]).encode()


def wrong_shape(rng: random.Random, data: dict[str, Any]) -> bytes:
    """Sections of the wrong shape: a pass item with two names, evaluate as a list, passes as a mapping."""
    kind = rng.randrange(4)
    if kind == 0:
        data["passes"] = [{"rtn": {}, "gptq": {}}]
    elif kind == 1:
        data["evaluate"] = [data["evaluate"]]
    elif kind == 2:
        data["passes"] = {"rtn": {"bits": 4}}
    else:
        data["calibration"] = rng.choice(["demo/calib.txt", ["demo/calib.txt"], 128])
    return dump(data).encode()


MUTATIONS: dict[str, Callable[[random.Random, dict[str, Any]], bytes]] = {
    f.__name__: f for f in (wrong_type, out_of_range, unknown_key, unknown_name, missing_required, missing_file,
                            unusable_path, bad_regex, duplicate_key, yaml_syntax, not_utf8, control_character,
                            anchors, huge_value, wrong_order, not_a_mapping, wrong_shape)
}


VALID_VARIATIONS: dict[str, Callable[[random.Random], Any]] = {
    "bits": lambda rng: rng.choice([2, 3, 4, 8]),
    "samples": lambda rng: rng.randint(1, 512),
    "seq_len": lambda rng: rng.randint(8, 4096),
    "seed": lambda rng: rng.randrange(2**32),
    "damp": lambda rng: round(rng.uniform(0.001, 0.5), 4),
    "grid": lambda rng: rng.randint(1, 200),
    "alpha": lambda rng: round(rng.random(), 3),
}


def vary(rng: random.Random, data: dict[str, Any]) -> None:
    """Valid random values for the numbers a recipe sets, so the corpus is 5,000 different files."""
    for loc, value in list(leaves(data)):
        if loc and loc[-1] in VALID_VARIATIONS and not isinstance(value, (dict, list, bool)):
            set_at(data, loc, VALID_VARIATIONS[loc[-1]](rng))


def malformed_recipes(count: int, seed: int = 15) -> Iterator[tuple[str, bytes]]:
    """`count` (mutation name, recipe bytes), the same for the same seed; every mutation about equally often."""
    rng = random.Random(seed)
    bases = sources()
    names = sorted(MUTATIONS)
    for i in range(count):
        name = names[i % len(names)]
        data = copy.deepcopy(bases[rng.randrange(len(bases))][1])
        vary(rng, data)
        yield name, MUTATIONS[name](rng, data)
