"""Reading a recipe (or sweep) file into data plus the YAML node tree, refusing what YAML would read silently wrong.

What `yaml.safe_load` alone lets through, and this refuses with a line:

- a file over `MAX_FILE_BYTES`, or bytes that are not UTF-8 (the byte offset is named);
- duplicate keys in one mapping (YAML keeps the last, so `trust_remote_code: false` ... `true` means true);
- an anchor whose value contains its own alias (infinitely deep data), alias bombs that expand past `MAX_VALUES`,
  and nesting deeper than `MAX_DEPTH`.

Everything else is `yaml.safe_load`'s semantics: the same safe types, merge keys (`<<: *base`) included.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import yaml

from compress.recipe.errors import RecipeError, RecipeIssue, UserError

MAX_FILE_BYTES = 1_000_000  # a real recipe is a few kB; the cap keeps validation to seconds
MAX_VALUES = 100_000  # a real recipe has a few hundred; YAML aliases can make a small file expand exponentially
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"

# libyaml's parser when PyYAML was built with it: the same events and marks, about 3x faster on big files.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlProblems(Exception):
    """The file could not be read into recipe data; `issues` say where and why."""

    def __init__(self, issues: list[RecipeIssue]):
        super().__init__("; ".join(issue.message for issue in issues))
        self.issues = issues


def read_text_file(path: Path, *, kind: str = "recipe") -> str:
    """The file's text; a RecipeError naming the file when it is too large, unreadable or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecipeError(str(path), [RecipeIssue("", f"the file is {size:,} bytes; a {kind} is at most "
                                                          f"{MAX_FILE_BYTES:,} bytes (1 MB)", 1)], kind=kind)
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {kind} file {path}: {exc.strerror or exc}") from None
    return decode_utf8(raw, str(path), kind=kind)


def decode_utf8(raw: bytes, filename: str, *, kind: str = "recipe") -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not part of the text
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        message = (f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} cannot be decoded; "
                   "save the file as UTF-8")
        raise RecipeError(filename, [RecipeIssue("", message, line)], kind=kind) from None


def load_yaml_with_marks(text: str) -> tuple[Any, yaml.Node | None]:
    """The data (safe types only) and the node tree with line marks, from one parse. Raises YamlProblems."""
    loader = _BaseLoader(text)
    try:
        root = _compose(loader, text)
        if root is None:
            return None, None
        problems = node_problems(loader, root)
        if problems:
            raise YamlProblems(problems)
        return _construct(loader, root), root
    finally:
        loader.dispose()


TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; a recipe needs only a few levels"


def _compose(loader: Any, text: str) -> yaml.Node | None:
    try:
        return loader.get_single_node()
    except yaml.YAMLError as exc:
        problem = _yaml_problem(exc)
        if "maximum nesting depth" in problem:  # libyaml's own limit, far above ours
            raise YamlProblems([RecipeIssue("", TOO_DEEP, _yaml_line(exc, text))]) from None
        raise YamlProblems([RecipeIssue("", f"not valid YAML: {problem}", _yaml_line(exc, text))]) from None
    except RecursionError:  # PyYAML's pure-Python composer recurses once per level
        raise YamlProblems([RecipeIssue("", TOO_DEEP, 1)]) from None


def _construct(loader: Any, root: yaml.Node) -> Any:
    try:
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise YamlProblems([RecipeIssue("", f"not valid YAML: {_yaml_problem(exc)}",
                                        _yaml_line(exc, "") or root.start_mark.line + 1)]) from None
    except ValueError as exc:  # PyYAML converts numbers with int(), which refuses more than 4300 digits
        raise YamlProblems([RecipeIssue("", f"a value could not be read: {exc}", 1)]) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character or an invalid code point
        return f"unacceptable character #x{exc.character:04x}: control characters are not allowed"
    return getattr(exc, "problem", None) or str(exc)


def _yaml_line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(exc, "position", None)  # a ReaderError knows only its character offset
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else 1


def node_problems(loader: Any, root: yaml.Node) -> list[RecipeIssue]:
    """Cycles, depth, size and duplicate keys, found on the node graph before any data is built.

    Each node is visited once, however many aliases point at it, and its expanded size is remembered, so a
    billion-laughs file costs as many steps as it has nodes.
    """
    walk = _NodeWalk(loader)
    try:
        count = walk.size(root, 0, ())
    except _Stop as stop:
        return [stop.issue]
    except RecursionError:  # a chain of aliases, each nesting the previous one, deeper than Python's stack
        return [RecipeIssue("", TOO_DEEP, 1)]
    if count > MAX_VALUES:
        return [RecipeIssue("", f"more than {MAX_VALUES:,} values (YAML anchors and aliases expand); a recipe needs "
                                "far fewer", 1)]
    return walk.duplicates


class _Stop(Exception):
    def __init__(self, issue: RecipeIssue):
        self.issue = issue


class _NodeWalk:
    def __init__(self, loader: Any):
        self.loader = loader
        self.sizes: dict[int, int] = {}  # id(node) -> values when aliases are expanded
        self.open: set[int] = set()  # nodes whose value is being walked: meeting one again is a cycle
        self.duplicates: list[RecipeIssue] = []

    def size(self, node: yaml.Node, depth: int, path: tuple[str | int, ...]) -> int:
        if isinstance(node, yaml.ScalarNode):
            return 1
        if id(node) in self.sizes:
            return self.sizes[id(node)]
        if id(node) in self.open:
            raise _Stop(RecipeIssue(format_loc(path), "an anchor's value contains its own alias, which makes the data "
                                    "infinitely deep", node.start_mark.line + 1))
        if depth >= MAX_DEPTH:
            raise _Stop(RecipeIssue("", TOO_DEEP, node.start_mark.line + 1))
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self.check_keys(node, path)
            total = 1 + sum(self.size(k, depth + 1, path) + self.size(v, depth + 1, path + (_label(k),))
                            for k, v in node.value)
        else:
            total = 1 + sum(self.size(item, depth + 1, path + (i,)) for i, item in enumerate(node.value))
        self.open.discard(id(node))
        self.sizes[id(node)] = total
        return total

    def check_keys(self, node: yaml.MappingNode, path: tuple[str | int, ...]) -> None:
        """A key given twice in one mapping; keys a merge (`<<: *base`) brings in may be overridden, as YAML intends."""
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            try:
                key = self.loader.construct_object(key_node)  # `yes` and `true` are one key: compare what YAML reads
            except (yaml.YAMLError, ValueError):  # reported when the data is built
                continue
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key is refused when the data is built
                continue
            if earlier is None:
                first_line[key] = line
            else:
                lines = f"twice on line {line}" if earlier == line else f"lines {earlier} and {line}"
                self.duplicates.append(RecipeIssue(format_loc(path + (str(key),)), f"duplicate key {_short(key)} ({lines}): "
                                                   "YAML would silently keep only the last; remove one", line))


def _label(key_node: yaml.Node) -> str:
    return key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"


def _short(key: Any) -> str:
    text = repr(str(key))
    return text if len(text) <= 60 else text[:57] + "..."


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('passes', 0, 'rtn', 'bits') -> 'passes[0].rtn.bits'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------------
# Paths and text files a recipe names

PATH_MAX_BYTES = 4095  # Linux PATH_MAX less the terminating NUL
NAME_MAX_BYTES = 255  # one file or folder name, on every common file system


def path_problem(ref: str) -> str | None:
    """Why no file system could hold a file named `ref` (checking it would raise, not say "not found"), or None."""
    if "\x00" in ref:
        return "a path cannot contain a NUL character"
    try:
        encoded = os.fsencode(ref)
    except UnicodeEncodeError:  # a lone surrogate from a YAML "\ud800" escape
        return f"not a valid file name: {ref[:60]!r}"
    if len(encoded) > PATH_MAX_BYTES:
        return f"the path is {len(encoded):,} bytes long; file systems allow at most {PATH_MAX_BYTES:,}"
    longest = max(encoded.split(os.fsencode(os.sep)), key=len)
    if len(longest) > NAME_MAX_BYTES:
        return (f"a file or folder name in the path is {len(longest):,} bytes long; file systems allow at most "
                f"{NAME_MAX_BYTES}")
    return None


def utf8_problem(path: Path, chunk_bytes: int = 1 << 20) -> str | None:
    """Where `path` stops being UTF-8 ("byte 0xff at byte offset 1234, line 7"), read in chunks, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    held = len(exc.object) - len(chunk)  # bytes of an unfinished character kept from the last chunk
                    where = offset - held + exc.start
                    at_line = line + exc.object.count(b"\n", held, max(exc.start, held))
                    return (f"not UTF-8: byte 0x{exc.object[exc.start]:02x} at byte offset {where} (line {at_line}) "
                            "cannot be decoded; save it as UTF-8")
                line += chunk.count(b"\n")
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"not UTF-8: the file ends inside a character (byte offset {offset}); save it as UTF-8"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None
