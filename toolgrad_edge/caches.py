"""What the caches hold, and removing it (``toolgrad-edge cache``).

Everything lives under the cache root (paths.py): converted and demo models,
the prefix cache, llguidance's token files, llama-server builds and the BFCL
checker environment. Temporary files that killed runs left (leftovers.py)
are listed on their own, wherever in the cache root they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .evaluate.checker_env import default_env_dir
from .leftovers import find_leftovers, remove, tree_size, writer_pid
from .model_resolution import check_record
from .paths import cache_root, llama_server_dir, llguidance_dir, models_dir, prefix_cache_dir

# The sections, in the order they are listed: name -> what it is.
SECTIONS: dict[str, str] = {
    "models": "GGUF models (convert's output, the assembled demo model)",
    "prefix": "saved llama.cpp states of tool prefixes",
    "llguidance": "llguidance's token files, one per model",
    "llama-server": "llama-server builds (build-server)",
    "bfcl-env": "BFCL's checker environment (eval)",
    "leftovers": "temporary files that killed runs left",
}


@dataclass(frozen=True)
class CacheItem:
    """One thing the cache holds: a file, or a folder counted whole."""

    section: str
    path: Path
    size: int
    count: int = 1  # files a grouped item stands for (the prefix cache's entries)
    note: str = ""
    kept: str = ""  # why --clean leaves it (a writer still runs; outside the cache root)

    @property
    def name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict:
        return {"section": self.section, "path": str(self.path), "bytes": self.size, "files": self.count,
                "note": self.note, "kept": self.kept or None}


def _files(folder: Path, pattern: str) -> list[Path]:
    try:
        return sorted(p for p in folder.glob(pattern) if p.is_file() and writer_pid(p.name) is None)
    except OSError:
        return []


def _dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and writer_pid(p.name) is None)
    except OSError:
        return []


def inventory() -> list[CacheItem]:
    """Every item of every section, leftovers last."""
    items: list[CacheItem] = []
    for path in _files(models_dir(), "[!.]*"):  # hidden files there are a model's check record (removed with it)
        items.append(CacheItem("models", path, tree_size(path)))
    states = _files(prefix_cache_dir(), "*.state")
    if states:
        items.append(CacheItem("prefix", prefix_cache_dir(), sum(tree_size(p) for p in states), len(states),
                               f"{len(states)} entr{'y' if len(states) == 1 else 'ies'}"))
    for path in _files(llguidance_dir(), "*"):
        items.append(CacheItem("llguidance", path, tree_size(path)))
    for path in _dirs(llama_server_dir()):
        items.append(CacheItem("llama-server", path, tree_size(path), note=f"llama-cpp-python {path.name}"))
    env = default_env_dir()
    if env.is_dir():
        outside = "" if env.is_relative_to(cache_root()) else "outside the cache root"
        items.append(CacheItem("bfcl-env", env, tree_size(env), note=outside, kept=outside))
    items += leftover_items()
    return items


def leftover_items() -> list[CacheItem]:
    """Temporary files in the folders where this project writes, with whether their writer still runs."""
    folders = [cache_root(), models_dir(), prefix_cache_dir(), llguidance_dir(), *_dirs(llama_server_dir())]
    items = []
    for folder in folders:
        for leftover in find_leftovers(folder, include_running=True):
            items.append(CacheItem("leftovers", leftover.path, leftover.size, note=leftover.reason,
                                   kept=leftover.reason if leftover.running else ""))
    return items


def select(items: list[CacheItem], names: list[str]) -> list[CacheItem]:
    """The items named: ``all``, a section, or an item's file name or path; ValueError names what is unknown."""
    if not names or "all" in names:
        return list(items)
    chosen: list[CacheItem] = []
    for name in names:
        found = [i for i in items if name == i.section or name == i.name or name == str(i.path)]
        if not found and name not in SECTIONS:
            known = ", ".join(["all", *SECTIONS])
            raise ValueError(f"{name!r} is neither a section ({known}) nor an item listed by `toolgrad-edge cache`.")
        chosen += [i for i in found if i not in chosen]
    return chosen


def clean(items: list[CacheItem]) -> list[CacheItem]:
    """Remove the items (never a kept one); returns what was removed."""
    removed = []
    for item in items:
        if item.kept:
            continue
        if item.section == "prefix":  # the entries, not the folder another process may be writing into
            for path in _files(item.path, "*.state"):
                remove(path)
        else:
            remove(item.path)
            if item.section == "models":
                remove(check_record(item.path))
        removed.append(item)
    return removed
