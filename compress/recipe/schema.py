"""The recipe file: schema, loading, `--set` overrides and error messages that point into the YAML.

    model: path/or/hub-id          # local folder or hub id; `--model` overrides
    calibration: {dataset: path/to/text.txt, samples: 128, seq_len: 512, seed: 0}
    passes:                        # applied in order; each item is {pass-name: {params}}
      - rtn: {bits: 4, group_size: 128, symmetric: true}
    evaluate:
      perplexity: [{dataset: path/to/eval.txt, seq_len: 512}]

Everything is validated before any model is loaded, and every problem is reported at once as
`recipe.yaml:14 passes[2].rtn.bits: expected ..., got 16`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, Field, ValidationError

from compress.recipe.datasets import is_hub_dataset
from compress.recipe.model_ref import ModelRef, ModelRefError, resolve_model_ref
from compress.recipe.export_config import ExportConfig, format_problems
from compress.recipe.errors import RecipeError, RecipeIssue, UserError
from compress.recipe.reading import (
    YamlProblems,
    format_loc,
    load_yaml_with_marks,
    path_problem,
    read_text_file,
    utf8_problem,
)
from compress.recipe.registry import (
    MAX_PER_PHASE,
    PASS_ORDER,
    EvaluatorDef,
    PassDef,
    PassKind,
    StrictConfig,
    available_evaluators,
    available_passes,
    did_you_mean,
)

Loc = tuple[str | int, ...]

# A library caller who parses a recipe without the runner: the core never imports plugins, so say what to import.
NOTHING_REGISTERED = " (nothing is registered: `import compress.app.builtins` first, as compress.app.runner does)"


class CalibrationConfig(StrictConfig):
    """Calibration text: `samples` random windows of `seq_len` tokens, drawn reproducibly from `seed`."""

    dataset: str
    samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=8, le=1_000_000)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="torch generators take 0 to 2^63 - 1")
    batch_size: int = Field(8, ge=1, le=100_000, description="windows per forward pass while calibrating")
    route_all_experts: bool = Field(False, description="MoE: feed every calibration token to every expert's linears "
                                    "(outputs still combine only the routed experts)")
    min_expert_tokens: int = Field(32, ge=0, le=10**12, description="MoE: flag experts calibrated on fewer tokens than this")
    offload: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto", description="where the activations between decoder layers live (2 x samples x seq_len x hidden): "
        "`device` (the compute device), `cpu` (host memory, one batch on the device at a time), `disk` (one file "
        "per batch, about two batches in memory), or `auto`: the first that fits comfortably (compress/engine/activations.py)")
    offload_dir: str | None = Field(None, description="folder for `disk` offload's scratch files (default: the "
                                    "run's staging folder, on the output's disk); a temporary folder inside it is "
                                    "removed when the sweep ends")


class ReportConfig(StrictConfig):
    """What report.html shows beyond the passes' own results.

        report: {prompts: ["The capital of France is"], new_tokens: 32}
        report: {continuations: false}   # skip them (a lazy run reads its layers once per generated token)

    By default the prompts are the first sentences of the calibration text (else of the first evaluation text).
    """

    continuations: bool = Field(True, description="greedy continuations of a few prompts, baseline beside compressed")
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        None, min_length=1, max_length=16, description="default: the first 3 sentences of the calibration text")
    new_tokens: int = Field(16, ge=1, le=256, description="tokens generated per prompt (each one forward of every prompt at once)")


class RecipeFile(StrictConfig):
    """Top level of a recipe file, before the pass and evaluator sections are checked against the registries."""

    model: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    trust_remote_code: bool = False
    strict_weights: bool = Field(True, description="refuse a checkpoint whose tensors do not match the model its "
                                 "config.json describes (missing ones would be randomly initialised, unexpected ones "
                                 "dropped); false loads it anyway and lists them in the report's fallbacks")
    lazy: bool = Field(False, description="build the model on `meta`, read one decoder layer at a time from the "
                       "shards and write each compressed layer to <output>/model as it finishes (compress/engine/lazy.py)")
    max_memory: dict[int | str, str] | None = Field(None, description="evaluation: spread the model over devices with "
                                              "accelerate, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB}")
    calibration: CalibrationConfig | None = None
    passes: list[Any] = Field(default_factory=list)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    export: ExportConfig | None = None
    report: ReportConfig | None = None


@dataclass(frozen=True)
class PassStep:
    index: int
    name: str
    definition: PassDef
    config: StrictConfig

    @property
    def label(self) -> str:
        return f"passes[{self.index}].{self.name}"

    @property
    def kind(self) -> PassKind:
        """What this step does (its pass's kind, or what its config says it acts as)."""
        return self.definition.kind_of(self.config)

    @property
    def needs_calibration(self) -> bool:
        """Whether this step needs calibration windows (its pass's, or its config's: see PassDef.calibrates)."""
        return self.definition.calibrates(self.config)


@dataclass(frozen=True)
class EvalStep:
    name: str
    definition: EvaluatorDef
    config: StrictConfig
    loc: Loc = ()  # where in the recipe, e.g. ("evaluate", "perplexity", 0)


@dataclass(frozen=True)
class Recipe:
    source: Path | None
    model: str | None
    dtype: str
    device: str
    trust_remote_code: bool
    calibration: CalibrationConfig | None
    passes: tuple[PassStep, ...]
    evaluations: tuple[EvalStep, ...]
    export: ExportConfig | None = None
    report: ReportConfig | None = None  # None: the defaults (ReportConfig())
    lazy: bool = False
    max_memory: dict[str, str] | None = None
    strict_weights: bool = True
    # where a local folder was looked for when `model` went to the hub as an id (for the loader's message if the hub
    # has no such model either: `demo/model` may be a folder the user expected beside the recipe)
    model_local: Path | None = None
    # 1-based line of a YAML path in the recipe file (None for --set values): for problems found after validation
    line_of: Callable[[Loc], int | None] = dataclasses.field(default=lambda loc: None, compare=False, repr=False)

    def where(self, loc: Loc) -> str:
        """`recipe.yaml:12 calibration.seq_len`: a recipe location for a message about a value found wrong later."""
        line, filename = self.line_of(loc), str(self.source or "<recipe>")
        return f"{filename}:{line} {format_loc(loc)}" if line is not None else f"{filename} (--set) {format_loc(loc)}"

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.passes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe with defaults filled in and paths resolved: what actually ran."""
        evaluate: dict[str, list[dict[str, Any]]] = {}
        for step in self.evaluations:
            evaluate.setdefault(step.name, []).append(step.config.model_dump(mode="json"))
        return {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "trust_remote_code": self.trust_remote_code,
            "strict_weights": self.strict_weights,
            "lazy": self.lazy,
            "max_memory": self.max_memory,
            "calibration": self.calibration.model_dump(mode="json") if self.calibration else None,
            "passes": [{s.name: s.config.model_dump(mode="json")} for s in self.passes],
            "evaluate": evaluate,
            **({"export": self.export.model_dump(mode="json")} if self.export else {}),
            **({"report": self.report.model_dump(mode="json")} if self.report else {}),
        }


# ---------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, *, overrides: Sequence[str] = (), model: str | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    text = read_text_file(path)
    recipe = parse_recipe(text, filename=str(path), base_dir=path.parent, overrides=overrides, model=model)
    return dataclasses.replace(recipe, source=path.resolve())


def parse_recipe(
    text: str,
    *,
    filename: str = "<recipe>",
    base_dir: Path | None = None,
    overrides: Sequence[str] = (),
    model: str | None = None,
) -> Recipe:
    try:
        data, root = load_yaml_with_marks(text)
    except YamlProblems as exc:
        raise RecipeError(filename, exc.issues) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(filename, [RecipeIssue("", f"expected a mapping at the top level, got {type(data).__name__}", 1)])

    overridden: list[Loc] = []
    for assignment in overrides:
        overridden.append(_apply_override(data, assignment))
    if model is not None:
        # (an unusable --model path is reported by resolve_model, like the recipe's own `model:`)
        data["model"] = str(Path(model).resolve()) if path_problem(model) is None and Path(model).exists() else model
        overridden.append(("model",))

    checker = _Checker(filename, root, overridden, base_dir or Path.cwd())
    recipe = checker.check(data)
    if checker.issues:
        raise RecipeError(filename, checker.issues)
    assert recipe is not None
    return recipe


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() for error messages: bounded in length, and safe for ints too long to print (Python's 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>" if isinstance(value, int) else "<value>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_key_path(key_path: str) -> list[str | int]:
    """'passes[0].rtn.bits' or 'passes.0.rtn.bits' -> ['passes', 0, 'rtn', 'bits']."""
    parts: list[str | int] = []
    for token in re.sub(r"\[(\d+)\]", r".\1", key_path).split("."):
        if not token:
            raise UserError(f"--set: malformed key path {key_path!r}")
        parts.append(int(token) if token.isdigit() else token)
    return parts


def _apply_override(data: dict[str, Any], assignment: str) -> Loc:
    """Apply one `key.path=value` (value parsed as YAML) to the raw recipe data."""
    if "=" not in assignment:
        raise UserError(f"--set expects key.path=value, got {assignment!r}")
    key_path, raw_value = assignment.split("=", 1)
    parts = split_key_path(key_path.strip())
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        raise UserError(f"--set {key_path}: value {raw_value!r} is not valid YAML") from None
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _descend(node, part, parts[depth + 1], key_path)
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise UserError(f"--set {key_path}: index {last} is out of range (the list has {len(node)} items)")
    elif not isinstance(node, dict):
        raise UserError(f"--set {key_path}: cannot set a key inside a {type(node).__name__}")
    node[last] = value
    return tuple(parts)


def _descend(node: Any, part: str | int, next_part: str | int, key_path: str) -> Any:
    if isinstance(node, list):
        if not isinstance(part, int) or part >= len(node):
            raise UserError(f"--set {key_path}: index {part} is out of range (the list has {len(node)} items)")
        return node[part]
    if not isinstance(node, dict):
        raise UserError(f"--set {key_path}: cannot descend into a {type(node).__name__}")
    if node.get(part) is None:
        node[part] = [] if isinstance(next_part, int) else {}
    return node[part]


# ---------------------------------------------------------------------------------------------------
# Validation


def line_of(root: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the deepest YAML node along `loc` (the key's line for a mapping key)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = _pairs_by_key(node).get(str(part))
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _pairs_by_key(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The mapping's (key node, value node) pairs by key text, built once per node: a recipe with thousands of
    problems in one big mapping is located in linear time, not by a scan per problem."""
    index = getattr(node, "_pairs_by_key", None)
    if index is None:
        index = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                index.setdefault(key.value, (key, value))
        setattr(node, "_pairs_by_key", index)
    return index


def _model_fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the (nested) model that `loc` points into, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            break
        current = _unwrap_model(current.model_fields[part].annotation)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def describe_pydantic_error(error: Mapping[str, Any], model: type[BaseModel], loc: Loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        fields = _model_fields_at(model, loc[:-1])
        return f"unknown key '{key}'.{did_you_mean(key, fields)}"
    if kind == "missing":
        return "missing required key"
    message = error["msg"]
    message = re.sub(r"^Value error, ", "", message)  # a validator's own ValueError text is the message
    message = re.sub(r"^(Input|Value) should be", "expected", message)
    message = re.sub(r"^String should match pattern", "expected a string matching", message)
    return f"{message[0].lower()}{message[1:]}, got {short_repr(error.get('input'))}"


class _Checker:
    """Collects every problem in one recipe, each with its YAML path and line."""

    def __init__(self, filename: str, root: yaml.Node | None, overridden: list[Loc], base_dir: Path):
        self.filename = filename
        self.root = root
        self.overridden = overridden
        self.base_dir = base_dir
        self.issues: list[RecipeIssue] = []

    def add(self, loc: Loc, message: str) -> None:
        self.issues.append(RecipeIssue(format_loc(loc), message, self.line(loc)))

    def line(self, loc: Loc) -> int | None:
        from_override = any(loc[: len(o)] == o for o in self.overridden)
        # Not from --set: always a line, the file's first for a problem with the file as a whole (or an empty one).
        return None if from_override else (line_of(self.root, loc) or 1)

    def validate(self, model: type[StrictConfig], data: Any, loc: Loc) -> StrictConfig | None:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                error_loc = loc + tuple(error["loc"])
                self.add(error_loc, describe_pydantic_error(error, model, tuple(error["loc"])))
            return None

    def check(self, data: dict[str, Any]) -> Recipe | None:
        top = self.validate(RecipeFile, data, ())
        if top is None:
            # Still check the pass list so one run reports as much as possible.
            passes_data = data.get("passes")
            if isinstance(passes_data, list):
                self.check_passes(passes_data, None)
            return None
        assert isinstance(top, RecipeFile)
        max_memory = self.check_max_memory(top.max_memory)
        calibration = self.check_calibration(top.calibration)
        steps = self.check_passes(top.passes, calibration)
        self.check_lazy(top, steps)
        evaluations = self.check_evaluate(top.evaluate)
        model = self.resolve_model(top.model)
        export = self.check_export(top.export, steps)
        if self.issues:
            return None
        return Recipe(
            source=None,
            model=model.resolved if model is not None else None,
            model_local=model.local if model is not None and model.folder is None else None,
            dtype=top.dtype,
            device=top.device,
            trust_remote_code=top.trust_remote_code,
            calibration=calibration,
            passes=tuple(steps),
            evaluations=tuple(evaluations),
            export=export,
            report=top.report,
            lazy=top.lazy,
            max_memory=max_memory,
            strict_weights=top.strict_weights,
            line_of=self.line,
        )

    def check_max_memory(self, budget: dict[int | str, str] | None) -> dict[str, str] | None:
        """Devices and sizes as accelerate will read them at evaluation, read by accelerate's own parser now."""
        if not budget:
            return None
        from accelerate.utils import convert_file_size_to_int  # only when the recipe sets max_memory: it imports torch

        for device, size in budget.items():
            loc: Loc = ("max_memory", device)
            if not (isinstance(device, int) and device >= 0 or device == "cpu" or str(device).isdigit()):
                self.add(loc, f"expected a GPU index (0, 1, ...) or cpu, got {short_repr(device)}")
            try:
                valid = convert_file_size_to_int(size) > 0
            except (ValueError, OverflowError):
                valid = False
            if not valid:
                self.add(loc, f"expected a size such as 70GiB or 500MB, got {short_repr(size)}")
        return {str(k): v for k, v in budget.items()}

    def check_export(self, export: ExportConfig | None, steps: list[PassStep]) -> ExportConfig | None:
        """The format must hold what the passes produce; checked now, before any calibration."""
        if export is None:
            return None
        for problem in format_problems(export.format, steps):
            self.add(("export", "format"), problem)
        folder = self.as_path(export.path, ("export", "path")) if export.path is not None else None
        if folder is not None and not folder.is_absolute():
            export = export.model_copy(update={"path": str((self.base_dir / folder).resolve())})
        return export

    def resolve_path(self, ref: str, loc: Loc) -> str:
        if is_hub_dataset(ref):
            return ref
        path = self.as_path(ref, loc)
        if path is None:
            return ref
        if not path.is_absolute():
            path = self.base_dir / path
        if not path.is_file():
            self.add(loc, f"file not found: {path} (relative paths resolve against the recipe's folder)")
        else:
            self.check_utf8(path, loc)
        return str(path.resolve())

    def check_utf8(self, path: Path, loc: Loc) -> None:
        """Text files the run reads (calibration, evaluation, plans) must be UTF-8; told now, not after the model loads."""
        problem = utf8_problem(path)
        if problem:
            self.add(loc, f"{path}: {problem}")

    def resolve_path_fields(self, config: StrictConfig, loc: Loc) -> StrictConfig:
        """Files a pass reads (a config's `path_fields`, e.g. a bit plan) resolve against the recipe's folder."""
        updates = {}
        for field_name in getattr(config, "path_fields", ()):
            value = getattr(config, field_name)
            if isinstance(value, str):
                updates[field_name] = self.resolve_path(value, loc + (field_name,))
        return config.model_copy(update=updates) if updates else config

    def as_path(self, ref: str, loc: Loc) -> Path | None:
        """`ref` as a path with `~` expanded, or None (and an issue) when no file system could hold it."""
        problem = path_problem(ref)
        if problem:
            self.add(loc, problem)
            return None
        try:
            return Path(ref).expanduser()
        except RuntimeError:  # "~someone" with no such user
            self.add(loc, f"cannot expand the home folder in {short_repr(ref)}")
            return None

    def resolve_model(self, ref: str | None) -> ModelRef | None:
        """A local folder (made absolute) or a hub id; a path with no folder there is an issue naming it."""
        if ref is None or self.as_path(ref, ("model",)) is None:
            return None  # no model: the CLI asks for --model when it needs one
        # --model is typed at a prompt, so it is relative to where the user stands; `model:` to the recipe's folder
        base_dir = Path.cwd() if ("model",) in self.overridden else self.base_dir
        try:
            return resolve_model_ref(ref, base_dir)
        except ModelRefError as exc:
            self.add(("model",), str(exc))
            return None

    def check_calibration(self, calibration: CalibrationConfig | None) -> CalibrationConfig | None:
        if calibration is None:
            return None
        updates: dict[str, Any] = {"dataset": self.resolve_path(calibration.dataset, ("calibration", "dataset"))}
        if calibration.offload_dir is not None:
            if calibration.offload in ("device", "cpu"):
                self.add(("calibration", "offload_dir"), f"only `offload: disk` or `auto` writes activations to "
                         f"disk, and this recipe sets `offload: {calibration.offload}`; remove offload_dir or change offload")
            folder = self.as_path(calibration.offload_dir, ("calibration", "offload_dir"))
            if folder is not None:
                updates["offload_dir"] = str((folder if folder.is_absolute() else self.base_dir / folder).resolve())
        return calibration.model_copy(update=updates)

    def check_passes(self, items: list[Any], calibration: CalibrationConfig | None) -> list[PassStep]:
        registry = available_passes()
        steps: list[PassStep] = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                item = {item: {}}  # "- rtn" is shorthand for "- rtn: {}"
            if not isinstance(item, dict) or len(item) != 1:
                self.add(("passes", index), "expected one {pass-name: {params}} mapping per list item")
                continue
            name, params = next(iter(item.items()))
            if name not in registry:
                self.add(("passes", index, name), f"unknown pass '{name}'.{did_you_mean(str(name), list(registry))}"
                         + NOTHING_REGISTERED * (not registry))
                continue
            definition = registry[name]
            config = self.validate(definition.config, params if params is not None else {}, ("passes", index, name))
            if config is not None:
                config = self.resolve_path_fields(config, ("passes", index, name))
                steps.append(PassStep(index, name, definition, config))
        self.check_chain(steps, calibration)
        return steps

    def check_lazy(self, top: RecipeFile, steps: list[PassStep]) -> None:
        if top.lazy and top.export is not None and top.export.format != "compressed-tensors":
            self.add(("export", "format"), f"`lazy: true` packs each layer as it finishes, which is written for "
                     f"compressed-tensors only (got {top.export.format!r}); <output>/model holds the dequantized "
                     "weights in any case")
        for step in steps:
            if top.lazy and step.definition.scope == "model":
                self.add(("passes", step.index, step.name), f"'{step.name}' needs the whole model in memory, "
                         "which `lazy: true` never loads; run it without lazy loading")
            if top.lazy and step.kind == "compensate":
                self.add(("passes", step.index, step.name), f"'{step.name}' writes a LoRA adapter beside the "
                         "checkpoint, which the layer-by-layer export of `lazy: true` does not; run it without lazy "
                         "loading")

    def check_chain(self, steps: list[PassStep], calibration: CalibrationConfig | None) -> None:
        """Calibration where a pass needs it, a consumer after each allocation, and the order of PASS_ORDER."""
        kinds_after: list[set[str]] = []  # per step, the kinds of the passes after it (one walk, not one per step)
        later: set[str] = set()
        for step in reversed(steps):
            kinds_after.append(set(later))
            later.add(step.kind)
        for position, (step, after) in enumerate(zip(steps, reversed(kinds_after))):
            loc = ("passes", step.index, step.name)
            if step.kind == "compensate":
                self.check_compensation(step, steps[:position], loc)
            if step.needs_calibration and calibration is None:
                self.add(loc, f"pass '{step.name}' needs calibration data: add a `calibration:` section")
            if step.kind == "allocate" and "quantize" not in after:
                self.add(loc, f"'{step.name}' writes a bit plan, so a quantization pass must follow it")
            if step.kind == "allocate_sparsity" and "prune" not in after:
                self.add(loc, f"'{step.name}' writes per-layer sparsities, so a pruning pass must follow it")
        for step, problem in order_problems(steps):
            self.add(("passes", step.index, step.name), problem)

    def check_compensation(self, step: PassStep, before: list[PassStep], loc: Loc) -> None:
        """A correction of the quantizer's error needs that quantizer right before it (a layer pass: the same
        sweep, where the weights before quantization are still at hand) and no pruning (it is dense)."""
        previous = before[-1] if before else None
        if previous is None or previous.kind != "quantize" or previous.definition.scope != "layer":
            self.add(loc, f"'{step.name}' corrects the error of the layer quantizer right before it (rtn, gptq, "
                          "signround, awq): put it directly after one")
        pruning = next((s for s in before if s.kind == "prune"), None)
        if pruning is not None:
            self.add(loc, f"'{step.name}' adds a dense correction, which would undo the sparsity of "
                          f"'{pruning.name}' (passes[{pruning.index}]): leave one of them out")

    def check_evaluate(self, sections: dict[str, Any]) -> list[EvalStep]:
        registry = available_evaluators()
        steps: list[EvalStep] = []
        for name, items in sections.items():
            if name not in registry:
                self.add(("evaluate", name), f"unknown evaluator '{name}'.{did_you_mean(name, list(registry))}"
                         + NOTHING_REGISTERED * (not registry))
                continue
            listed = items if isinstance(items, list) else [items]
            for index, params in enumerate(listed):
                loc: Loc = ("evaluate", name, index) if isinstance(items, list) else ("evaluate", name)
                config = self.validate(registry[name].config, params, loc)
                if config is None:
                    continue
                steps.append(EvalStep(name, registry[name], self.resolve_eval_paths(config, loc), loc))
        return steps

    def resolve_eval_paths(self, config: StrictConfig, loc: Loc) -> StrictConfig:
        """An evaluator's `dataset` and `.jsonl` `tasks` files and its `data_dir` folder resolve against the recipe."""
        updates: dict[str, Any] = {}
        dataset = getattr(config, "dataset", None)
        if isinstance(dataset, str):
            updates["dataset"] = self.resolve_path(dataset, loc + ("dataset",))
        tasks = getattr(config, "tasks", None)
        if isinstance(tasks, list):
            updates["tasks"] = [self.resolve_path(t, loc + ("tasks", i)) if t.endswith(".jsonl") else t
                                for i, t in enumerate(tasks)]
        data_dir = getattr(config, "data_dir", None)
        folder = self.as_path(data_dir, loc + ("data_dir",)) if isinstance(data_dir, str) else None
        if folder is not None:
            folder = folder if folder.is_absolute() else self.base_dir / folder
            if not folder.is_dir():
                self.add(loc + ("data_dir",), f"folder not found: {folder} (relative paths resolve against the recipe's folder)")
            updates["data_dir"] = str(folder.resolve())
        return config.model_copy(update=updates) if updates else config


def _phase(kind: PassKind) -> int:
    return next(i for i, kinds in enumerate(PASS_ORDER) if kind in kinds)


def order_problems(steps: Sequence[PassStep]) -> list[tuple[PassStep, str]]:
    """The steps that break PASS_ORDER (a phase after a later one, or too many of a kind), each with its reason."""
    problems: list[tuple[PassStep, str]] = []
    latest: PassStep | None = None  # the step of the furthest phase so far
    seen: dict[PassKind, PassStep] = {}
    for step in steps:
        first = seen.setdefault(step.kind, step)
        if first is not step and MAX_PER_PHASE.get(step.kind, len(steps)) < 2:
            problems.append((step, f"'{step.name}' would be a second quantizer after '{first.name}' "
                                   f"(passes[{first.index}]): {_WHY['second quantizer']}. {order_hint()}"))
        elif latest is not None and _phase(step.kind) < _phase(latest.kind):
            after_quantizer = latest.kind in ("quantize", "quantize_embeddings")
            reason = _WHY["after quantizer"] if after_quantizer else _WHY.get(latest.kind) or _WHY[step.kind]
            problems.append((step, f"'{step.name}' must come before '{latest.name}' (passes[{latest.index}]): "
                                   f"{reason}. {order_hint()}"))
        if latest is None or _phase(step.kind) >= _phase(latest.kind):
            latest = step
    return problems


_WHY: dict[str, str] = {
    "after quantizer": "the export saves the quantizer's integer codes, so a later change to the weights would be "
                       "evaluated but not saved",
    "second quantizer": "it would re-round rounded weights and the export keeps one set of codes; use one quantizer "
                        "(per-module bit widths: an `allocate` pass or `plan:`; AWQ scales with GPTQ rounding: "
                        "`awq: {quantize: false}`, then gptq)",
    "compensate": "it corrects the finished quantizer's error, so the quantizer comes first",
    "quantize_cache": "the KV-cache scales are calibrated on the keys and values of the final weights, so whatever "
                      "changes the weights comes first",
    "rotate": "it rotates every weight, so masks, sparsities, scales and bit plans made before it would fit weights "
              "that are gone",
    "restructure": "it removes layers or channels, so masks, sparsities and bit plans made before it would name the "
                   "wrong modules",
}


def order_hint() -> str:
    """The order that works, with the registered pass names of each phase."""
    by_kind: dict[str, list[str]] = {}
    for name, definition in sorted(available_passes().items()):
        by_kind.setdefault(definition.kind, []).append(name)
    phases = [f"{'/'.join(kinds)} ({', '.join(name for kind in kinds for name in by_kind.get(kind, [])) or 'none'})"
              for kinds in PASS_ORDER]
    return "Order that works: " + ", then ".join(phases) + ", one quantizer at most"


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(copy.deepcopy(data), sort_keys=False)
