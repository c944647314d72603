"""Real weights: the 270M-derived bf16 checkpoint converts to a GGUF that matches transformers.

The checkpoint is built here from the Gemma 3 270M GGUF that the demo package
ships (benchmarks/make_270m_checkpoint.py, about a minute), then converted to
BF16, Q8_0 and Q4_K_M. Tokenization of a fixed set of strings must be identical
across llama.cpp on the converted file, the checkpoint's HF tokenizer and
llama.cpp on the original 270M GGUF, and the converted vocabulary must be the
original's token by token.

The checkpoint's tokenizer.model spells the user-defined whitespace pieces
with U+2581, as Google's does. (It once copied the GGUF's raw spaces, which
hid a converter that copied pieces verbatim: every run of spaces then
tokenized differently from sentencepiece and the published GGUF.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

from convert_fixtures import gguf_vocabulary, llama_logits, load_270m_builder, reference_logits  # noqa: E402
from toolgrad_edge.convert import convert_checkpoint  # noqa: E402
from toolgrad_edge.convert.tokenizer import read_vocabulary  # noqa: E402

pytestmark = pytest.mark.model  # the 270M GGUF, rebuilt as a checkpoint and converted again

# Code, JSON, whitespace runs, tabs and newlines, CJK, emoji and the chat control tokens.
TOKENIZATION_CASES = [
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    '{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}',
    "[get_weather(location='Paris', unit='celsius'), math.factorial(n=5)]",
    "a    b        c",
    "   leading and trailing spaces   ",
    "  two  spaces   three",
    json.dumps({"name": "get_weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}, indent=4),
    "class A:\n    def f(self):\n        if self:\n            return 1\n",
    "\t\t\tthree tabs\t\t\t\t\t\t\t\tand eight\n\n\n\n\n\nsix newlines",
    "\tone tab\n\ttwo\t\ttabs\r\nwindows line\n\n\nthree newlines",
    "東京の天気は？今天天气怎么样？서울 날씨는 어때요?",
    "Call me 📞 when you land ✈️ 👍🏽 🇫🇷",
    "<start_of_turn>user\nWhat's 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "Numbers: 12345 3.14159 -1e-9 0x1F",
    "",
]

REAL_PROMPT = (
    "<start_of_turn>user\nYou are an expert in composing functions. Here is a list of functions in JSON format "
    "that you can invoke.\n[{\"name\": \"get_weather\", \"parameters\": {\"location\": {\"type\": \"string\"}}}]\n\n"
    "What's the weather like in Paris today?<end_of_turn>\n<start_of_turn>model\n"
)


@pytest.fixture(scope="session")
def derived(tmp_path_factory):
    """(checkpoint folder, {type: gguf}) for the 270M-derived checkpoint."""
    root = tmp_path_factory.mktemp("gemma3-270m")
    folder = load_270m_builder().build_checkpoint(root / "gemma3-270m-hf")
    files = convert_checkpoint(folder, outdir=root / "gguf", quants=["BF16", "Q8_0", "Q4_K_M"], progress=False)
    return folder, dict(zip(["BF16", "Q8_0", "Q4_K_M"], files))


@pytest.fixture(scope="session")
def hf_tokenizer(derived):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(derived[0]))


def _vocab_model(path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_vocabulary_identical_token_by_token(derived, gemma_270m_gguf):
    source = gguf_vocabulary(gemma_270m_gguf)
    for kind, path in derived[1].items():
        ours = gguf_vocabulary(path)
        bad = [(i, ours[i], source[i]) for i in range(len(source)) if ours[i] != source[i]]
        assert len(ours) == len(source) and not bad, (kind, len(bad), bad[:5])


def test_tokenization_identical_everywhere(derived, hf_tokenizer, gemma_270m_gguf):
    converted, original = _vocab_model(derived[1]["BF16"]), _vocab_model(gemma_270m_gguf)
    try:
        for text in TOKENIZATION_CASES:
            ours = converted.tokenize(text.encode(), add_bos=True, special=True)
            reference = original.tokenize(text.encode(), add_bos=True, special=True)
            hf = hf_tokenizer(text)["input_ids"]
            assert ours == reference == hf, text
        # Control tokens are single tokens, and come out only when asked for.
        ids = converted.tokenize(b"<start_of_turn><end_of_turn>", add_bos=False, special=True)
        assert ids == [105, 106]
        assert converted.detokenize([105, 106], special=False) == b""
    finally:
        converted.close()
        original.close()


def test_bf16_logits_match_transformers(derived, hf_tokenizer):
    folder, ggufs = derived
    tokens = hf_tokenizer(REAL_PROMPT)["input_ids"]
    reference = reference_logits(folder, tokens)
    report = {}
    for kind, path in ggufs.items():
        logits = llama_logits(path, tokens)
        report[kind] = {
            "max_abs_diff": float(np.abs(logits - reference).max()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        }
    report["logit_scale"] = float(np.abs(reference).max())
    report["positions"] = len(tokens)
    print("\n270M-derived vs transformers float32:", json.dumps(report, indent=1))
    bf16 = report["BF16"]
    assert bf16["top1_agreement"] >= 0.97, report
    assert bf16["max_abs_diff"] < 0.02 * report["logit_scale"], report
    assert report["Q8_0"]["top1_agreement"] >= 0.9, report


def test_tokenizer_json_fallback_tokenizes_the_same(derived, tmp_path, gemma_270m_gguf):
    """A folder without tokenizer.model falls back to tokenizer.json with the same result."""
    folder = derived[0]
    json_only = tmp_path / "gemma3-270m-json-only"
    json_only.mkdir()
    for p in folder.iterdir():
        if p.name != "tokenizer.model":
            (json_only / p.name).symlink_to(p)
    from_model = read_vocabulary(folder, 262144)
    from_json = read_vocabulary(json_only, 262144)
    assert (from_model.source, from_json.source) == ("tokenizer.model", "tokenizer.json")
    assert from_json.tokens == from_model.tokens and from_json.types == from_model.types
    source = gguf_vocabulary(gemma_270m_gguf)
    assert from_json.tokens == [t for t, _, _ in source] and from_json.types == [k for _, _, k in source]
    # Merged pieces keep SentencePiece's scores; single characters (never a merge
    # result, so their scores are unused) may sit at a different offset.
    merged = [i for i, (t, k) in enumerate(zip(from_model.tokens, from_model.types))
              if k == 1 and len(t.decode("utf-8", "replace")) > 1]
    assert all(from_json.scores[i] == from_model.scores[i] for i in merged)

    [path] = convert_checkpoint(json_only, outdir=tmp_path / "gguf", quants=["BF16"], progress=False)
    converted, original = _vocab_model(path), _vocab_model(gemma_270m_gguf)
    try:
        for text in TOKENIZATION_CASES:
            assert converted.tokenize(text.encode(), add_bos=True, special=True) == \
                original.tokenize(text.encode(), add_bos=True, special=True), text
    finally:
        converted.close()
        original.close()
