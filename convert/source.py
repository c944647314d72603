"""Where a checkpoint comes from: a local folder, or a hub repo id fetched into the standard cache."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConversionError

# Only what conversion reads: weights, index, config, tokenizer, chat template, model card (license).
HUB_FILES = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    folder: Path
    name: str                 # used in output file names, e.g. "toolgrad-4b"
    repo_id: str | None = None


def resolve_source(source: str, revision: str | None = None, progress: bool = True) -> Source:
    """A local folder as is; otherwise ``owner/name`` from the hub (cached, resumable, offline-aware)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Source(path.resolve(), path.resolve().name)
    if path.exists():
        raise ConversionError(f"{source}: is a file; expected a checkpoint folder or a hub repo id (owner/name)")
    if not _REPO_ID.match(source):
        raise ConversionError(f"{source}: no such folder, and not a hub repo id of the form owner/name")
    return Source(_download(source, revision, progress), source.split("/")[1], source)


def _download(repo_id: str, revision: str | None, progress: bool) -> Path:
    # snapshot_download resumes partial files, reuses the HF cache and honours HF_HUB_OFFLINE.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as exc:
        raise ConversionError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE or no network); download it once online, or pass a local folder"
        ) from exc
    except GatedRepoError as exc:
        raise ConversionError(f"{repo_id}: gated on the hub; accept its terms and log in (hf auth login)") from exc
    except RevisionNotFoundError as exc:
        raise ConversionError(f"{repo_id}: revision {revision!r} does not exist") from exc
    except RepositoryNotFoundError as exc:
        raise ConversionError(f"{repo_id}: no such model repository on the hub (or it is private)") from exc
    except HfHubHTTPError as exc:
        raise ConversionError(f"{repo_id}: download failed: {exc}") from exc
    finally:
        if not progress:
            enable_progress_bars()


def read_license(folder: Path) -> str | None:
    """The ``license:`` of a model card's YAML front matter, if any."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config, tokenizer files) that must hold an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
