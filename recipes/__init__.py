"""Ready-made recipes, installed with the package so `compress recipes list` works after `pip install`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.recipe.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    description: str  # the recipe's first comment line


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def shipped_recipes() -> list[ShippedRecipe]:
    return [ShippedRecipe(p.stem, p, _first_comment(p)) for p in sorted(RECIPES_DIR.glob("*.yaml"))]


def resolve_recipe_path(ref: str) -> Path:
    """A recipe file path, or the name of a shipped recipe ("demo" -> recipes/demo.yaml)."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = {r.name: r.path for r in shipped_recipes()}
    if ref in shipped:
        return shipped[ref]
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        raise UserError(f"recipe file not found: {ref}")
    from compress.recipe.registry import did_you_mean

    raise UserError(f"no recipe file or shipped recipe named {ref!r}.{did_you_mean(ref, list(shipped))}")


# Keys whose string values (or list items, for zero-shot `tasks`) are files or folders a recipe reads.
PATH_KEYS = frozenset({"model", "dataset", "data_dir", "tasks", "file", "plan", "sensitivity_file"})


def portable_text(path: Path) -> str:
    """The recipe file's text with each relative path it reads made absolute, comments and layout kept.

    `compress recipes show demo > my.yaml` then runs from any folder: `model: demo/model` resolves against the
    recipe's folder, which for the copy is wherever the user saved it. Only values that name something existing
    beside the recipe change; hub ids (`meta-llama/...`), data set names (`wikitext2`) and task names stay.
    """
    import yaml

    text = path.read_text(encoding="utf-8")
    edits = sorted(_path_scalars(yaml.compose(text), path.parent), key=lambda edit: -edit[0])
    for start, end, absolute in edits:  # from the end, so earlier offsets stay valid
        text = text[:start] + absolute + text[end:]
    return text


def _path_scalars(node: object, base_dir: Path, under_path_key: bool = False) -> list[tuple[int, int, str]]:
    """(start, end, replacement) for each scalar under a PATH_KEYS key that names an existing relative path."""
    import json

    import yaml

    if isinstance(node, yaml.MappingNode):
        return [edit for key, value in node.value
                for edit in _path_scalars(value, base_dir, isinstance(key, yaml.ScalarNode) and key.value in PATH_KEYS)]
    if isinstance(node, yaml.SequenceNode):
        return [edit for item in node.value for edit in _path_scalars(item, base_dir, under_path_key)]
    if not (under_path_key and isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
        return []
    ref = Path(node.value).expanduser()
    if ref.is_absolute() or not (base_dir / ref).exists():
        return []
    absolute = str((base_dir / ref).resolve())
    # JSON's string syntax is YAML's double-quoted one: safe in block and flow context whatever the path holds
    plain = all(ch.isalnum() or ch in "/._-+" for ch in absolute)
    return [(node.start_mark.index, node.end_mark.index, absolute if plain else json.dumps(absolute))]
