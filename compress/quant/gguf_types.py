"""The GGUF (llama.cpp) block types our quantizers can round onto, described without torch so recipes validate
first. Read from ggml-quants.c / gguf-py's quants.py (gguf 0.19.0); every type dequantizes as

    x = (d * sc) * q - (dmin * m)

per sub-block of `sub` columns: `d` (and `dmin`) one float16 per block of `block` columns, `sc` (and `m`) small
integers per sub-block, `q` the element code. The 32-wide types have no integer sub-scales (sc = 1); Q4_1 / Q5_1
store their float minimum `min` (x = d * q + min), which is dmin = -min with m = 1. Symmetric types have no
dmin / m (the term is 0).

    type   block sub  q range      sc range     m range   bytes/block  bits/weight
    q4_0     32   32  -8..7        (1)          -           18           4.5
    q8_0     32   32  -128..127    (1)          -           34           8.5
    q4_1     32   32  0..15        (1)          float min   20           5.0
    q5_1     32   32  0..31        (1)          float min   24           6.0
    q2_k    256   16  0..3         0..15        0..15       84           2.625
    q3_k    256   16  -4..3        -32..31      -          110           3.4375
    q4_k    256   32  0..15        0..63        0..63      144           4.5
    q5_k    256   32  0..31        0..63        0..63      176           5.5
    q6_k    256   16  -32..31      -128..127    -          210           6.5625
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    name: str  # lower case, as recipes write it after `gguf:`
    block: int  # columns per float16 d (and dmin)
    sub: int  # columns per integer sub-scale (== block for the 32-wide types)
    q_range: tuple[int, int]
    sc_range: tuple[int, int] | None  # None: no integer sub-scales
    m_range: tuple[int, int] | None  # integer sub-minimums (k-quants); None: none or a float one
    float_min: bool  # Q4_1 / Q5_1: a float16 minimum per block
    bytes_per_block: int

    @property
    def asymmetric(self) -> bool:
        return self.float_min or self.m_range is not None

    @property
    def code_bits(self) -> int:
        low, high = self.q_range
        return (high - low).bit_length()

    @property
    def label(self) -> str:
        """How a recipe, a bit plan and an allocator candidate name it."""
        return f"gguf:{self.name}"

    def bits(self, rows: int, columns: int) -> int:
        """Bits a (rows, columns) matrix takes in this type; `columns` must be a multiple of `block`."""
        return rows * columns // self.block * self.bytes_per_block * 8


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("q4_0", 32, 32, (-8, 7), None, None, False, 18),
    GGUFType("q8_0", 32, 32, (-128, 127), None, None, False, 34),
    GGUFType("q4_1", 32, 32, (0, 15), None, None, True, 20),
    GGUFType("q5_1", 32, 32, (0, 31), None, None, True, 24),
    GGUFType("q2_k", 256, 16, (0, 3), (0, 15), (0, 15), False, 84),
    GGUFType("q3_k", 256, 16, (-4, 3), (-32, 31), None, False, 110),
    GGUFType("q4_k", 256, 32, (0, 15), (0, 63), (0, 63), False, 144),
    GGUFType("q5_k", 256, 32, (0, 31), (0, 63), (0, 63), False, 176),
    GGUFType("q6_k", 256, 16, (-32, 31), (-128, 127), None, False, 210),
)}
GGUF_LABELS: tuple[str, ...] = tuple(t.label for t in GGUF_TYPES.values())


def gguf_type(label: str) -> GGUFType:
    """The type a `gguf:<name>` label names (ValueError, a recipe error, for an unknown one)."""
    name = label.removeprefix("gguf:")
    if not label.startswith("gguf:") or name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {label!r}; choose one of {', '.join(GGUF_LABELS)}")
    return GGUF_TYPES[name]
