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
