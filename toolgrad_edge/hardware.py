"""What this machine is, which llama.cpp kernels to avoid on it, and the defaults chosen from it.

Every choice here is a pure function of given figures (system-info strings,
CPU counts, RAM and model shapes), and the CPU's description a pure function of
what the OS reports (/proc/cpuinfo, the device tree, cpu_capacity, sysctl), so
both are table-tested on any machine; the ``detect_*`` and ``read_*`` functions
read those figures from this machine and llama.cpp. ``doctor`` and ``info``
print each choice with its reason. The kernel plan is carried out where models
load (engines/kernel_guard.py): this module only plans.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .errors import ModelLoadError

# "1" lets llama.cpp use its AMX kernels again (a llama.cpp with the fix for its crash); "0" or unset avoids them.
ENV_AMX = "TOOLGRAD_EDGE_AMX"
# "0" keeps the weights where llama.cpp maps them on any CPU: no repacked copy (less peak RSS while loading,
# the plain kernels), the path an AMX CPU takes with the guard. Unset or "1": llama.cpp decides.
ENV_REPACK = "TOOLGRAD_EDGE_REPACK"
# The thread count, overriding the detected one (the CLI's --threads and ToolRuntime(n_threads=) win over it).
ENV_THREADS = "TOOLGRAD_EDGE_THREADS"

MiB = 1 << 20
GiB = 1 << 30


# -- llama.cpp's CPU kernels -----------------------------------------------------------------------------------

def parse_system_info(text: str) -> dict[str, str]:
    """llama_print_system_info()'s ``KEY = VALUE | ...`` pairs (``CPU : SSE3 = 1 | AMX_INT8 = 1 | ...``)."""
    return {key: value for key, value in re.findall(r"([A-Za-z0-9_]+)\s*=\s*([^|\s]+)", text)}


@dataclass(frozen=True)
class KernelPlan:
    """How the model's weights are placed: llama.cpp's extra CPU buffer types (repacking, AMX) or not."""

    use_extra_bufts: bool
    avoided: tuple[str, ...] = ()  # kernels this process does not use, e.g. ("AMX",)
    reason: str = ""
    # Extra buffer types taken out of the CPU device's list before any model loads (e.g. ("AMX",)), so
    # llama.cpp places no weight in them and keeps choosing among the others (CPU_REPACK).
    dropped: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"use_extra_bufts": self.use_extra_bufts, "avoided": list(self.avoided), "reason": self.reason,
                "dropped": list(self.dropped)}


def _is_amx(name: str) -> bool:
    return name.upper().startswith("AMX")


def kernel_plan(system_info: str, extra_buffer_types: Sequence[str] | None = None,
                amx_opt_in: str | None = None, repack: str | None = None) -> KernelPlan:
    """Whether to load with llama.cpp's extra buffer types, from its system info and extra buffer type names.

    llama.cpp's AMX matrix kernels (``ggml_backend_amx_mul_mat``) crash on the first prompt on Sapphire
    Rapids class Xeons (llama.cpp issue #20824, closed without a fix). They run for weights that the
    loader placed in the ``AMX`` extra buffer type, which it picks first where the build has AMX
    (``AMX_INT8 = 1``) and the CPU device lists it. llama.cpp has no option to leave one extra type out:
    a ``tensor_buft_overrides`` entry for the CPU buffer type chooses among all extra types again (AMX
    first), and one for the repack type is taken without checking that the tensor can be repacked. But
    the loader reads the extra types from the CPU device's null-terminated list
    (``ggml_backend_dev_get_extra_bufts``), so the plan takes AMX out of that list before any model
    loads (``dropped``) and keeps the others (``CPU_REPACK``: 1.3-1.9x faster prefill and one-token
    passes on a 4B Q4_0 on an AMD EPYC). Where the list is unknown or holds nothing else, the weights
    stay in the plain CPU buffer type (``use_extra_bufts = False``). ``amx_opt_in`` ("1", from
    $TOOLGRAD_EDGE_AMX) keeps AMX; ``repack`` ("0", from $TOOLGRAD_EDGE_REPACK) keeps every CPU's weights
    in the plain buffer type.
    """
    if (repack or "").strip() == "0":
        return KernelPlan(False, ("repacking",), f"${ENV_REPACK}=0: weights stay in the plain CPU buffer type "
                                                 f"(no repacked copy, no AMX)")
    features = parse_system_info(system_info)
    if extra_buffer_types is not None:
        amx = any(_is_amx(name) for name in extra_buffer_types)
        where = f"llama.cpp's CPU device lists the extra buffer types {', '.join(extra_buffer_types) or '(none)'}"
    else:
        amx = features.get("AMX_INT8") == "1"
        where = "llama.cpp's system info says AMX_INT8 = 1" if amx else "llama.cpp was built without AMX"
    if not amx:
        return KernelPlan(True, (), "no AMX kernels in this llama.cpp build; weights are repacked where "
                                    "llama.cpp does so")
    if (amx_opt_in or "").strip() == "1":
        return KernelPlan(True, (), f"AMX kernels kept (${ENV_AMX}=1): {where}")
    others = [name for name in extra_buffer_types or () if not _is_amx(name)]
    if others:
        dropped = tuple(name for name in extra_buffer_types if _is_amx(name))
        return KernelPlan(True, ("AMX",), _amx_reason(where, f"AMX is taken out of that list before any model "
                                                             f"loads and the weights are repacked with "
                                                             f"{', '.join(others)}"), dropped=dropped)
    return plain_plan(_amx_reason(where, PLAIN_WEIGHTS))


PLAIN_WEIGHTS = "weights stay in the plain CPU buffer type (no AMX, no repacking)"


def _amx_reason(where: str, how: str) -> str:
    return (f"{where}: its AMX kernels crash on the first prompt on such CPUs (llama.cpp issue #20824), so {how}; "
            f"set ${ENV_AMX}=1 with a llama.cpp that has the fix")


def plain_plan(reason: str) -> KernelPlan:
    """No extra buffer types at all: the fallback where AMX cannot be taken out of llama.cpp's list."""
    return KernelPlan(False, ("AMX",), reason)


def plan_after_edit(plan: KernelPlan, left: Sequence[str] | None) -> KernelPlan:
    """The plan that holds once the CPU device's list was edited for it and now lists ``left`` (None: unread).

    Where the plan dropped AMX and AMX is still listed (or the list could not be read back), the weights
    must stay out of every extra buffer type.
    """
    if plan.dropped and (left is None or any(_is_amx(name) for name in left)):
        return plain_plan(_amx_reason(f"AMX could not be taken out of llama.cpp's list of extra buffer types (it "
                                      f"lists {left})", PLAIN_WEIGHTS))
    return plan


@functools.lru_cache(maxsize=1)
def ggml_device_api():
    """ggml's device registry calls, from llama-cpp-python's ggml library (their signatures set once).

    Raises what loading ``llama_cpp._ggml`` raised (ImportError, OSError, AttributeError): callers that can
    do without it say so (doctor's "off" lines).
    """
    from llama_cpp._ggml import libggml

    lib = libggml
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    return lib


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


# -- what the CPU is -------------------------------------------------------------------------------------------

# arm64's /proc/cpuinfo names no CPU: it gives each core's MIDR fields. (CPU implementer, CPU part) -> the
# core, numbered as in the Linux kernel's arch/arm64/include/asm/cputype.h and the cores' Technical
# Reference Manuals (MIDR_EL1.PartNum).
ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD04): "Cortex-A35",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",  # Raspberry Pi 4 (BCM2711)
    (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75",
    (0x41, 0xD0B): "Cortex-A76",  # Raspberry Pi 5 (BCM2712)
    (0x41, 0xD0C): "Neoverse N1",  # AWS Graviton2, Ampere Altra
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD40): "Neoverse V1",  # AWS Graviton3
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse N2",
    (0x41, 0xD4B): "Cortex-A78C",
    (0x41, 0xD4D): "Cortex-A715",
    (0x41, 0xD4E): "Cortex-X3",
    (0x41, 0xD4F): "Neoverse V2",  # AWS Graviton4, NVIDIA Grace
    (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720",
    (0x41, 0xD82): "Cortex-X4",
    (0x41, 0xD84): "Neoverse V3",
    (0x41, 0xD8E): "Neoverse N3",
    (0x61, 0x022): "Apple M1 Icestorm",  # Linux on Apple silicon (Asahi); Pro and Max have their own numbers
    (0x61, 0x023): "Apple M1 Firestorm",
    (0x61, 0x024): "Apple M1 Pro Icestorm",
    (0x61, 0x025): "Apple M1 Pro Firestorm",
    (0x61, 0x028): "Apple M1 Max Icestorm",
    (0x61, 0x029): "Apple M1 Max Firestorm",
    (0x61, 0x032): "Apple M2 Blizzard",
    (0x61, 0x033): "Apple M2 Avalanche",
    (0x61, 0x034): "Apple M2 Pro Blizzard",
    (0x61, 0x035): "Apple M2 Pro Avalanche",
    (0x61, 0x038): "Apple M2 Max Blizzard",
    (0x61, 0x039): "Apple M2 Max Avalanche",
    (0xC0, 0xAC3): "AmpereOne",
    (0xC0, 0xAC4): "AmpereOne A",
}
ARM_IMPLEMENTERS = {0x41: "Arm", 0x42: "Broadcom", 0x48: "HiSilicon", 0x4E: "NVIDIA", 0x51: "Qualcomm",
                    0x61: "Apple", 0xC0: "Ampere"}

# The ARM features llama.cpp's CPU kernels use: (name shown, token of /proc/cpuinfo's Features line, macOS sysctl).
ARM_FEATURES = (
    ("neon", "asimd", "hw.optional.neon"),  # Advanced SIMD
    ("fp16", "asimdhp", "hw.optional.arm.FEAT_FP16"),  # half-precision vector arithmetic (llama.cpp's FP16_VA)
    ("dotprod", "asimddp", "hw.optional.arm.FEAT_DotProd"),  # int8 dot products (DOTPROD)
    ("i8mm", "i8mm", "hw.optional.arm.FEAT_I8MM"),  # int8 matrix multiply (MATMUL_INT8)
    ("bf16", "bf16", "hw.optional.arm.FEAT_BF16"),
    ("sve", "sve", None),
    ("sve2", "sve2", None),
    ("sme", "sme", "hw.optional.arm.FEAT_SME"),
)
# The x86 flags llama.cpp's CPU kernels use (of /proc/cpuinfo's flags line), in the order shown.
X86_FEATURES = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")

# What read_sysctl asks macOS (a prefix such as hw.optional lists every name under it).
SYSCTL_NAMES = ("machdep.cpu.brand_string", "hw.memsize", "hw.physicalcpu", "hw.perflevel0.physicalcpu",
                "hw.perflevel1.physicalcpu", "hw.optional", "sysctl.proc_translated")


@dataclass(frozen=True)
class CpuDescription:
    """What doctor and info say about the CPU (and, on a Mac, its memory and GPU)."""

    arch: str  # platform.machine(): x86_64, aarch64, arm64
    name: str  # the board or brand with its cores, e.g. "Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76)"
    features: tuple[str, ...] = ()  # of ARM_FEATURES or X86_FEATURES, as the OS reports them
    performance: int | None = None  # big / performance cores where the cores differ, None where all are alike
    unified_memory: bool | None = None  # the GPU uses the RAM (Apple silicon)
    metal: bool | None = None  # a GPU that llama.cpp's Metal back-end runs on
    note: str = ""  # what could not be told, and why

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the name, features, big cores, unified memory and Metal, the note."""
        parts = [self.name]
        if self.features:
            parts.append(" ".join(self.features))
        if self.unified_memory:
            parts.append("unified memory" + (", Metal" if self.metal else ""))
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip(), 0)
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo's blocks (one per processor, and arm64 boards' trailing Hardware/Revision/Model block)."""
    blocks, block = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if block:
                blocks.append(block)
            block = {}
        elif ":" in line:
            key, value = line.split(":", 1)
            block[key.strip()] = value.strip()
    return blocks


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl NAME ...``'s ``name: value`` lines."""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def read_sysctl(names: Sequence[str] = SYSCTL_NAMES) -> dict[str, str]:
    """macOS's values of ``names`` (one sysctl run; names this Mac lacks are left out); {} where it fails."""
    try:
        out = subprocess.run(["sysctl", *names], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_sysctl(out.stdout)


def read_cpu_capacities(cpu_root: Path = Path("/sys/devices/system/cpu")) -> dict[int, int]:
    """Each CPU's relative capacity (``cpuN/cpu_capacity``, 1024 for the fastest): arm64's big.LITTLE cores."""
    out = {}
    for path in cpu_root.glob("cpu[0-9]*/cpu_capacity"):
        try:
            out[int(path.parent.name[3:])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def big_cores(capacities: Mapping[int, int], cpus: Sequence[int] | None = None) -> int | None:
    """How many of ``cpus`` have the highest capacity, where the capacities differ (None where all are alike)."""
    caps = [capacities[c] for c in (capacities if cpus is None else cpus) if c in capacities]
    if len(set(caps)) < 2:
        return None
    return caps.count(max(caps))


def _family(machine: str) -> str:
    m = machine.lower()
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return "arm"
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    return m


def _arm_core(block: Mapping[str, str]) -> str:
    implementer, part = _int(block.get("CPU implementer")), _int(block.get("CPU part"))
    name = ARM_CORES.get((implementer, part))
    if name:
        return name
    vendor = ARM_IMPLEMENTERS.get(implementer, f"implementer {block.get('CPU implementer')}")
    return f"{vendor} core {block.get('CPU part')}"


def _cores_label(groups: Sequence[tuple[str, int]]) -> str:
    return " + ".join(f"{n}x {core}" for core, n in groups)


def describe_cpu(machine: str, cpuinfo: str = "", device_model: str | None = None,
                 capacities: Mapping[int, int] | None = None, sysctl: Mapping[str, str] | None = None) -> CpuDescription:
    """The CPU described from what the OS reports: /proc/cpuinfo, the device tree's board model and the cores'
    capacities on Linux, sysctl's values on macOS (``sysctl`` given).

    ``machine`` (platform.machine()) is the architecture this process runs as; where /proc/cpuinfo describes
    another one's CPU (QEMU user mode shows the host's), that is said instead of the host's name.
    """
    if sysctl is not None:
        return _describe_mac(machine, sysctl)
    blocks = parse_cpuinfo(cpuinfo)
    arm = [b for b in blocks if "CPU part" in b]
    x86 = [b for b in blocks if "flags" in b or "vendor_id" in b]
    family = _family(machine)
    if family == "arm" and arm:
        caps = capacities or {}
        groups: dict[str, list[int]] = {}
        for i, block in enumerate(arm):
            groups.setdefault(_arm_core(block), []).append(_int(block.get("processor")) or i)
        # Big cores first (by capacity), else as /proc/cpuinfo lists them.
        order = sorted(groups, key=lambda core: -max((caps.get(c, 0) for c in groups[core]), default=0))
        cores = _cores_label([(core, len(groups[core])) for core in order])
        tokens = set.intersection(*(set(b.get("Features", "").split()) for b in arm))
        board = (device_model or "").replace("\x00", "").strip() or next(
            (b["Model"] for b in blocks if b.get("Model")), "")
        return CpuDescription(machine, f"{board} ({cores})" if board else cores,
                              tuple(name for name, token, _ in ARM_FEATURES if token in tokens),
                              performance=big_cores(caps))
    if family == "x86" and x86:
        flags = set(x86[0].get("flags", "").split())
        return CpuDescription(machine, x86[0].get("model name") or x86[0].get("vendor_id") or machine,
                              tuple(f for f in X86_FEATURES if f in flags))
    other = (x86[0].get("model name") if x86 else None) or (_arm_core(arm[0]) if arm else None)
    note = (f"/proc/cpuinfo describes another architecture's CPU ({other}), as under QEMU user-mode emulation: "
            f"this CPU's name and features are unknown (llama.cpp's system info says what it was built for)"
            if other else "/proc/cpuinfo names no CPU")
    return CpuDescription(machine, f"{machine} CPU", note=note)


def _describe_mac(machine: str, sysctl: Mapping[str, str]) -> CpuDescription:
    brand = sysctl.get("machdep.cpu.brand_string") or "Mac"
    apple = _family(machine) == "arm" or brand.startswith("Apple")
    perf, eff = _int(sysctl.get("hw.perflevel0.physicalcpu")), _int(sysctl.get("hw.perflevel1.physicalcpu"))
    if perf and eff:
        name = f"{brand} ({perf} performance + {eff} efficiency cores)"
    else:
        name = brand + (f" ({sysctl['hw.physicalcpu']} cores)" if sysctl.get("hw.physicalcpu") else "")
    features = tuple(label for label, _, key in ARM_FEATURES if key and _int(sysctl.get(key)) == 1) if apple else ()
    note = ""
    if _int(sysctl.get("sysctl.proc_translated")) == 1:
        note = ("this Python runs under Rosetta 2 (x86_64 on Apple silicon): llama.cpp gets no NEON and no Metal; "
                "install an arm64 Python")
    return CpuDescription(machine, name, features, performance=perf if perf and eff else None,
                          unified_memory=apple or None, metal=apple or None, note=note)


def detect_cpu_description(machine: str | None = None, root: Path = Path("/")) -> CpuDescription:
    """This machine's CPU: describe_cpu over what it reports (``root`` stands for / in tests)."""
    machine = machine or platform.machine()
    if platform.system() == "Darwin":
        return describe_cpu(machine, sysctl=read_sysctl())

    def text(path: str) -> str:
        try:
            return (root / path).read_text(errors="replace")
        except OSError:
            return ""

    return describe_cpu(machine, text("proc/cpuinfo"), text("proc/device-tree/model") or None,
                        read_cpu_capacities(root / "sys/devices/system/cpu"))


def cpu_name() -> str:
    return detect_cpu_description().name


# -- threads ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CpuFigures:
    logical: int  # os.cpu_count()
    allowed: int  # CPUs in this process's affinity mask
    quota: float | None = None  # CPUs' worth of time the cgroup allows (cpu.max), None when unlimited
    physical: int | None = None  # distinct physical cores among the allowed CPUs, None when unknown
    performance: int | None = None  # performance cores (Apple silicon's perflevel0), None when not told apart


def choose_threads(cpu: CpuFigures) -> tuple[int, str]:
    """Threads for llama.cpp: the CPUs this process may use, one per physical core, performance cores only."""
    n = max(1, cpu.allowed)
    why = [f"{cpu.allowed} CPU{'s' if cpu.allowed != 1 else ''} in the affinity mask"
           + (f" of {cpu.logical}" if cpu.logical != cpu.allowed else "")]
    if cpu.quota is not None and cpu.quota < n:
        n = max(1, int(cpu.quota))
        why.append(f"cgroup quota of {cpu.quota:g} CPUs")
    if cpu.physical is not None and cpu.physical < n:
        n = max(1, cpu.physical)
        why.append(f"{cpu.physical} physical cores (SMT siblings share one core's units)")
    if cpu.performance is not None and cpu.performance < n:
        n = max(1, cpu.performance)
        why.append(f"{cpu.performance} performance cores (efficiency cores slow every step's slowest thread)")
    return n, "; ".join(why)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def detect_cpu(sysctl: Mapping[str, str] | None = None,
               cpu_root: Path = Path("/sys/devices/system/cpu")) -> CpuFigures:
    """This process's CPU figures; ``sysctl`` (macOS, from read_sysctl) and ``cpu_root`` (Linux's sysfs) are
    what it reads, given by tests."""
    logical = os.cpu_count() or 1
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(logical))
    physical = performance = None
    if sysctl is None and platform.system() == "Darwin":
        sysctl = read_sysctl()
    if sysctl is not None:
        physical = _int(sysctl.get("hw.physicalcpu"))
        performance = _int(sysctl.get("hw.perflevel0.physicalcpu"))
    else:
        cores = set()
        for cpu in cpus:
            topo = cpu_root / f"cpu{cpu}" / "topology"
            try:
                cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                           topo.joinpath("core_id").read_text().strip()))
            except OSError:
                cores = set()
                break
        physical = len(cores) or None
        performance = big_cores(read_cpu_capacities(cpu_root), cpus)
    return CpuFigures(logical=logical, allowed=len(cpus) or logical, quota=_cgroup_quota(),
                      physical=physical, performance=performance)


def default_threads() -> tuple[int, str]:
    """The thread count and why: $TOOLGRAD_EDGE_THREADS, else chosen from this machine's CPUs."""
    env = os.environ.get(ENV_THREADS)
    if env:
        try:
            n = int(env)
            if n < 1:
                raise ValueError
        except ValueError:
            raise ModelLoadError(f"${ENV_THREADS} must be a positive integer, got {env!r}.") from None
        return n, f"${ENV_THREADS}"
    return choose_threads(detect_cpu())


# -- memory ----------------------------------------------------------------------------------------------------

def detect_ram() -> tuple[int | None, int | None]:
    """(total, available) bytes for this process: /proc/meminfo and the cgroup's memory.max, or sysctl."""
    total = available = None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            total = min(total or int(limit), int(limit))
            available = min(available if available is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    if total is None and platform.system() == "Darwin":
        total, available = ram_from_sysctl(read_sysctl())
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            total = None
    return total, available if available is not None else total


def ram_from_sysctl(sysctl: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(total, available) bytes on macOS from its ``hw.memsize``.

    macOS keeps file cache and compressed pages it gives back; three quarters of the total is a safe share
    for one process (Metal's default working-set limit on Apple silicon's unified memory is about that).
    """
    total = _int(sysctl.get("hw.memsize"))
    return total, int(total * 0.75) if total else None


# -- the context ---------------------------------------------------------------------------------------------

# ggml's bytes per value of each KV cache type.
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class ModelShape:
    """What sizes a context: from the GGUF header (gguf_info.model_shape)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key and value length per head
    n_embd: int
    n_ff: int
    n_vocab: int
    n_swa: int  # sliding window, 0 when no layer slides
    swa_layers: int  # layers with the sliding window
    weights_bytes: int
    trained_ctx: int

    @property
    def global_layers(self) -> int:
        return self.n_layer - self.swa_layers


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_type: str = "f16", swa_full: bool = True,
                   n_ubatch: int = 512) -> int:
    """Bytes of K and V for n_ctx cells; sliding-window layers keep llama.cpp's window + a batch unless swa_full."""
    per_cell = 2 * shape.n_head_kv * shape.head_dim * KV_TYPE_BYTES[kv_type]
    swa_cells = n_ctx if swa_full or not shape.n_swa else min(n_ctx, _pad(shape.n_swa + n_ubatch, 256))
    return int(per_cell * (shape.global_layers * n_ctx + shape.swa_layers * swa_cells))


def compute_buffer_bytes(shape: ModelShape, n_ctx: int, n_ubatch: int = 512, n_outputs: int = 16,
                         flash_attn: bool = False) -> int:
    """An upper estimate of llama.cpp's CPU compute buffer: a batch's activations, attention scores, logits rows.

    It is a planning figure: llama.cpp reserves the real size for its worst-case graph when the context is made.
    """
    activations = n_ubatch * (4 * shape.n_embd + 3 * shape.n_ff) * 4
    scores = 0 if flash_attn else n_ubatch * n_ctx * shape.n_head * 4
    logits = n_outputs * shape.n_vocab * 4
    return int(activations + scores + logits)


OVERHEAD_BYTES = 200 * MiB  # the interpreter, llama.cpp's buffers, the grammar engine's vocabulary view


@dataclass(frozen=True)
class ContextPlan:
    n_ctx: int
    kv_type: str  # f16 or q8_0 (K and V)
    flash_attn: bool
    swa_full: bool
    kv_bytes: int
    compute_bytes: int
    need_bytes: int  # weights + KV + compute + overhead
    budget_bytes: int | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def swa_label(swa_full: bool) -> str:
    """How info and doctor name the SWA cache a context plan chose."""
    return "full-size SWA cache" if swa_full else "window-only SWA cache"


CTX_STEPS = (8192, 4096, 2048, 1024)
MIN_CTX = 512


def choose_context(shape: ModelShape, budget_bytes: int | None, n_ctx: int | str = "auto",
                   kv_type: str = "auto", swa_full: bool | str | None = "auto", flash_attn_ok: bool = True,
                   n_outputs: int = 16, cap: int = 8192, memory: str = "RAM") -> ContextPlan:
    """The context length, KV cache type and SWA cache size for which weights + KV + compute fit the RAM budget.

    ``n_ctx="auto"`` tries 8k, 4k, 2k, 1k and 512 tokens (capped at the trained context); the longest that
    fits wins. At one length the options are tried in this order: an f16 cache, q8_0 (which needs flash
    attention), then, with ``swa_full="auto"``, the same two with the sliding-window layers keeping only
    their window. So the full-size SWA cache (which prefix reuse at any point relies on) is given up only
    where it is what keeps the longer context. A number of tokens is kept as given and only the rest is
    chosen. When not even 512 tokens fit, ModelLoadError names the figures. ``memory`` names what the
    budget is (the RAM, or a GPU's memory) in the reason and the error.
    """
    if kv_type not in ("auto", *KV_TYPE_BYTES):
        raise ModelLoadError(f"KV cache type must be auto, f16 or q8_0, got {kv_type!r}.")
    if swa_full is None:  # not given (the CLI's default)
        swa_full = "auto"
    if swa_full not in ("auto", True, False):
        raise ModelLoadError(f"swa_full must be auto, True or False, got {swa_full!r}.")
    types = ["f16", "q8_0"] if kv_type == "auto" else [kv_type]
    if not flash_attn_ok:
        if kv_type == "q8_0":
            raise ModelLoadError("a q8_0 KV cache needs flash attention, which this llama.cpp back-end lacks; "
                                 "use --kv-type f16.")
        types = [t for t in types if t != "q8_0"]
    # A model without sliding-window layers has nothing to drop: its cache is the same either way.
    windows = [True, False] if swa_full == "auto" and shape.n_swa and shape.swa_layers else [swa_full is not False]
    limit = min(cap, shape.trained_ctx or cap)
    if n_ctx == "auto":
        lengths = [n for n in CTX_STEPS if n <= limit] or [limit]
        lengths = sorted({*lengths, MIN_CTX} if MIN_CTX <= limit else set(lengths), reverse=True)
    else:
        lengths = [int(n_ctx)]

    def plan(n: int, t: str, full: bool, why: str) -> ContextPlan:
        fa = t != "f16"
        kv = kv_cache_bytes(shape, n, t, full)
        compute = compute_buffer_bytes(shape, n, n_outputs=n_outputs, flash_attn=fa)
        need = shape.weights_bytes + kv + compute + OVERHEAD_BYTES
        return ContextPlan(n, t, fa, full, kv, compute, need, budget_bytes, why)

    def label(n: int, t: str, full: bool) -> str:
        return f"{n}/{t}" + ("" if len(windows) == 1 else "/full SWA" if full else "/window SWA")

    if budget_bytes is None:
        return plan(lengths[0], types[0], windows[0],
                    f"{lengths[0]} tokens, {types[0]} KV cache: the {memory} available is not known")
    available = "available" if memory == "RAM" else f"free in {memory}"
    tried = []
    for n in lengths:
        for full in windows:
            for t in types:
                p = plan(n, t, full, "")
                if p.need_bytes <= budget_bytes:
                    why = (f"{n} tokens, {t} KV cache: {_gb(p.need_bytes)} (weights {_gb(shape.weights_bytes)} + "
                           f"KV {_gb(p.kv_bytes)} + compute {_gb(p.compute_bytes)} + {_gb(OVERHEAD_BYTES)} other) "
                           f"of {_gb(budget_bytes)} {available}")
                    if not full and len(windows) > 1:
                        why += (f"; the sliding-window layers keep only their {shape.n_swa}-token window "
                                f"(--swa-full keeps them all for prefix reuse at any point, at a shorter context)")
                    if tried:
                        why += f"; {', '.join(tried)} did not fit"
                    return plan(n, t, full, why)
                tried.append(f"{label(n, t, full)} ({_gb(p.need_bytes)})")
    smallest = plan(lengths[-1], types[-1], windows[-1], "")
    if n_ctx != "auto":
        # Asked for explicitly: tried as asked, with the estimate said.
        return plan(lengths[-1], types[-1], windows[-1],
                    f"{lengths[-1]} tokens as asked, {types[-1]} KV cache: about {_gb(smallest.need_bytes)} "
                    f"needed, {_gb(budget_bytes)} {available}")
    fewer = "" if memory == "RAM" else ", offload fewer layers (--n-gpu-layers)"
    raise ModelLoadError(
        f"the model does not fit in the available {memory}: {_gb(smallest.need_bytes)} needed at {lengths[-1]} "
        f"tokens with a {types[-1]} KV cache (weights {_gb(shape.weights_bytes)}, KV {_gb(smallest.kv_bytes)}, "
        f"compute {_gb(smallest.compute_bytes)}), {_gb(budget_bytes)} {available}; use a smaller quantization "
        f"(Q4_0, Q4_K_M), close other programs{fewer}, or pass --n-ctx explicitly to try anyway.")


def detect_devices() -> list[dict]:
    """ggml's devices (CPU, GPUs, accelerators) with their memory; [] where llama.cpp's library is missing."""
    try:
        lib = ggml_device_api()
    except (ImportError, OSError, AttributeError):
        return []
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                    "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                    "type": kinds.get(lib.ggml_backend_dev_type(dev), "other"),
                    "memory_total_bytes": total.value, "memory_free_bytes": free.value})
    return out


@dataclass(frozen=True)
class MemoryBudget:
    """What the context plan must fit in: the available RAM, or the free memory of the GPUs holding every layer."""

    bytes: int | None
    memory: str  # "RAM", or "GPU memory (NVIDIA ...)"
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def memory_budget(ram_available: int | None, devices: Sequence[Mapping], n_gpu_layers: int, n_layer: int,
                  unified: bool | None = None) -> MemoryBudget:
    """Where weights, KV cache and compute buffer will live, and how much of it is free.

    With every layer offloaded (``n_gpu_layers`` < 0 or at least ``n_layer``) they live in the GPUs' memory,
    so the plan is made against the sum of the GPUs' free memory; on unified memory (Apple silicon, an
    integrated GPU) that memory is the RAM too, so the smaller of the two counts. With some layers on the
    CPU the plan stays on the RAM, which is then an overestimate of what the CPU side holds (conservative).
    """
    ram = MemoryBudget(ram_available, "RAM", "the available RAM (no GPU offload)")
    gpus = [d for d in devices if d.get("type") in ("gpu", "igpu") and d.get("memory_total_bytes")]
    if n_gpu_layers == 0 or not gpus:
        return ram
    names = ", ".join(d.get("description") or d.get("name") or "GPU" for d in gpus)
    if 0 <= n_gpu_layers < n_layer:
        return MemoryBudget(ram_available, "RAM", f"{n_gpu_layers} of {n_layer} layers on {names}: planned "
                                                  f"against the available RAM (conservative)")
    free = sum(int(d.get("memory_free_bytes") or 0) for d in gpus)
    if unified is None:
        unified = platform.system() == "Darwin" or any(d.get("type") == "igpu" for d in gpus)
    if unified and ram_available is not None and ram_available < free:
        return MemoryBudget(ram_available, "RAM", f"every layer on {names}, whose memory is the RAM: planned "
                                                  f"against the available RAM, the smaller")
    return MemoryBudget(free, f"GPU memory ({names})", f"every layer on {names}: planned against "
                                                         f"{'its' if len(gpus) == 1 else 'their'} free memory")


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


@dataclass
class HardwareDefaults:
    """The defaults a runtime uses here, each with its reason (for info and doctor)."""

    threads: int
    threads_reason: str
    kernels: KernelPlan
    ram_total: int | None
    ram_available: int | None
    context: ContextPlan | None = None
    budget: MemoryBudget | None = None

    def to_dict(self) -> dict:
        return {"threads": self.threads, "threads_reason": self.threads_reason, "kernels": self.kernels.to_dict(),
                "ram_total_bytes": self.ram_total, "ram_available_bytes": self.ram_available,
                "context": self.context.to_dict() if self.context else None,
                "budget": self.budget.to_dict() if self.budget else None}


def plan_defaults(shape: ModelShape, kernels: KernelPlan, n_threads: int | None = None, n_ctx: int | str = "auto",
                  kv_type: str = "auto", swa_full: bool | str | None = "auto", n_outputs: int = 16, cap: int = 8192,
                  ram: tuple[int | None, int | None] | None = None, n_gpu_layers: int = 0,
                  devices: Sequence[Mapping] | None = None) -> HardwareDefaults:
    """Threads and context for this model here, beside the kernel plan the engine holds (``kernels``, from
    engines.kernel_guard); given values are kept, the others chosen.

    The context is planned against the RAM, or against the GPUs' free memory when ``n_gpu_layers`` puts
    every layer there (``memory_budget``).
    """
    threads, why = (int(n_threads), "as asked") if n_threads else default_threads()
    total, available = ram if ram is not None else detect_ram()
    if n_gpu_layers and devices is None:
        devices = detect_devices()
    budget = memory_budget(available, devices or (), n_gpu_layers, shape.n_layer)
    context = choose_context(shape, budget.bytes, n_ctx, kv_type, swa_full, n_outputs=n_outputs, cap=cap,
                             memory=budget.memory)
    return HardwareDefaults(threads, why, kernels, total, available, context, budget)


def environment_overrides(env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {name: env[name] for name in (ENV_AMX, ENV_REPACK, ENV_THREADS) if name in env}


# -- building llama.cpp ----------------------------------------------------------------------------------------

# /proc/cpuinfo flag -> ggml's CMake option, for a build that names its CPU features instead of -march=native.
CPU_FLAG_OPTIONS = (
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo's ``flags`` on x86, ``Features`` on arm64), empty where there are
    none to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_cpu_args(flags: set[str], avoid_amx: bool = True) -> tuple[list[str], str]:
    """CMake options for building llama.cpp on this CPU, and the variant's name.

    A native build (-march=native) turns on AMX where the CPU has it, and llama.cpp's AMX kernels crash
    there (see kernel_plan); such CPUs get a build that names every other feature it has instead.
    """
    if not (avoid_amx and "amx_int8" in flags):
        return [], "native"
    return cmake_feature_args(flags), "no-amx"


def cmake_feature_args(flags: set[str]) -> list[str]:
    """A build for exactly these CPU features (AMX never among them): native off, each feature named."""
    return ["-DGGML_NATIVE=OFF"] + [f"-D{option}=ON" for flag, option in CPU_FLAG_OPTIONS if flag in flags]


# -- requests decoded at once (serve --parallel) ------------------------------------------------------------------

PARALLEL_MAX = 8  # sequences in one context by default; a pass of 8 rows costs 2.6x one row on 2 cores (270M)


def choose_parallel(shape: ModelShape, threads: int, context: ContextPlan, available: int | None,
                    cap: int = PARALLEL_MAX) -> tuple[int, str]:
    """How many requests to decode at once by default, and why: up to ``cap``, 4 per thread, and as many
    sequences' KV caches at the planned context as the RAM left after the weights holds."""
    by_threads = 4 * threads
    per_seq = kv_cache_bytes(shape, context.n_ctx, context.kv_type, context.swa_full)
    spare = (available - shape.weights_bytes - context.compute_bytes - OVERHEAD_BYTES) if available else None
    by_ram = max(1, spare // per_seq) if spare is not None and per_seq else cap
    n = max(1, min(cap, by_threads, by_ram))
    ram = (f"{by_ram} sequences of {context.n_ctx} tokens ({per_seq / MiB:.0f} MiB of KV each) fit the "
           f"{available / GiB:.1f} GiB available" if spare is not None else "RAM unknown")
    return n, f"{n} (of at most {cap}; {by_threads} for {threads} threads; {ram})"
