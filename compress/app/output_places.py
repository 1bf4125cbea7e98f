"""Every path a run writes, checked before the model loads and locked while the run lives.

A run writes its `--output` folder, maybe a recipe `export.path`, and maybe disk-offloaded activations under
`calibration.offload_dir`. Each is checked up front (exists and may not be replaced, is or holds an input,
cannot be written, sits inside another written folder), with a message naming the path as the user gave it
(`--output`, or the recipe key and line: `export.path (recipe.yaml:12)`), so nothing fails after hours of work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

from compress.engine.output import check_output_target, hold_output, named_paths, preflight_folder, preflight_output
from compress.recipe.errors import UserError
from compress.recipe.schema import Recipe


@dataclasses.dataclass(frozen=True)
class OutputPlaces:
    """The paths a run writes, each with the name the user gave it (for messages), and the inputs it must not touch."""

    output: Path
    overwrite: bool
    export: Path | None  # the recipe's export.path; None: the export (if any) goes inside the run folder
    export_label: str  # "export.path (recipe.yaml:12)"
    offload_dir: Path | None
    offload_label: str
    inputs: tuple[Path, ...]  # every existing file or folder the recipe names (model, data sets, offload_dir)

    @classmethod
    def of(cls, recipe: Recipe, output: Path, overwrite: bool) -> OutputPlaces:
        export = Path(recipe.export.path) if recipe.export is not None and recipe.export.path else None
        cal = recipe.calibration
        offload = Path(cal.offload_dir) if cal is not None and cal.offload_dir else None
        return cls(output, overwrite, export, recipe_label(recipe, ("export", "path")) if export else "export",
                   offload, recipe_label(recipe, ("calibration", "offload_dir")) if offload else "offload_dir",
                   recipe_inputs(recipe))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Lock the run folder and the export folder for the whole run (see `hold_output`)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(hold_output(self.output))
            if self.export is not None:
                stack.enter_context(hold_output(self.export, self.export_label))
            yield

    def check_nesting(self) -> None:
        refusal = nesting_refusal(self)
        if refusal is not None:
            raise UserError(refusal)


def recipe_inputs(recipe: Recipe) -> tuple[Path, ...]:
    """The recipe file and every existing file or folder the resolved recipe names, but the export path (an output)."""
    data = dict(recipe.to_dict())
    data.pop("export", None)
    return tuple(([recipe.source] if recipe.source is not None else []) + named_paths(data))


def recipe_label(recipe: Recipe, loc: tuple[str, ...]) -> str:
    """`export.path (recipe.yaml:12)`: the recipe key, and where the file sets it (`--set` when it does not)."""
    key = ".".join(loc)
    if recipe.source is None:
        return key
    line = recipe.line_of(loc)  # the lines the recipe was validated with: the file is not read again
    return f"{key} ({recipe.source.name}:{line})" if line is not None else f"{key} ({recipe.source.name}, --set)"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def nesting_refusal(places: OutputPlaces) -> str | None:
    """A written folder inside one that is built elsewhere and renamed into place would vanish with it (and an
    export folder holding the run folder would be replaced under it)."""
    export, output = places.export, places.output
    if export is not None and (_inside(export, output) or _inside(output, export)):
        return (f"{places.export_label} {export} and --output {output} overlap; an export needs a folder of its "
                "own (remove export.path to export into the run folder, as <output>/export-FORMAT)")
    for folder, label in ((output, "--output"), (export, places.export_label)):
        if places.offload_dir is not None and folder is not None and _inside(places.offload_dir, folder):
            return (f"{places.offload_label} {places.offload_dir} lies inside {label} {folder}, which is built "
                    "elsewhere and renamed into place; choose an offload_dir outside it")
    return None


def preflight_places(places: OutputPlaces, *, needed_bytes: int) -> None:
    """Every written path: not in the way, not an input, writable; the run folder's disk has `needed_bytes` free."""
    check_output_target(places.output, places.overwrite, inputs=places.inputs)
    if places.export is not None:
        check_output_target(places.export, places.overwrite, inputs=places.inputs, label=places.export_label)
    places.check_nesting()
    preflight_output(places.output, needed_bytes=needed_bytes)
    if places.export is not None:
        preflight_output(places.export, label=places.export_label)
    if places.offload_dir is not None:
        preflight_folder(places.offload_dir, places.offload_label)


def validate_places(places: OutputPlaces, *, with_output: bool) -> None:
    """`compress validate`: what `preflight_places` would refuse, decided without creating or writing anything.

    The run folder is checked only when validate was told it (`with_output`); export.path and offload_dir always.
    """
    if with_output:
        check_output_target(places.output, places.overwrite, inputs=places.inputs)
        could_write(places.output, "--output")
    if places.export is not None:
        check_output_target(places.export, places.overwrite, inputs=places.inputs, label=places.export_label)
        could_write(places.export, places.export_label)
    if with_output:
        places.check_nesting()
    if places.offload_dir is not None:
        if places.offload_dir.exists() and not places.offload_dir.is_dir():
            raise UserError(f"{places.offload_label} {places.offload_dir} exists and is not a folder; give a folder "
                            "(it is created if missing)")
        could_write(places.offload_dir, places.offload_label)


def could_write(target: Path, label: str) -> None:
    """`target` could be created: its nearest existing ancestor is a folder this process may write into."""
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {label} {target}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {label} {target}: {ancestor} is not writable; choose another path")
