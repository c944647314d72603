"""What to write: Gemma 3 hyper-parameters from config.json and the tensor plan.

The plan is computed from headers alone and validated before a byte is
written: every tensor of the checkpoint is either mapped to its GGUF name,
skipped as vision (and reported), or refused as unknown; every expected
tensor is present with the shape the config implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import ConversionError
from .safetensors_reader import SafetensorsCheckpoint
from .source import read_json_object

ARCH = gguf.MODEL_ARCH.GEMMA3
SUPPORTED_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

# Where the text model's weights sit, per save format; stripped to "model.".
TEXT_PREFIXES = (
    ("model.language_model.", "model."),        # Gemma3ForConditionalGeneration, transformers >= 4.52
    ("language_model.model.", "model."),        # Gemma3ForConditionalGeneration, older saves
    ("language_model.lm_head.", "lm_head."),    # older multimodal saves with an untied head
    ("model.", "model."),                       # Gemma3ForCausalLM (270M, 1B)
    ("lm_head.", "lm_head."),                   # an untied output head
)

# Tensors that belong to the vision side and never go into the text GGUF.
VISION_PREFIXES = (
    "vision_tower.", "model.vision_tower.",
    "multi_modal_projector.", "model.multi_modal_projector.",
)

# Gemma3TextConfig defaults: saved configs omit values equal to these
# (the 4B config.json has no num_attention_heads, head_dim or vocab_size).
TEXT_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,         # global (full-attention) layers
    "rope_local_base_freq": 10_000.0,  # sliding-window layers
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
    "rope_scaling": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}

# llama.cpp hard-codes Gemma 3's layer pattern: five sliding-window layers, then one global.
LLAMA_CPP_SWA_PERIOD = 6
# llama.cpp scales queries by 1/sqrt(hidden/heads) on 62-layer (27B) models, by 1/sqrt(head_dim) otherwise.
LLAMA_CPP_27B_LAYERS = 62


@dataclass(frozen=True)
class Gemma3HParams:
    """The text model's hyper-parameters, as llama.cpp needs them."""

    architecture: str
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_freq_base: float
    rope_freq_base_swa: float
    rope_scaling_factor: float | None  # linear, global layers only
    sliding_window: int
    tie_word_embeddings: bool


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder}: config.json is missing; it comes with the checkpoint "
            "(on the hub next to the *.safetensors files)"
        )
    return read_json_object(path)


def hparams_from_config(config: dict[str, Any], where: str = "config.json") -> Gemma3HParams:
    """Validate the architecture and collect what llama.cpp's gemma3 graph uses."""
    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(architectures) if architectures else "none"
        raise ConversionError(
            f"{where}: architecture {found} is not supported; this converter handles "
            f"{' and '.join(SUPPORTED_ARCHITECTURES)} (Gemma 3 / ToolGrad)"
        )
    text = config.get("text_config") if arch == "Gemma3ForConditionalGeneration" else config
    if not isinstance(text, dict):
        raise ConversionError(f"{where}: {arch} needs a 'text_config' object")
    hp = {**TEXT_CONFIG_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k in TEXT_CONFIG_DEFAULTS}}

    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if k not in text]
    if missing:
        raise ConversionError(f"{where}: {'text_config' if text is not config else 'config'} lacks {', '.join(missing)}")

    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hp.get(key) is not None:
            raise ConversionError(
                f"{where}: {key}={hp[key]} is set; Gemma 3 has no soft-capping and llama.cpp's "
                "gemma3 graph would ignore it (is this a Gemma 2 checkpoint?)"
            )

    if hp.get("use_bidirectional_attention"):
        raise ConversionError(
            f"{where}: use_bidirectional_attention is set (an embedding model); llama.cpp's gemma3 graph is causal"
        )

    rope_theta, rope_theta_swa, scaling = _rope(hp, where)
    n_layer = int(hp["num_hidden_layers"])
    _check_layer_pattern(hp, n_layer, where)

    n_embd, n_head, head_dim = int(hp["hidden_size"]), int(hp["num_attention_heads"]), int(hp["head_dim"])
    llama_scale_dim = n_embd // n_head if n_layer == LLAMA_CPP_27B_LAYERS else head_dim
    if int(hp["query_pre_attn_scalar"]) != llama_scale_dim:
        raise ConversionError(
            f"{where}: query_pre_attn_scalar={hp['query_pre_attn_scalar']} but llama.cpp scales "
            f"queries by 1/sqrt({llama_scale_dim}) for this shape; the GGUF would compute a different function"
        )

    return Gemma3HParams(
        architecture=arch,
        n_vocab=int(hp["vocab_size"]),
        n_embd=n_embd,
        n_ff=int(hp["intermediate_size"]),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(hp["num_key_value_heads"]),
        head_dim=head_dim,
        context_length=int(hp["max_position_embeddings"]),
        rms_norm_eps=float(hp["rms_norm_eps"]),
        rope_freq_base=rope_theta,
        rope_freq_base_swa=rope_theta_swa,
        rope_scaling_factor=scaling,
        sliding_window=int(hp["sliding_window"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
    )


def _rope(hp: dict[str, Any], where: str) -> tuple[float, float, float | None]:
    """(global theta, sliding-window theta, linear factor) from either config style."""
    params = hp.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        # transformers >= 5 nests RoPE settings per layer type.
        full, local = params["full_attention"], params.get("sliding_attention", {})
        theta = float(full.get("rope_theta", hp["rope_theta"]))
        theta_swa = float(local.get("rope_theta", hp["rope_local_base_freq"]))
        scaling = full if full.get("rope_type", "default") != "default" else None
        local_type = local.get("rope_type", "default")
    else:
        theta, theta_swa = float(hp["rope_theta"]), float(hp["rope_local_base_freq"])
        scaling, local_type = hp.get("rope_scaling"), "default"
    if local_type != "default":
        raise ConversionError(f"{where}: sliding-window layers use rope_type={local_type}; llama.cpp supports only plain RoPE there")
    factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise ConversionError(f"{where}: rope scaling {kind!r} on global layers; Gemma 3 uses 'linear'")
        factor = float(scaling["factor"])
    return theta, theta_swa, factor


def _check_layer_pattern(hp: dict[str, Any], n_layer: int, where: str) -> None:
    expected = [
        "full_attention" if (i + 1) % LLAMA_CPP_SWA_PERIOD == 0 else "sliding_attention" for i in range(n_layer)
    ]
    layer_types = hp.get("layer_types")
    if layer_types is not None and list(layer_types) != expected:
        first = next((i for i, (a, b) in enumerate(zip(layer_types, expected)) if a != b), min(len(layer_types), n_layer))
        raise ConversionError(
            f"{where}: layer_types differ from the 5-sliding:1-global pattern llama.cpp hard-codes for "
            f"Gemma 3 (first at layer {first}: {layer_types[first] if first < len(layer_types) else 'missing'}, "
            f"expected {expected[first] if first < n_layer else 'no more layers'})"
        )
    pattern = hp.get("sliding_window_pattern")
    if layer_types is None and pattern is not None and int(pattern) != LLAMA_CPP_SWA_PERIOD:
        raise ConversionError(
            f"{where}: sliding_window_pattern={pattern}; llama.cpp hard-codes {LLAMA_CPP_SWA_PERIOD} for Gemma 3"
        )


# --- tensors -----------------------------------------------------------------

# Per-layer tensors (after prefix stripping) and their shape from the hyper-parameters.
LAYER_SHAPES = {
    "input_layernorm.weight": lambda h: (h.n_embd,),
    "self_attn.q_proj.weight": lambda h: (h.n_head * h.head_dim, h.n_embd),
    "self_attn.k_proj.weight": lambda h: (h.n_head_kv * h.head_dim, h.n_embd),
    "self_attn.v_proj.weight": lambda h: (h.n_head_kv * h.head_dim, h.n_embd),
    "self_attn.o_proj.weight": lambda h: (h.n_embd, h.n_head * h.head_dim),
    "self_attn.q_norm.weight": lambda h: (h.head_dim,),
    "self_attn.k_norm.weight": lambda h: (h.head_dim,),
    "post_attention_layernorm.weight": lambda h: (h.n_embd,),
    "pre_feedforward_layernorm.weight": lambda h: (h.n_embd,),
    "post_feedforward_layernorm.weight": lambda h: (h.n_embd,),
    "mlp.gate_proj.weight": lambda h: (h.n_ff, h.n_embd),
    "mlp.up_proj.weight": lambda h: (h.n_ff, h.n_embd),
    "mlp.down_proj.weight": lambda h: (h.n_embd, h.n_ff),
}
EMBEDDING = "model.embed_tokens.weight"
OUTPUT_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from and what happens to it on the way."""

    source: str            # name in the checkpoint
    target: str            # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy (row-major) shape written, after any vocabulary cut
    is_norm: bool          # Gemma RMSNorm weight: stored as 1 + w, in F32
    src_dtype: str

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorPlan:
    tensors: list[PlannedTensor]
    skipped_vision: list[str] = field(default_factory=list)

    @property
    def source_dtypes(self) -> set[str]:
        return {t.src_dtype for t in self.tensors}

    def skipped_summary(self) -> str | None:
        if not self.skipped_vision:
            return None
        return f"skipped {len(self.skipped_vision)} vision/projector tensors (text-only GGUF)"


def text_name(name: str) -> str | None:
    """Strip the save format's prefix: the Gemma3ForCausalLM spelling, or None for non-text names."""
    for prefix, replacement in TEXT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return None


def build_plan(checkpoint: SafetensorsCheckpoint, hp: Gemma3HParams) -> TensorPlan:
    """Map, check and order every tensor; raise on anything unknown, missing or misshapen."""
    name_map = gguf.get_tensor_name_map(ARCH, hp.n_layer)
    expected = {EMBEDDING: (hp.n_vocab, hp.n_embd), OUTPUT_NORM: (hp.n_embd,)}
    for bid in range(hp.n_layer):
        for suffix, shape in LAYER_SHAPES.items():
            expected[f"model.layers.{bid}.{suffix}"] = shape(hp)

    by_text_name: dict[str, str] = {}
    skipped, unknown = [], []
    for name in checkpoint.tensors:
        if name.startswith(VISION_PREFIXES):
            skipped.append(name)
            continue
        stripped = text_name(name)
        if stripped is None or (stripped not in expected and stripped != LM_HEAD):
            unknown.append(name)
            continue
        if stripped in by_text_name:
            raise ConversionError(f"tensors {by_text_name[stripped]!r} and {name!r} both map to {stripped!r}")
        by_text_name[stripped] = name
    if unknown:
        shown = ", ".join(unknown[:20]) + (f", ... ({len(unknown) - 20} more)" if len(unknown) > 20 else "")
        raise ConversionError(
            f"{checkpoint.folder}: {len(unknown)} tensor(s) not part of a Gemma 3 text model "
            f"with {hp.n_layer} layers: {shown}"
        )
    missing = [n for n in expected if n not in by_text_name]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConversionError(f"{checkpoint.folder}: {len(missing)} expected tensor(s) missing: {shown}")

    planned = []
    order = list(expected) + ([LM_HEAD] if LM_HEAD in by_text_name else [])
    for stripped in order:
        source = by_text_name[stripped]
        info = checkpoint[source]
        want = expected.get(stripped, (hp.n_vocab, hp.n_embd))
        shape = info.shape
        if stripped in (EMBEDDING, LM_HEAD):
            # Rows past the real vocabulary (padding) are cut, as llama.cpp's converter does.
            if len(shape) != 2 or shape[1] != want[1] or shape[0] < want[0]:
                raise _shape_error(checkpoint, source, shape, want, "at least vocab_size rows")
            shape = want
        elif shape != want:
            raise _shape_error(checkpoint, source, shape, want)
        target = name_map.get_name(stripped, try_suffixes=(".weight",))
        if target is None:  # the table above and gguf's map disagree: a bug here, not in the input
            raise ConversionError(f"gguf's TensorNameMap has no GEMMA3 name for {stripped!r}")
        planned.append(PlannedTensor(source, target, tuple(shape), stripped.endswith("norm.weight"), info.dtype))
    return TensorPlan(planned, skipped)


def _shape_error(checkpoint, source, found, want, note="") -> ConversionError:
    info = checkpoint[source]
    extra = f" ({note})" if note else ""
    return ConversionError(
        f"{info.path.name}: tensor {source!r} has shape {list(found)}, config.json implies {list(want)}{extra}; "
        "the weights and config.json do not belong together"
    )
