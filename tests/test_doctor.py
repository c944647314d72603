"""`toolgrad-edge doctor` end to end: the demo model, a model that fails to load, and llguidance missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolgrad_edge.engines import kernel_guard
from toolgrad_edge.cli import main

CHECKS = {"model loads", "narrow head", "speculative = stepwise", "valid call (speculative)",
          "valid call (stepwise)", "prefix state round trip", "cold = warm"}


def _doctor(*args):
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


@pytest.mark.slow
def test_doctor_on_the_demo_model(gemma_270m_gguf):
    result = _doctor("--model", str(gemma_270m_gguf), "--threads", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert CHECKS <= set(checks)
    assert all(checks[name]["ok"] is not False for name in CHECKS), report["checks"]
    assert checks["narrow head"]["ok"] is True  # the CPU back-end, a Q8_0 output weight
    assert checks["narrow head"]["figures"]["max_abs_difference"] <= 1e-3
    assert checks["prefix state round trip"]["figures"]["max_abs_difference"] == 0.0
    # The environment: versions, kernels, RAM, the defaults chosen and why.
    import llama_cpp

    assert report["versions"]["llama_cpp_python"] == llama_cpp.__version__
    assert report["kernels"]["use_extra_bufts"] == kernel_guard.detect_kernel_plan().use_extra_bufts
    assert report["kernels"]["reason"]
    assert report["threads"] == {"n": 2, "reason": "as asked"}
    assert report["context"]["n_ctx"] in (512, 1024, 2048, 4096, 8192) and report["context"]["reason"]
    assert report["memory"]["total_bytes"] > 0
    assert report["grammar_engine"]["default"] == "llguidance"
    assert report["extras"]["llguidance"] is True and report["extras"]["demo"] is True
    assert report["model"]["quantization"] == "Q4_K_M"
    assert any(d["type"] == "cpu" for d in report["backend"]["devices"])


@pytest.mark.slow
def test_doctor_text_report(gemma_270m_gguf):
    result = _doctor("--model", str(gemma_270m_gguf), "--threads", "2", "--n-ctx", "1024", "--kv-type", "f16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in ("llama-cpp-python", "back-end", "kernels", "RAM", "threads", "context", "grammar engine", "extras"):
        assert f"\n{label} " in f"\n{out}", (label, out)
    assert "1024 tokens as asked, f16 KV cache" in out or "1024 tokens, f16 KV cache" in out
    assert out.rstrip().endswith("All checks passed.")


def test_doctor_with_a_model_that_fails_to_load(gemma_270m_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gemma_270m_gguf.read_bytes()[:5_000_000])  # a download cut short
    result = _doctor("--model", str(broken), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    [load] = [c for c in report["checks"] if c["name"] == "model loads"]
    assert load["ok"] is False and "truncated GGUF" in load["detail"] and str(broken) in load["detail"]
    text = _doctor("--model", str(broken))
    assert text.exit_code == 1 and "Traceback" not in text.output
    assert "FAIL  model loads:" in text.output and text.output.rstrip().endswith("Failed: model loads.")
    missing = _doctor("--model", str(tmp_path / "nope.gguf"))
    assert missing.exit_code == 1 and "model file not found" in missing.output


@pytest.mark.slow
def test_doctor_without_llguidance(gemma_270m_gguf, tmp_path):
    """llguidance missing: reported with the way to install it, and the self-test runs on llama.cpp's sampler."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['llguidance'] = None  # as if not installed\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "from toolgrad_edge.cli import main; main()", "doctor", "--model",
                           str(gemma_270m_gguf), "--threads", "2", "--n-ctx", "2048", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["extras"]["llguidance"] is False
    assert report["grammar_engine"] == {"default": "llama", "llguidance": None, "notes": report["grammar_engine"]["notes"]}
    assert "llguidance is not installed" in report["grammar_engine"]["notes"][0]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["grammar engine"]["ok"] is None and "pip install 'toolgrad-edge[llguidance]'" in \
        checks["grammar engine"]["detail"]
    assert report["model"]["grammar_engine"] == "llama"
    assert checks["valid call (speculative)"]["ok"] and checks["cold = warm"]["ok"]
