"""What a `model:` string names: a local folder or a Hugging Face hub id, decided before anything loads.

A string that does not exist locally is a hub id only when it could be one (`owner/name`, or a bare legacy
`name` such as `gpt2`) and nothing says it is a path: `./m`, `../m`, `/m`, `~/m`, `a/b/c`, a name with spaces,
or `demo/model` where `demo/` exists but `demo/model` does not are paths, and a missing path is an error naming
where it was looked for. Without this, a mistyped folder went to the hub and came back, after retries, as an
error about repository names.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub's validate_repo_id: [\w.-], at most 96 characters, no "--" or "..", not starting or ending
# in "-" or "."; one optional owner.
_HUB_PART = r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")
RELATIVE_NOTE = "a relative path resolves against the recipe's folder; for --model and `compress eval`, the current folder"


@dataclass(frozen=True)
class ModelRef:
    """`ref` resolved: `folder` when it is a local model folder, else `hub_id`; `local` is where a folder was sought."""

    ref: str
    local: Path
    folder: Path | None = None
    hub_id: str | None = None

    @property
    def resolved(self) -> str:
        return str(self.folder) if self.folder is not None else str(self.hub_id)


class ModelRefError(ValueError):
    """`ref` can only be a local path, and there is no model folder there."""


def says_path(ref: str, base_dir: Path) -> bool:
    """True when `ref` can only mean a local path (see the module docstring)."""
    if ref.startswith(("./", "../", "/", "~", ".\\")) or ref in (".", "..") or "\\" in ref:
        return True
    if not HUB_ID.fullmatch(ref):
        return True
    first, _, rest = ref.partition("/")
    return bool(rest) and (base_dir / first).exists()


def resolve_model_ref(ref: str, base_dir: Path) -> ModelRef:
    """Classify `ref` against `base_dir` (the recipe's folder, or the current folder for --model / eval).

    Raises ModelRefError naming the absolute path when `ref` is a path and no folder is there.
    """
    local = Path(os.path.expanduser(ref))
    local = (local if local.is_absolute() else base_dir / local).resolve()
    if local.is_dir():
        return ModelRef(ref, local, folder=local)
    if local.exists():
        raise ModelRefError(f"model path is a file, not a folder: {local} (a model folder holds config.json and "
                            "the weights)")
    if says_path(ref, base_dir):
        raise ModelRefError(f"model folder not found: {local} ({RELATIVE_NOTE})")
    return ModelRef(ref, local, hub_id=ref)


def offline_hub_problem(model: ModelRef) -> str | None:
    """With HF_HUB_OFFLINE=1, why a hub id cannot load (not in the local cache); None when it can, or online.

    Says both readings of the string, since `demo/model` may be a folder the user expected beside the recipe.
    Checked from the cache's files, so it costs no network call and no retries.
    """
    if model.hub_id is None or os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model.hub_id, "config.json")
    if isinstance(cached, str):
        return None
    return (f"model '{model.ref}' is neither a local folder (not found: {model.local}; {RELATIVE_NOTE}) nor a hub "
            "model in the local cache, and offline mode is on (HF_HUB_OFFLINE=1): fix the path, or download the "
            f"model once online (`huggingface-cli download {model.hub_id}`)")
