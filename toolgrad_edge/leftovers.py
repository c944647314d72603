"""Temporary files named after the process that writes them, and the ones dead writers left.

Every temporary file or folder this project writes carries its writer's pid
in its name:

- ``.NAME.PID.partial`` / ``.NAME.PID.intermediate`` next to the file NAME
  being written (converter, quantizer, demo model);
- ``.KIND-PID-RANDOM...`` from ``tempfile`` (cache entries, llama-server's
  source download and unpacking), with KIND one of :data:`RANDOM_KINDS`.

A normal exit, an exception, Ctrl-C and SIGTERM remove them where they are
made; SIGKILL (the kernel's out-of-memory killer, ``kill -9``, a power cut)
cannot. So the next writer in the same folder finds the names whose writer
is no longer running and removes them (:func:`remove_leftovers`), and
``toolgrad-edge cache`` lists them.

A writer counts as running when its pid exists and, where the system says
when a process started (Linux's /proc), it started before the file was last
written: after a reboot or a pid reused by another program, the file is a
leftover all the same.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# The tags of temporary files named after the file they become.
NAMED_TAGS = ("partial", "intermediate")
# The prefixes of tempfile names (``.KIND-PID-...``).
RANDOM_KINDS = ("tmp", "download", "unpack")

_NAMED = re.compile(rf"^\.(?P<final>.+)\.(?P<pid>\d+)\.(?:{'|'.join(NAMED_TAGS)})$")
_RANDOM = re.compile(rf"^\.(?:{'|'.join(RANDOM_KINDS)})-(?P<pid>\d+)-")
# A process whose start is this close after the file's last write may still be its writer (clock granularity).
_START_SLACK_S = 2.0


def temp_path(final: Path, tag: str) -> Path:
    """``dir/NAME`` -> ``dir/.NAME.PID.TAG``: where this process writes NAME before renaming it into place."""
    assert tag in NAMED_TAGS, tag
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{tag}")


def temp_prefix(kind: str) -> str:
    """A ``tempfile`` prefix (``.KIND-PID-``) that names this process as the writer."""
    assert kind in RANDOM_KINDS, kind
    return f".{kind}-{os.getpid()}-"


def writer_pid(name: str) -> int | None:
    """The writer's pid in a temporary file's name, or None when the name is not one of ours."""
    match = _NAMED.match(name) or _RANDOM.match(name)
    return int(match["pid"]) if match else None


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _process_start(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), where /proc tells; None elsewhere."""
    boot = _boot_time()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if boot is None or len(fields) < 20:
        return None
    if fields[0] == "Z":  # a zombie writes nothing any more
        return float("inf")
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def writer_running(pid: int, last_write: float) -> bool:
    """Whether process ``pid`` exists and may be the one that last wrote at ``last_write``."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OverflowError:
        return False
    started = _process_start(pid)
    return started is None or started <= last_write + _START_SLACK_S


@dataclass(frozen=True)
class Leftover:
    """A temporary file or folder whose writer is not running (or is, when ``running``)."""

    path: Path
    pid: int
    size: int  # bytes; a folder's files together
    running: bool = False

    @property
    def reason(self) -> str:
        return f"being written by pid {self.pid}" if self.running else f"left by pid {self.pid}, not running"


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (without following links)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def find_leftovers(folder: Path, include_running: bool = False) -> list[Leftover]:
    """The temporary files and folders directly in ``folder`` whose writer is not running."""
    found = []
    try:
        children = list(Path(folder).iterdir())
    except OSError:
        return found
    for path in sorted(children):
        pid = writer_pid(path.name)
        if pid is None:
            continue
        try:
            mtime = path.lstat().st_mtime
        except OSError:
            continue  # removed meanwhile
        running = writer_running(pid, mtime)
        if running and not include_running:
            continue
        found.append(Leftover(path, pid, tree_size(path), running))
    return found


def remove(path: Path) -> None:
    """Remove a file or a whole folder; a file already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Leftover]:
    """Remove what dead writers left directly in ``folder``; returns what was removed."""
    removed = []
    for leftover in find_leftovers(folder):
        try:
            remove(leftover.path)
        except OSError:
            continue  # not ours to remove (permissions): `toolgrad-edge cache` still lists it
        removed.append(leftover)
    return removed


def describe_removed(folder: Path, removed: list[Leftover]) -> str:
    """One line for the user: what was removed, and how much space that freed."""
    names = ", ".join(item.path.name for item in removed[:3]) + (f" and {len(removed) - 3} more"
                                                                   if len(removed) > 3 else "")
    freed = sum(item.size for item in removed)
    return (f"note: removed {len(removed)} temporary file{'s' if len(removed) != 1 else ''} that a killed run left "
            f"in {folder} ({names}; {human_bytes(freed)} freed)")


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

