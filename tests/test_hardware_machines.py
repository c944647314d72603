"""ARM boards, ARM servers and Macs described from what their OS reports, table-tested on any machine.

The recordings below are written for these tests from the machines' public documentation; none was
copied from a machine this project ran on:
- /proc/cpuinfo fields: the Linux kernel's arm64 cpuinfo format (arch/arm64/kernel/cpuinfo.c: the
  ``Features`` hwcaps, ``CPU implementer``/``part``/``variant``/``revision`` from MIDR_EL1) with the part
  numbers of arch/arm64/include/asm/cputype.h;
- Raspberry Pi 5: BCM2712, 4x Cortex-A76 r4p1 (Raspberry Pi's product brief and processor documentation),
  Raspberry Pi OS bookworm's trailing ``Revision``/``Serial``/``Model`` block and /proc/device-tree/model;
- Raspberry Pi 4: BCM2711, 4x Cortex-A72 r0p3 (ARMv8.0: no fp16 arithmetic, no dot product);
- AWS Graviton3 (c7g): Neoverse V1 (SVE, i8mm, bf16), from AWS's Graviton getting-started guide;
  Ampere Altra Q80-30: 80x Neoverse N1 (ARMv8.2 with dot product), from Ampere's product brief;
- a big.LITTLE board: Rockchip RK3588, 4x Cortex-A55 + 4x Cortex-A76 (Rockchip's datasheet); its
  cpu_capacity values are illustrative (Linux scales the fastest core to 1024);
- Macs: the sysctl names of Apple's "Determining instruction set characteristics" and
  hw.perflevel* pages, with an M1 MacBook Air (4 performance + 4 efficiency cores, 8 GB; no i8mm or
  bf16: ARMv8.5) and an M2 Pro Mac mini (8 + 4 cores, 32 GB; i8mm and bf16: ARMv8.6).
"""

from __future__ import annotations

import pytest

from toolgrad_edge import hardware
from toolgrad_edge.hardware import (CpuFigures, big_cores, choose_threads, cpu_flags, describe_cpu,
                                    detect_cpu, detect_cpu_description, parse_sysctl, ram_from_sysctl)


def arm_cpuinfo(cores: list[tuple[str, str, str, str]], tail: str = "") -> str:
    """/proc/cpuinfo of an arm64 Linux: one block per (Features, variant, part, revision), then a board's tail."""
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
              f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n"
              for i, (features, variant, part, revision) in enumerate(cores)]
    return "\n".join(blocks) + ("\n" + tail if tail else "")


A76_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
A55_FEATURES = A76_FEATURES
A72_FEATURES = "fp asimd evtstrm crc32 cpuid"
N1_FEATURES = A76_FEATURES + " ssbs"
V1_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp "
               "svei8mm svebf16 i8mm bf16 dgh rng")

PI5_CPUINFO = arm_cpuinfo([(A76_FEATURES, "0x4", "0xd0b", "1")] * 4,
                          "Revision\t: d04170\nSerial\t\t: 1a2b3c4d5e6f7a8b\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
PI5_MODEL = "Raspberry Pi 5 Model B Rev 1.0\x00"  # /proc/device-tree/model ends in a NUL
PI4_CPUINFO = arm_cpuinfo([(A72_FEATURES, "0x0", "0xd08", "3")] * 4,
                          "Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: 100000001a2b3c4d\n"
                          "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
PI4_MODEL = "Raspberry Pi 4 Model B Rev 1.4\x00"
GRAVITON3_CPUINFO = arm_cpuinfo([(V1_FEATURES, "0x1", "0xd40", "1")] * 4)  # c7g.xlarge: no device tree (ACPI)
ALTRA_CPUINFO = arm_cpuinfo([(N1_FEATURES, "0x3", "0xd0c", "1")] * 80)
RK3588_CPUINFO = arm_cpuinfo([(A55_FEATURES, "0x2", "0xd05", "0")] * 4 + [(A76_FEATURES, "0x4", "0xd0b", "0")] * 4)
RK3588_CAPACITY = {0: 414, 1: 414, 2: 414, 3: 414, 4: 1024, 5: 1024, 6: 1024, 7: 1024}
# What an arm64 process under QEMU user mode reads: the x86 host's own /proc/cpuinfo.
X86_HOST_CPUINFO = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC 7B13\n"
                    "flags\t\t: fpu sse sse2 avx avx2 fma f16c\n")

M1_SYSCTL = """machdep.cpu.brand_string: Apple M1
hw.memsize: 8589934592
hw.physicalcpu: 8
hw.perflevel0.physicalcpu: 4
hw.perflevel1.physicalcpu: 4
hw.optional.arm.FEAT_FP16: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.arm.FEAT_BF16: 0
hw.optional.neon: 1
hw.optional.neon_hpfp: 1
hw.optional.neon_fp16: 1
hw.optional.arm64: 1
"""
M2_PRO_SYSCTL = (M1_SYSCTL.replace("Apple M1", "Apple M2 Pro").replace("8589934592", "34359738368")
                 .replace("hw.physicalcpu: 8", "hw.physicalcpu: 12").replace("perflevel0.physicalcpu: 4",
                                                                            "perflevel0.physicalcpu: 8")
                 .replace("FEAT_I8MM: 0", "FEAT_I8MM: 1").replace("FEAT_BF16: 0", "FEAT_BF16: 1"))
# An x86_64 Python on Apple silicon (Rosetta 2): the kernel says the process is translated.
ROSETTA_SYSCTL = M1_SYSCTL + "sysctl.proc_translated: 1\n"


@pytest.mark.parametrize("machine, cpuinfo, model, caps, name, features, performance", [
    ("aarch64", PI5_CPUINFO, PI5_MODEL, {i: 1024 for i in range(4)},
     "Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76)", ("neon", "fp16", "dotprod"), None),
    ("aarch64", PI5_CPUINFO, None, {}, "Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76)",  # no device tree:
     ("neon", "fp16", "dotprod"), None),                                                  # cpuinfo's Model
    ("aarch64", PI4_CPUINFO, PI4_MODEL, {}, "Raspberry Pi 4 Model B Rev 1.4 (4x Cortex-A72)", ("neon",), None),
    ("aarch64", GRAVITON3_CPUINFO, None, {}, "4x Neoverse V1",
     ("neon", "fp16", "dotprod", "i8mm", "bf16", "sve"), None),
    ("aarch64", ALTRA_CPUINFO, None, {}, "80x Neoverse N1", ("neon", "fp16", "dotprod"), None),
    ("aarch64", RK3588_CPUINFO, "Radxa ROCK 5B\x00", RK3588_CAPACITY, "Radxa ROCK 5B (4x Cortex-A76 + 4x Cortex-A55)",
     ("neon", "fp16", "dotprod"), 4),
    ("x86_64", X86_HOST_CPUINFO, None, {}, "AMD EPYC 7B13", ("avx", "avx2", "fma", "f16c"), None),
])
def test_linux_machines(machine, cpuinfo, model, caps, name, features, performance):
    cpu = describe_cpu(machine, cpuinfo, model, caps)
    assert (cpu.arch, cpu.name, cpu.features, cpu.performance) == (machine, name, features, performance)
    assert not cpu.note and cpu.unified_memory is None and cpu.metal is None
    assert cpu.summary().startswith(f"{name}; {' '.join(features)}")


def test_unknown_arm_part_names_its_vendor_and_number():
    text = arm_cpuinfo([(A76_FEATURES, "0x0", "0xd99", "0")]).replace("0x41", "0x51")
    assert describe_cpu("aarch64", text).name == "1x Qualcomm core 0xd99"


def test_under_qemu_user_mode_the_hosts_cpu_is_not_taken_for_this_one():
    cpu = describe_cpu("aarch64", X86_HOST_CPUINFO)
    assert cpu.name == "aarch64 CPU" and cpu.features == ()
    assert "another architecture's CPU (AMD EPYC 7B13)" in cpu.note and "QEMU" in cpu.note
    assert "AMD EPYC" not in cpu.name
    assert describe_cpu("x86_64", PI5_CPUINFO).note.startswith("/proc/cpuinfo describes another architecture's "
                                                              "CPU (Cortex-A76)")
    assert describe_cpu("aarch64", "").note == "/proc/cpuinfo names no CPU"


@pytest.mark.parametrize("sysctl, name, features, performance, memory", [
    (M1_SYSCTL, "Apple M1 (4 performance + 4 efficiency cores)", ("neon", "fp16", "dotprod"), 4, 8 << 30),
    (M2_PRO_SYSCTL, "Apple M2 Pro (8 performance + 4 efficiency cores)",
     ("neon", "fp16", "dotprod", "i8mm", "bf16"), 8, 32 << 30),
])
def test_macs(sysctl, name, features, performance, memory):
    values = parse_sysctl(sysctl)
    cpu = describe_cpu("arm64", sysctl=values)
    assert (cpu.name, cpu.features, cpu.performance) == (name, features, performance)
    assert cpu.unified_memory is True and cpu.metal is True and not cpu.note
    assert cpu.summary() == f"{name}; {' '.join(features)}; unified memory, Metal"
    assert ram_from_sysctl(values) == (memory, memory * 3 // 4)


def test_a_python_under_rosetta_is_told_to_use_an_arm64_one():
    cpu = describe_cpu("x86_64", sysctl=parse_sysctl(ROSETTA_SYSCTL))
    assert "Rosetta 2" in cpu.note and "install an arm64 Python" in cpu.note
    assert "Rosetta 2" in cpu.summary()


def test_mac_threads_default_to_the_performance_cores(monkeypatch):
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 12)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: None)
    figures = detect_cpu(sysctl=parse_sysctl(M2_PRO_SYSCTL))
    assert (figures.physical, figures.performance) == (12, 8)
    n, why = choose_threads(figures)
    assert n == 8 and "8 performance cores" in why


def _fake_root(tmp_path, cpuinfo: str, model: str | None, caps: dict[int, int]):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    if model is not None:
        (tmp_path / "proc" / "device-tree").mkdir()
        (tmp_path / "proc" / "device-tree" / "model").write_text(model)
    for cpu, capacity in caps.items():
        folder = tmp_path / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}"
        folder.mkdir(parents=True)
        (folder / "cpu_capacity").write_text(f"{capacity}\n")
    return tmp_path


def test_the_readers_on_a_recorded_pi5(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    root = _fake_root(tmp_path, PI5_CPUINFO, PI5_MODEL, {i: 1024 for i in range(4)})
    cpu = detect_cpu_description("aarch64", root=root)
    assert cpu.name == "Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76)" and cpu.performance is None
    assert {"asimd", "asimddp", "asimdhp"} <= cpu_flags(PI5_CPUINFO)  # the Features line


def test_big_little_threads_go_to_the_big_cores(tmp_path, monkeypatch):
    root = _fake_root(tmp_path, RK3588_CPUINFO, "Radxa ROCK 5B\x00", RK3588_CAPACITY)
    cpu_root = root / "sys" / "devices" / "system" / "cpu"
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    figures = detect_cpu(cpu_root=cpu_root)  # no topology files here: physical cores unknown
    assert (figures.allowed, figures.physical, figures.performance) == (8, None, 4)
    n, why = choose_threads(figures)
    assert n == 4 and "4 performance cores" in why
    # Only the little cores allowed (taskset -c 0-3): all alike, so all four are used.
    assert big_cores(RK3588_CAPACITY, [0, 1, 2, 3]) is None
    assert choose_threads(CpuFigures(logical=8, allowed=4, performance=None))[0] == 4


@pytest.mark.parametrize("cpu, line", [
    (describe_cpu("aarch64", PI5_CPUINFO, PI5_MODEL), "CPU               Raspberry Pi 5 Model B Rev 1.0 (4x Cortex-A76); "
                                                     "neon fp16 dotprod"),
    (describe_cpu("arm64", sysctl=parse_sysctl(M2_PRO_SYSCTL)),
     "CPU               Apple M2 Pro (8 performance + 4 efficiency cores); neon fp16 dotprod i8mm bf16; unified "
     "memory, Metal"),
])
def test_doctor_shows_the_description(monkeypatch, cpu, line):
    # The CPU line docs/hardware.md gives for a Pi 5 and a Mac, from doctor's own report of this install.
    pytest.importorskip("llama_cpp")
    from toolgrad_edge import doctor

    monkeypatch.setattr(hardware, "detect_cpu_description", lambda: cpu)
    report = {**doctor.environment(), "checks": []}
    assert report["cpu"]["name"] == cpu.name and tuple(report["cpu"]["features"]) == cpu.features
    lines = doctor.format_report(report).splitlines()
    assert line in lines
    metal = [x for x in lines if x.startswith("Metal ")]
    # On this machine's llama.cpp (no Metal) a Mac's description makes doctor give the reinstall command.
    assert bool(metal) == (cpu.metal is True and report["backend"]["name"] != "metal")
    if metal:
        assert 'CMAKE_ARGS="-DGGML_METAL=on"' in metal[0]
