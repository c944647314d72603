"""Build llama.cpp's ``llama-server`` from the same llama.cpp this install runs.

llama-cpp-python's source distribution carries llama.cpp (``vendor/llama.cpp``);
building its ``llama-server`` target gives a server whose kernels, tokenizer
and chat templates match the in-process engine's exactly. The build is done
once per llama-cpp-python version and CPU variant, under the project's cache
(``<cache>/llama-server/<version>/build*/bin/llama-server``), and reused.

On a CPU with AMX the build names the CPU's other features instead of
``-march=native``: llama.cpp's AMX kernels crash on the first prompt there
(``hardware.kernel_plan``, docs/engines.md).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TextIO

from ..errors import ToolgradEdgeError
from ..hardware import cmake_cpu_args, cpu_flags
from ..leftovers import describe_removed, remove_leftovers, temp_prefix
from ..paths import llama_server_dir

# Set by callers (tests, benchmarks, ``serve --engine``'s users) to a llama-server binary.
ENV_BINARY = "TOOLGRAD_EDGE_LLAMA_SERVER"


class ServerBuildError(ToolgradEdgeError):
    """llama-server could not be built here."""


def build_root(version: str | None = None) -> Path:
    version = version or importlib.metadata.version("llama-cpp-python")
    return llama_server_dir() / version


def server_binary(version: str | None = None, flags: set[str] | None = None) -> Path:
    """Where the build for this version and this CPU puts llama-server (it may not exist yet)."""
    _, variant = cmake_cpu_args(cpu_flags() if flags is None else flags)
    return build_root(version) / ("build" if variant == "native" else f"build-{variant}") / "bin" / "llama-server"


def _run(cmd: list[str], log: TextIO, what: str) -> None:
    """Run ``cmd`` in a process group of its own, ended whole if this process is interrupted.

    cmake starts make and the compilers; ending cmake alone would leave them compiling.
    """
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise ServerBuildError(f"{what} could not start ({exc}).") from None
    try:
        proc.wait()
    except BaseException:  # Ctrl-C (the group has its own session: the terminal's signal misses it), SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise ServerBuildError(f"{what} failed with exit code {proc.returncode} (command: {' '.join(cmd)}); its "
                               f"output is above.")


def _source(root: Path, version: str, log: TextIO) -> Path:
    """The unpacked llama.cpp of the sdist; unpacked next to it first, then moved into place whole."""
    source = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (source / "tools" / "server").is_dir():
        return source
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        with tempfile.TemporaryDirectory(dir=root, prefix=temp_prefix("download")) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={version}", "-d", tmp], log,
                 f"downloading the llama-cpp-python {version} source distribution")
            found = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
            if found is None:
                raise ServerBuildError(f"pip download gave no llama_cpp_python-{version}.tar.gz.")
            os.replace(found, sdist)
    with tempfile.TemporaryDirectory(dir=root, prefix=temp_prefix("unpack")) as tmp:
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:  # EOFError: a truncated gzip stream
            sdist.unlink(missing_ok=True)
            raise ServerBuildError(f"{sdist} could not be unpacked ({exc}); it was removed, run again to "
                                   f"download it afresh.") from None
        unpacked = Path(tmp) / f"llama_cpp_python-{version}"
        if not (unpacked / "vendor" / "llama.cpp" / "tools" / "server").is_dir():
            raise ServerBuildError(f"{sdist} holds no vendor/llama.cpp/tools/server: this llama-cpp-python "
                                   f"version does not ship llama-server's sources.")
        shutil.rmtree(root / unpacked.name, ignore_errors=True)
        os.replace(unpacked, root / unpacked.name)
    return source


def build_llama_server(jobs: int | None = None, log: TextIO | None = None) -> Path:
    """llama-server for the installed llama-cpp-python and this CPU: built once, then reused.

    The build's output goes to ``log`` (standard error by default). An interrupted build resumes where it
    stopped; the binary exists only once it has linked and answered ``--version``.
    """
    log = log or sys.stderr
    version = importlib.metadata.version("llama-cpp-python")
    flags = cpu_flags()
    cpu_args, variant = cmake_cpu_args(flags)
    binary = server_binary(version, flags)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ServerBuildError(f"building llama-server needs {tool} on PATH (Debian/Ubuntu: apt install cmake "
                                   f"g++; macOS: xcode-select --install and brew install cmake).")
    root = build_root(version)
    root.mkdir(parents=True, exist_ok=True)
    removed = remove_leftovers(root)  # a download or unpacking that a SIGKILL cut short
    if removed:
        print(describe_removed(root, removed), file=log, flush=True)
    source = _source(root, version, log)
    build = binary.parent.parent
    print(f"building llama-server {version} ({variant}) in {build}", file=log, flush=True)
    _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *cpu_args], log, "cmake's configure step")
    _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs or os.cpu_count() or 1}"], log,
         "cmake's build step")
    if not binary.is_file():
        raise ServerBuildError(f"the build finished without {binary}.")
    check = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    if check.returncode != 0:
        binary.unlink(missing_ok=True)
        raise ServerBuildError(f"{binary} does not run (--version exited with {check.returncode}): "
                               f"{(check.stderr or check.stdout).strip()[-400:]}; it was removed, run again to "
                               f"relink it.")
    return binary
