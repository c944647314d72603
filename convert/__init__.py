"""HF safetensors (Gemma 3 / ToolGrad) -> GGUF F32/F16/BF16 -> llama.cpp quantization.

Knows nothing of grammars, prompts or servers. llama.cpp is loaded only when
quantizing.
"""

from __future__ import annotations

from .conversion import DEFAULT_QUANTS, SUPPORTED_TYPES, convert_checkpoint
from .quantize import QUANT_TYPES, quantize_gguf

__all__ = ["convert_checkpoint", "quantize_gguf", "SUPPORTED_TYPES", "DEFAULT_QUANTS", "QUANT_TYPES"]
