"""Several GGUF files side by side: speed, memory and quality against the highest-precision one.

Speed figures come from ``measure.measure_model`` (medians after a warm-up,
including llama-cpp-python's own grammar path as the baseline), run in a
fresh process per file so that each file's peak RSS is its own. Quality is
measured in this process: for a fixed set of BFCL prompts in the ToolGrad
format, each file's next-token distributions are taken along the reference
answer (teacher forcing) and compared with those of the highest-precision
file given: top-1 agreement and mean KL(reference || file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..convert.quantize import BITS_PER_WEIGHT
from ..errors import EvaluationError

QUALITY_PROMPTS = "quality_prompts.json"


# --- quality ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityPrompt:
    id: str
    messages: list[dict]
    functions: list[dict]
    answer: str  # the reference call list, teacher-forced


def quality_prompts() -> list[QualityPrompt]:
    """The fixed BFCL prompts (shipped in toolgrad_edge/evaluate/quality_prompts.json)."""
    doc = json.loads(resources.files("toolgrad_edge.evaluate").joinpath(QUALITY_PROMPTS).read_text())
    return [QualityPrompt(p["id"], p["messages"], p["functions"], p["answer"]) for p in doc["prompts"]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) in nats, over the last axis, from log-probabilities."""
    ref = np.asarray(ref_logprobs, dtype=np.float64)
    return (np.exp(ref) * (ref - np.asarray(logprobs, dtype=np.float64))).sum(axis=-1)


@dataclass
class QualityStats:
    """Running top-1 agreement and mean KL over positions."""

    positions: int = 0
    agree: int = 0
    kl_sum: float = 0.0

    def add(self, ref_logprobs: np.ndarray, logprobs: np.ndarray) -> None:
        self.positions += 1
        self.agree += int(np.argmax(ref_logprobs) == np.argmax(logprobs))
        self.kl_sum += float(kl_divergence(ref_logprobs, logprobs))

    def to_dict(self) -> dict:
        n = self.positions
        return {
            "positions": n,
            "top1_agreement": self.agree / n if n else None,
            "mean_kl": self.kl_sum / n if n else None,
        }


def next_token_logits(model_path, prompts: list[QualityPrompt], *, n_threads: int | None = None,
                      n_gpu_layers="auto", n_ctx: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (prompt index, logits) for every answer position of every prompt.

    The positions are: the end of the prompt (the first answer token's
    distribution), then after each answer token, the last one predicting
    ``<end_of_turn>``.
    """
    from ..grammars import load_tools
    from ..prompt import END_OF_TURN, Segment, render_prompt
    from ..runtime import ToolRuntime

    with ToolRuntime(model_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_ctx=n_ctx,
                     prefix_cache=False) as rt:
        session = rt.session
        for i, prompt in enumerate(prompts):
            parts = render_prompt(prompt.messages, load_tools(prompt.functions), "python")
            tokens = rt.tokenize_segments(parts.prefix) + rt.tokenize_segments(parts.rest)
            answer = rt.tokenize_segments([Segment(prompt.answer), Segment(END_OF_TURN, True)])
            if len(tokens) + len(answer) > rt.n_ctx:
                raise EvaluationError(f"quality prompt {prompt.id} needs {len(tokens) + len(answer)} tokens; n_ctx is {rt.n_ctx}.")
            session.clear()
            logits = session.decode(tokens, 1)[0]
            for token in [None, *answer[:-1]]:
                if token is not None:
                    logits = session.decode([token], 1)[0]
                yield i, logits


def compare_quality(reference: Path, others: list[Path], prompts: list[QualityPrompt] | None = None, *,
                    n_threads: int | None = None, n_gpu_layers="auto",
                    progress: Callable[[str, int], None] | None = None) -> dict[str, dict]:
    """Top-1 agreement and mean KL of each file in ``others`` against ``reference``."""
    prompts = prompts if prompts is not None else quality_prompts()
    say = progress or (lambda label, advance: None)
    ref: list[np.ndarray] = []
    last = -1
    for i, logits in next_token_logits(reference, prompts, n_threads=n_threads, n_gpu_layers=n_gpu_layers):
        ref.append(log_softmax(logits).astype(np.float32))
        if i != last:
            say(f"quality {Path(reference).name}", 1)
            last = i
    out = {str(reference): {"positions": len(ref), "top1_agreement": 1.0, "mean_kl": 0.0}}
    for path in others:
        stats = QualityStats()
        last = -1
        for k, (i, logits) in enumerate(next_token_logits(path, prompts, n_threads=n_threads, n_gpu_layers=n_gpu_layers)):
            if k >= len(ref):
                raise EvaluationError(f"{path} tokenizes the quality prompts differently from {reference}; "
                                      "files of one model are expected.")
            stats.add(ref[k], log_softmax(logits))
            if i != last:
                say(f"quality {Path(path).name}", 1)
                last = i
        if stats.positions != len(ref):
            raise EvaluationError(f"{path} tokenizes the quality prompts differently from {reference}; "
                                  "files of one model are expected.")
        out[str(path)] = stats.to_dict()
    return out


# --- which file is the reference ---------------------------------------------------------

def precision_bits(quant: str, file_size: int | None = None, n_params: int | None = None) -> float:
    """Bits per weight of a file type (from convert's table, else from size and parameter count)."""
    if quant.upper() in BITS_PER_WEIGHT:
        return BITS_PER_WEIGHT[quant.upper()]
    if file_size and n_params:
        return 8.0 * file_size / n_params
    return 0.0


def pick_reference(files: list[dict]) -> int:
    """Index of the highest-precision file ({"quant", "file_size_bytes"}).

    Ties go to the type listed first in convert's table (BF16 before F16), then to the larger file.
    """
    if not files:
        raise EvaluationError("no model files to compare.")
    order = list(BITS_PER_WEIGHT)

    def rank(f: dict) -> tuple[float, int, int]:
        quant = f["quant"].upper()
        listed = order.index(quant) if quant in BITS_PER_WEIGHT else len(order)
        bits = precision_bits(quant, f.get("file_size_bytes"), f.get("n_params"))
        return bits, -listed, f.get("file_size_bytes") or 0

    return max(range(len(files)), key=lambda i: rank(files[i]))


def describe_file(path: Path) -> dict:
    from ..gguf_info import read_gguf_info

    info = read_gguf_info(path)
    return {"model": str(path), "quant": info.file_type, "file_size_bytes": Path(path).stat().st_size,
            "n_params": info.n_params}


# --- speed, one process per file ---------------------------------------------------------

def compare_models(paths: Iterable[str | os.PathLike], *, runs: int = 5, n_threads: int | None = None,
                   n_gpu_layers="auto", max_tokens: int = 64, quality: bool = True,
                   progress: Callable[[str, int], None] | None = None,
                   measure: Callable[..., dict] | None = None,
                   quality_fn: Callable[..., dict] | None = None) -> dict:
    """Measure every file; add quality against the highest-precision one. Returns the report dict."""
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise EvaluationError(f"model file(s) not found: {', '.join(missing)}; pass existing GGUF paths.")
    if len({p.resolve() for p in files}) != len(files):
        raise EvaluationError("the same file is given twice; pass each GGUF once.")
    described = [describe_file(p) for p in files]
    ref = pick_reference(described)
    if measure is None:
        from .measure import measure_in_subprocess

        measure = measure_in_subprocess()  # measure_model in a fresh interpreter per file
    rows = []
    for p, d in zip(files, described):
        row = measure(p, runs=runs, n_threads=n_threads, n_gpu_layers=n_gpu_layers, max_tokens=max_tokens,
                      progress=progress)
        rows.append({**row, **d, "model": str(p)})
    if quality and len(files) > 1:
        scores = (quality_fn or compare_quality)(files[ref], [p for i, p in enumerate(files) if i != ref],
                                                 n_threads=n_threads, n_gpu_layers=n_gpu_layers, progress=progress)
        for row, p in zip(rows, files):
            row["quality"] = scores[str(p)]
    return {
        "machine": machine_info(rows),
        "runs": runs,
        "reference": str(files[ref]),
        "quality_prompts": len(quality_prompts()) if quality and len(files) > 1 else 0,
        "models": rows,
    }


def machine_info(rows: list[dict]) -> dict:
    import platform

    from ..hardware import cpu_name

    first = rows[0] if rows else {}
    return {
        "cpu": first.get("cpu") or cpu_name(),
        "cores": os.cpu_count(),
        "threads": first.get("n_threads"),
        "backend": first.get("backend"),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }


# --- output ------------------------------------------------------------------------------

def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def _num(x, fmt="{:.1f}") -> str:
    """``x`` in ``fmt``; "n/a" for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and x != x) else fmt.format(x)


def text_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned lines: the first ``left`` columns flush left, the others flush right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


COLUMNS = (
    ("file", "{}"), ("quant", "{}"), ("size MiB", "{}"), ("peak RSS MiB", "{}"), ("prefill t/s", "{}"),
    ("decode free t/s", "{}"), ("constrained t/s", "{}"), ("baseline t/s", "{}"), ("constr/base", "{}"),
    ("TTFT cold s", "{}"), ("TTFT warm s", "{}"), ("top-1 agree", "{}"), ("mean KL", "{}"),
)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        q = m.get("quality") or {}
        ratio = (m.get("ratios") or {}).get("constrained_vs_baseline")
        is_ref = m["model"] == report["reference"] and q
        rows.append([
            Path(m["model"]).name + (" (ref)" if is_ref else ""), m.get("quant", "?"), _mib(m.get("file_size_bytes")),
            _mib(m.get("peak_rss_bytes")), _num(m.get("prefill_tps")), _num(m.get("decode_tps_free")),
            _num(m.get("decode_tps_constrained")), _num(m.get("decode_tps_baseline")),
            _num(ratio, "{:.2f}x"), _num(m.get("ttft_cold_s"), "{:.2f}"), _num(m.get("ttft_warm_s"), "{:.3f}"),
            _num(q.get("top1_agreement"), "{:.1%}") if q else "-", _num(q.get("mean_kl"), "{:.4f}") if q else "-",
        ])
    return rows


def _machine_line(report: dict) -> str:
    m = report["machine"]
    return (f"{m['cpu']}, {m['threads']} threads of {m['cores']} cores, back-end {m['backend']}, "
            f"{m['system']}; medians of {report['runs']} runs after a warm-up")


def format_table(report: dict) -> str:
    out = [_machine_line(report), "", *text_table([c for c, _ in COLUMNS], table_rows(report), left=2), ""]
    out.append("baseline = llama-cpp-python's create_completion(grammar=...) on the same file; "
               "constr/base = constrained / baseline decode speed.")
    if report.get("quality_prompts"):
        out.append(f"quality: next-token distributions along the reference answers of {report['quality_prompts']} "
                   f"BFCL prompts, vs {Path(report['reference']).name}; KL(ref || file) in nats.")
    return "\n".join(out)


def format_markdown(report: dict) -> str:
    return "\n".join([f"_{_machine_line(report)}_", "",
                      *markdown_table([c for c, _ in COLUMNS], table_rows(report))])


def plot(report: dict, path: str | os.PathLike) -> Path:
    """Bar chart of decode speeds (free, constrained, baseline) and prefill per file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluationError("--plot needs matplotlib: pip install 'toolgrad-edge[bench]'") from None
    models = report["models"]
    names = [f"{Path(m['model']).stem}\n{m.get('quant', '')}" for m in models]
    series = (("decode free", "decode_tps_free"), ("constrained", "decode_tps_constrained"),
              ("baseline", "decode_tps_baseline"))
    x = np.arange(len(models))
    width = 0.8 / len(series)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 2.5 * len(models), 4.5))
    for k, (label, key) in enumerate(series):
        ax.bar(x + (k - 1) * width, [m.get(key) or 0 for m in models], width, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title("decode")
    ax.legend()
    ax2.bar(x, [m.get("prefill_tps") or 0 for m in models], 0.5, color="tab:gray")
    ax2.set_xticks(x, names, fontsize=8)
    ax2.set_title("prefill tokens/s")
    fig.suptitle(_machine_line(report), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --- files from one source ---------------------------------------------------------------

def files_from_source(source: str, quants: list[str], workdir: Path, *, progress: bool = False) -> list[Path]:
    """Make one GGUF per type in ``quants`` from a source (float GGUF, checkpoint folder or hub id).

    A float GGUF source is quantized with llama.cpp's quantizer and compared
    too (as the reference); a checkpoint is converted with ``convert``.
    """
    from ..convert import QUANT_TYPES, convert_checkpoint, quantize_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if src.is_file():
        out = [src]
        for q in quants:
            if q.upper() not in QUANT_TYPES:
                raise EvaluationError(f"unknown quantization {q!r}; choose from {', '.join(QUANT_TYPES)}")
            out.append(quantize_gguf(src, workdir / f"{src.stem}-{q.upper()}.gguf", q.upper()))
        return out
    return convert_checkpoint(source, outdir=workdir, quants=quants, progress=progress)
