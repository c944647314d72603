"""Hardware decisions as pure functions of given figures: kernels, threads, context; and this machine's plan."""

from __future__ import annotations

import pytest

from toolgrad_edge import hardware
from toolgrad_edge.errors import ModelLoadError
from toolgrad_edge.hardware import (GiB, MiB, CpuFigures, ModelShape, choose_context, choose_threads,
                                    cmake_cpu_args, kernel_plan, kv_cache_bytes, parse_system_info)

# llama_print_system_info() as llama-cpp-python 0.3.36 prints it on three machines.
XEON_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
            "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
            "OPENMP = 1 | REPACK = 1 | ")
EPYC = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
        "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
MAC = ("MTL : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | DOTPROD = 1 | "
       "ACCELERATE = 1 | REPACK = 1 | ")


def test_parse_system_info():
    info = parse_system_info(XEON_AMX)
    assert info["AMX_INT8"] == "1" and info["SSE3"] == "1" and info["REPACK"] == "1"
    assert parse_system_info(MAC)["EMBED_LIBRARY"] == "1"
    assert parse_system_info("") == {}


@pytest.mark.parametrize("info, bufts, opt_in, extra, avoided", [
    (XEON_AMX, ["AMX", "CPU_REPACK"], None, False, ("AMX",)),  # the crash: AMX avoided
    (XEON_AMX, None, None, False, ("AMX",)),  # buffer types unknown: the system info decides
    (XEON_AMX, ["AMX", "CPU_REPACK"], "1", True, ()),  # opted back in
    (XEON_AMX, ["AMX", "CPU_REPACK"], "0", False, ("AMX",)),
    (XEON_AMX, ["CPU_REPACK"], None, True, ()),  # AMX built but not offered (e.g. the CPU has no tiles)
    (EPYC, ["CPU_REPACK"], None, True, ()),
    (EPYC, None, None, True, ()),
    (MAC, [], None, True, ()),
])
def test_kernel_plan(info, bufts, opt_in, extra, avoided):
    plan = kernel_plan(info, bufts, opt_in)
    assert plan.use_extra_bufts is extra
    assert plan.avoided == avoided
    assert plan.reason
    if avoided:
        assert "#20824" in plan.reason and hardware.ENV_AMX in plan.reason


def test_apply_kernel_plan_sets_the_model_parameter():
    class Params:
        use_extra_bufts = True

    assert hardware.apply_kernel_plan(Params(), kernel_plan(XEON_AMX, ["AMX"])).use_extra_bufts is False
    assert hardware.apply_kernel_plan(Params(), kernel_plan(EPYC, ["CPU_REPACK"])).use_extra_bufts is True


def test_this_machines_plan_matches_its_llama_cpp():
    """The plan detected here agrees with the decision taken from this build's own system info."""
    hardware._detected_plan.cache_clear()
    plan = hardware.detect_kernel_plan()
    names = hardware.detect_extra_buffer_types()
    assert names is not None  # llama-cpp-python exposes ggml's device registry
    assert plan == kernel_plan(hardware.system_info(), names, "")
    if "AMX_INT8 = 1" in hardware.system_info() and "AMX" in names:
        assert not plan.use_extra_bufts


def test_cmake_args_avoid_amx_only_where_the_cpu_has_it():
    amx_flags = {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8",
                 "amx_tile"}
    args, variant = cmake_cpu_args(amx_flags)
    assert variant == "no-amx" and args[0] == "-DGGML_NATIVE=OFF"
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_BF16=ON" in args
    assert not any("AMX" in a for a in args) and "-DGGML_AVX512_VBMI=ON" not in args
    assert cmake_cpu_args({"avx", "avx2"}) == ([], "native")
    assert cmake_cpu_args(amx_flags, avoid_amx=False) == ([], "native")
    assert hardware.cpu_flags("processor : 0\nflags\t\t: fpu avx amx_int8\n") == {"fpu", "avx", "amx_int8"}


@pytest.mark.parametrize("cpu, n, words", [
    (CpuFigures(logical=8, allowed=8, physical=4), 4, "physical cores"),  # SMT
    (CpuFigures(logical=8, allowed=8, physical=8), 8, "affinity"),
    (CpuFigures(logical=64, allowed=4, physical=4), 4, "of 64"),  # taskset / cpuset
    (CpuFigures(logical=64, allowed=64, quota=2.5, physical=32), 2, "quota of 2.5"),  # docker --cpus=2.5
    (CpuFigures(logical=12, allowed=12, physical=12, performance=8), 8, "performance cores"),  # Apple M-series
    (CpuFigures(logical=1, allowed=1, quota=0.5), 1, "quota"),
    (CpuFigures(logical=4, allowed=4), 4, "affinity"),  # a Raspberry Pi 5, no topology read
])
def test_choose_threads(cpu, n, words):
    threads, reason = choose_threads(cpu)
    assert threads == n
    assert words in reason


def test_default_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv(hardware.ENV_THREADS, "3")
    assert hardware.default_threads() == (3, f"${hardware.ENV_THREADS}")
    monkeypatch.setenv(hardware.ENV_THREADS, "zero")
    with pytest.raises(ModelLoadError, match="positive integer"):
        hardware.default_threads()
    monkeypatch.delenv(hardware.ENV_THREADS)
    n, reason = hardware.default_threads()
    assert 1 <= n <= (hardware.os.cpu_count() or 1) and reason


# Gemma 3 4B (REFERENCE section 12) in Q4_K_M, and the 270M demo model.
GEMMA_4B = ModelShape(n_layer=34, n_head=8, n_head_kv=4, head_dim=256, n_embd=2560, n_ff=10240, n_vocab=262208,
                      n_swa=1024, swa_layers=29, weights_bytes=int(2.49e9), trained_ctx=131072)
GEMMA_270M = ModelShape(n_layer=18, n_head=4, n_head_kv=1, head_dim=256, n_embd=640, n_ff=2048, n_vocab=262144,
                        n_swa=512, swa_layers=15, weights_bytes=253 * MiB, trained_ctx=32768)


def test_kv_cache_bytes_for_gemma_3_4b():
    # 34 layers x 2 x 4 heads x 256 x 2 B = 136 KiB a token: 1.14 GB at 8k with the full-size SWA cache.
    assert kv_cache_bytes(GEMMA_4B, 8192) == 34 * 2 * 4 * 256 * 2 * 8192
    assert abs(kv_cache_bytes(GEMMA_4B, 8192) / 1e9 - 1.14) < 0.01
    # Without it: 5 global layers at 8k, 29 local ones at the window plus a batch (1,536 cells).
    small = kv_cache_bytes(GEMMA_4B, 8192, swa_full=False)
    assert small == 2 * 4 * 256 * 2 * (5 * 8192 + 29 * 1536)
    assert 0.3e9 < small < 0.45e9
    assert kv_cache_bytes(GEMMA_4B, 8192, "q8_0") == pytest.approx(kv_cache_bytes(GEMMA_4B, 8192) * 17 / 32, 1e-9)


@pytest.mark.parametrize("shape, budget, n_ctx, kv", [
    (GEMMA_270M, 20 * GiB, 8192, "f16"),  # this kind of machine: the old default
    (GEMMA_4B, 12 * GiB, 8192, "f16"),  # a 16 GB Mac (three quarters of it)
    (GEMMA_4B, 7 * GiB, 8192, "f16"),  # an 8 GB Raspberry Pi 5
    (GEMMA_4B, int(3.9 * GiB), 8192, "f16"),  # about 3.80 GiB needed
    (GEMMA_4B, int(3.5 * GiB), 8192, "q8_0"),  # 8k fits only with a q8_0 cache: a 4 GB Raspberry Pi 5
    (GEMMA_4B, int(3.0 * GiB), 4096, "q8_0"),
    (GEMMA_4B, int(2.8 * GiB), 2048, "q8_0"),
])
def test_choose_context(shape, budget, n_ctx, kv):
    plan = choose_context(shape, budget)
    assert (plan.n_ctx, plan.kv_type) == (n_ctx, kv)
    assert plan.need_bytes <= budget
    assert plan.flash_attn == (kv == "q8_0")
    assert f"{n_ctx} tokens, {kv} KV cache" in plan.reason


def test_choose_context_does_not_fit():
    with pytest.raises(ModelLoadError, match=r"does not fit in the available RAM: .* needed at 512 tokens.*"
                                              r"2\.00 GiB available"):
        choose_context(GEMMA_4B, 2 * GiB)


def test_choose_context_explicit_and_limits():
    # An explicit length is kept, the type chosen, and tried even where the estimate says it will not fit.
    assert choose_context(GEMMA_4B, 14 * GiB, n_ctx=4096).n_ctx == 4096
    tight = choose_context(GEMMA_4B, 2 * GiB, n_ctx=2048)
    assert tight.n_ctx == 2048 and "as asked" in tight.reason
    # The trained context caps auto; without flash attention only f16 is offered.
    short = ModelShape(**{**GEMMA_270M.__dict__, "trained_ctx": 2048})
    assert choose_context(short, 20 * GiB).n_ctx == 2048
    no_fa = choose_context(GEMMA_4B, int(3.5 * GiB), flash_attn_ok=False)
    assert (no_fa.n_ctx, no_fa.kv_type) == (4096, "f16") and "8192/f16" in no_fa.reason
    with pytest.raises(ModelLoadError, match="needs flash attention"):
        choose_context(GEMMA_4B, 14 * GiB, kv_type="q8_0", flash_attn_ok=False)
    with pytest.raises(ModelLoadError, match="auto, f16 or q8_0"):
        choose_context(GEMMA_4B, 14 * GiB, kv_type="q4_0")
    unknown = choose_context(GEMMA_4B, None)
    assert unknown.n_ctx == 8192 and "not known" in unknown.reason
    # Without the full-size SWA cache the 4 GB Pi keeps an f16 cache at 8k.
    assert choose_context(GEMMA_4B, int(3.4 * GiB)).kv_type == "q8_0"
    no_swa = choose_context(GEMMA_4B, int(3.4 * GiB), swa_full=False)
    assert (no_swa.n_ctx, no_swa.kv_type, no_swa.swa_full) == (8192, "f16", False)
