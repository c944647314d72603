"""Hardware decisions as pure functions of given figures: kernels, threads, context; and this machine's plan."""

from __future__ import annotations

import pytest

from toolgrad_edge import hardware
from toolgrad_edge.engines import kernel_guard
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
EPYC_PLAN = kernel_plan(EPYC, ["CPU_REPACK"])


def test_parse_system_info():
    info = parse_system_info(XEON_AMX)
    assert info["AMX_INT8"] == "1" and info["SSE3"] == "1" and info["REPACK"] == "1"
    assert parse_system_info(MAC)["EMBED_LIBRARY"] == "1"
    assert parse_system_info("") == {}


@pytest.mark.parametrize("info, bufts, opt_in, extra, avoided, dropped", [
    # The crash: AMX taken out of the device's list, the other repacking kept.
    (XEON_AMX, ["AMX", "CPU_REPACK"], None, True, ("AMX",), ("AMX",)),
    (XEON_AMX, ["AMX", "CPU_REPACK"], "0", True, ("AMX",), ("AMX",)),
    (XEON_AMX, ["AMX"], None, False, ("AMX",), ()),  # nothing else listed: no extra buffer types at all
    (XEON_AMX, None, None, False, ("AMX",), ()),  # the list unknown: the system info decides, no edit
    (XEON_AMX, ["AMX", "CPU_REPACK"], "1", True, (), ()),  # opted back in
    (XEON_AMX, ["CPU_REPACK"], None, True, (), ()),  # AMX built but not offered (e.g. the CPU has no tiles)
    (EPYC, ["CPU_REPACK"], None, True, (), ()),
    (EPYC, None, None, True, (), ()),
    (MAC, [], None, True, (), ()),
])
def test_kernel_plan(info, bufts, opt_in, extra, avoided, dropped):
    plan = kernel_plan(info, bufts, opt_in)
    assert plan.use_extra_bufts is extra
    assert plan.avoided == avoided
    assert plan.dropped == dropped
    assert plan.reason
    if avoided:
        assert "#20824" in plan.reason and hardware.ENV_AMX in plan.reason
    if dropped:
        assert "repacked with CPU_REPACK" in plan.reason


def test_the_amx_plan_falls_back_when_the_list_cannot_be_edited(monkeypatch):
    # A llama.cpp whose list did not change (a copy handed out, say): no extra buffer types at all.
    monkeypatch.setattr(kernel_guard, "system_info", lambda: XEON_AMX)
    monkeypatch.setattr(kernel_guard, "original_extra_buffer_types", lambda: ["AMX", "CPU_REPACK"])
    monkeypatch.setattr(kernel_guard, "restrict_extra_buffer_types", lambda drop=(): ["AMX", "CPU_REPACK"])
    kernel_guard._detected_plan.cache_clear()
    try:
        plan = kernel_guard.detect_kernel_plan()
    finally:
        kernel_guard._detected_plan.cache_clear()
    assert (plan.use_extra_bufts, plan.avoided, plan.dropped) == (False, ("AMX",), ())
    assert "could not be taken out" in plan.reason and "no AMX, no repacking" in plan.reason


@pytest.mark.parametrize("info, bufts", [(XEON_AMX, ["AMX", "CPU_REPACK"]), (EPYC, ["CPU_REPACK"]), (MAC, [])])
def test_repacking_turned_off_on_any_cpu(info, bufts):
    plan = kernel_plan(info, bufts, amx_opt_in="1", repack="0")  # wins over the AMX opt-in
    assert (plan.use_extra_bufts, plan.avoided) == (False, ("repacking",))
    assert hardware.ENV_REPACK in plan.reason
    assert kernel_plan(info, bufts, repack="1") == kernel_plan(info, bufts)


def test_repack_environment_variable(monkeypatch):
    monkeypatch.setenv(hardware.ENV_REPACK, "0")
    assert kernel_guard.detect_kernel_plan().avoided == ("repacking",)
    assert hardware.environment_overrides()[hardware.ENV_REPACK] == "0"
    monkeypatch.delenv(hardware.ENV_REPACK)
    assert kernel_guard.detect_kernel_plan().avoided in ((), ("AMX",))


def test_apply_kernel_plan_sets_the_model_parameter():
    class Params:
        use_extra_bufts = True

    assert kernel_guard.apply_kernel_plan(Params(), kernel_plan(XEON_AMX, ["AMX"])).use_extra_bufts is False
    assert kernel_guard.apply_kernel_plan(Params(), kernel_plan(EPYC, ["CPU_REPACK"])).use_extra_bufts is True


def test_this_machines_plan_matches_its_llama_cpp():
    """The plan detected here agrees with the decision taken from this build's own strings, and the
    device's list afterwards holds exactly what the plan keeps (on an AMX CPU: no AMX)."""
    kernel_guard._detected_plan.cache_clear()
    original = kernel_guard.original_extra_buffer_types()  # the list as llama.cpp made it
    assert original is not None  # llama-cpp-python exposes ggml's device registry
    plan = kernel_guard.detect_kernel_plan()
    env = hardware.os.environ
    assert plan == kernel_plan(hardware.system_info(), original, env.get(hardware.ENV_AMX, ""),
                               env.get(hardware.ENV_REPACK, ""))
    now = kernel_guard.detect_extra_buffer_types()
    assert now == [name for name in original if name not in plan.dropped]
    if "AMX_INT8 = 1" in hardware.system_info() and "AMX" in original and env.get(hardware.ENV_AMX) != "1":
        assert "AMX" not in now or not plan.use_extra_bufts


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


@pytest.mark.parametrize("shape, budget, n_ctx, kv, swa_full", [
    (GEMMA_270M, 20 * GiB, 8192, "f16", True),  # this kind of machine: the old default
    (GEMMA_4B, 12 * GiB, 8192, "f16", True),  # a 16 GB Mac (three quarters of it)
    (GEMMA_4B, 7 * GiB, 8192, "f16", True),  # an 8 GB Raspberry Pi 5
    (GEMMA_4B, int(3.9 * GiB), 8192, "f16", True),  # about 3.80 GiB needed
    (GEMMA_4B, int(3.5 * GiB), 8192, "q8_0", True),  # 8k fits only with a q8_0 cache: a 4 GB Raspberry Pi 5
    # Below that, the sliding-window layers keep only their window rather than the context shrinking:
    (GEMMA_4B, int(3.1 * GiB), 8192, "f16", False),  # 3.06 GiB: the window-only cache in f16 before q8_0
    (GEMMA_4B, int(3.0 * GiB), 8192, "q8_0", False),
    (GEMMA_4B, int(2.8 * GiB), 8192, "q8_0", False),  # 2.78 GiB (with the full-size cache: 2048 tokens)
    (GEMMA_4B, int(2.7 * GiB), 1024, "q8_0", True),  # 1024 tokens: the window is the whole cache
])
def test_choose_context(shape, budget, n_ctx, kv, swa_full):
    plan = choose_context(shape, budget)
    assert (plan.n_ctx, plan.kv_type, plan.swa_full) == (n_ctx, kv, swa_full)
    assert plan.need_bytes <= budget
    assert plan.flash_attn == (kv == "q8_0")
    assert f"{n_ctx} tokens, {kv} KV cache" in plan.reason
    assert ("keep only their 1024-token window" in plan.reason) == (not swa_full)


@pytest.mark.parametrize("budget, swa_full, n_ctx, kv", [
    # Asked for the full-size SWA cache: the context shrinks instead.
    (int(3.0 * GiB), True, 4096, "q8_0"),
    (int(2.8 * GiB), True, 2048, "q8_0"),
    # Asked for the window only: f16 at 8k where auto kept the full-size cache with q8_0.
    (int(3.4 * GiB), False, 8192, "f16"),
])
def test_choose_context_swa_as_asked(budget, swa_full, n_ctx, kv):
    plan = choose_context(GEMMA_4B, budget, swa_full=swa_full)
    assert (plan.n_ctx, plan.kv_type, plan.swa_full) == (n_ctx, kv, swa_full)
    assert "window" not in plan.reason  # the trade is not announced when it was asked for


def test_choose_context_swa_auto_without_sliding_layers():
    # A model whose layers all attend globally has no window to drop: the cache is the same either way.
    dense = ModelShape(**{**GEMMA_4B.__dict__, "n_swa": 0, "swa_layers": 0})
    plan = choose_context(dense, int(3.0 * GiB))
    assert plan.swa_full and plan.n_ctx < 8192 and "window" not in plan.reason
    with pytest.raises(ModelLoadError, match="swa_full must be auto, True or False"):
        choose_context(GEMMA_4B, None, swa_full="yes")


def test_choose_context_does_not_fit():
    with pytest.raises(ModelLoadError, match=r"does not fit in the available RAM: .* needed at 512 tokens.*"
                                              r"2\.00 GiB available"):
        choose_context(GEMMA_4B, 2 * GiB)


def test_choose_context_explicit_and_limits():
    # An explicit length is kept, the type chosen, and tried even where the estimate says it will not fit.
    assert choose_context(GEMMA_4B, 14 * GiB, n_ctx=4096).n_ctx == 4096
    tight = choose_context(GEMMA_4B, 2 * GiB, n_ctx=2048)
    assert tight.n_ctx == 2048 and "as asked" in tight.reason
    assert (tight.kv_type, tight.swa_full) == ("q8_0", False)  # the smallest cache for that length
    # The trained context caps auto; without flash attention only f16 is offered.
    short = ModelShape(**{**GEMMA_270M.__dict__, "trained_ctx": 2048})
    assert choose_context(short, 20 * GiB).n_ctx == 2048
    no_fa = choose_context(GEMMA_4B, int(3.5 * GiB), flash_attn_ok=False)
    assert (no_fa.n_ctx, no_fa.kv_type, no_fa.swa_full) == (8192, "f16", False)
    assert "8192/f16/full SWA (3.80 GiB)" in no_fa.reason
    no_fa_full = choose_context(GEMMA_4B, int(3.5 * GiB), flash_attn_ok=False, swa_full=True)
    assert (no_fa_full.n_ctx, no_fa_full.kv_type) == (4096, "f16") and "8192/f16 (3.80 GiB)" in no_fa_full.reason
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


H100 = {"name": "CUDA0", "description": "NVIDIA H100 80GB HBM3", "type": "gpu",
        "memory_total_bytes": 80 * GiB, "memory_free_bytes": 79 * GiB}
SMALL_GPU = {"name": "CUDA0", "description": "GeForce GTX 1650", "type": "gpu",
             "memory_total_bytes": 4 * GiB, "memory_free_bytes": int(3.0 * GiB)}
M2 = {"name": "Metal", "description": "Apple M2", "type": "gpu",
      "memory_total_bytes": 11 * GiB, "memory_free_bytes": 11 * GiB}
CPU_DEV = {"name": "CPU", "description": "AMD EPYC", "type": "cpu", "memory_total_bytes": 24 * GiB,
           "memory_free_bytes": 23 * GiB}


@pytest.mark.parametrize("ram, devices, layers, unified, want_bytes, want_memory", [
    (20 * GiB, [CPU_DEV], 0, False, 20 * GiB, "RAM"),  # CPU only
    (20 * GiB, [CPU_DEV, H100], 0, False, 20 * GiB, "RAM"),  # a GPU, but no layer on it
    (20 * GiB, [CPU_DEV, H100], 10, False, 20 * GiB, "RAM"),  # some layers on the CPU: the RAM, conservative
    (2 * GiB, [CPU_DEV, H100], -1, False, 79 * GiB, "GPU memory (NVIDIA H100 80GB HBM3)"),  # every layer
    (20 * GiB, [CPU_DEV, SMALL_GPU], 34, False, int(3.0 * GiB), "GPU memory (GeForce GTX 1650)"),
    (20 * GiB, [CPU_DEV, H100, H100], -1, False, 158 * GiB, "GPU memory (NVIDIA H100 80GB HBM3, NVIDIA H100 80GB "
                                                             "HBM3)"),  # layers split over both
    (12 * GiB, [CPU_DEV, M2], -1, True, 11 * GiB, "GPU memory (Apple M2)"),  # unified: Metal's working set
    (8 * GiB, [CPU_DEV, M2], -1, True, 8 * GiB, "RAM"),  # unified, less RAM free than Metal's working set
])
def test_memory_budget(ram, devices, layers, unified, want_bytes, want_memory):
    budget = hardware.memory_budget(ram, devices, layers, n_layer=34, unified=unified)
    assert (budget.bytes, budget.memory) == (want_bytes, want_memory)
    assert budget.reason


def test_context_planned_against_the_gpu():
    # 2 GiB of RAM free would not hold the 4B model, but every layer goes to a 3 GiB GPU.
    on_gpu = hardware.plan_defaults(GEMMA_4B, EPYC_PLAN, n_threads=2, ram=(4 * GiB, 2 * GiB), n_gpu_layers=-1,
                                    devices=[CPU_DEV, SMALL_GPU])
    assert on_gpu.budget.memory == "GPU memory (GeForce GTX 1650)"
    assert (on_gpu.context.n_ctx, on_gpu.context.kv_type) == (8192, "q8_0")
    assert "free in GPU memory (GeForce GTX 1650)" in on_gpu.context.reason
    with pytest.raises(ModelLoadError, match=r"does not fit in the available RAM: .* 2\.00 GiB available"):
        hardware.plan_defaults(GEMMA_4B, EPYC_PLAN, n_threads=2, ram=(4 * GiB, 2 * GiB), n_gpu_layers=0,
                               devices=[CPU_DEV, SMALL_GPU])
    tiny = {**SMALL_GPU, "memory_free_bytes": 2 * GiB}
    with pytest.raises(ModelLoadError, match=r"does not fit in the available GPU memory \(GeForce GTX 1650\): "
                                              r".*2\.00 GiB free in GPU memory.*offload fewer layers"):
        hardware.plan_defaults(GEMMA_4B, EPYC_PLAN, n_threads=2, ram=(32 * GiB, 30 * GiB), n_gpu_layers=-1,
                               devices=[tiny])



def test_choose_parallel_by_threads_and_ram():
    from toolgrad_edge.hardware import choose_context, choose_parallel, kv_cache_bytes

    context = choose_context(GEMMA_270M, 16 * GiB, n_ctx=4096, kv_type="f16", swa_full=True)
    n, why = choose_parallel(GEMMA_270M, 2, context, 16 * GiB)
    assert n == 8 and "8 for 2 threads" in why
    assert choose_parallel(GEMMA_270M, 1, context, 16 * GiB)[0] == 4  # 4 per thread
    per_seq = kv_cache_bytes(GEMMA_270M, 4096, "f16", True)
    tight = GEMMA_270M.weights_bytes + context.compute_bytes + 200 * MiB + 3 * per_seq + 1
    n, why = choose_parallel(GEMMA_270M, 2, context, tight)
    assert n == 3 and "3 sequences of 4096 tokens" in why
    assert choose_parallel(GEMMA_270M, 2, context, None)[0] == 8  # RAM unknown: threads decide
