"""The converted vocabulary is the source's, token by token, and tokenizes as the source does.

The source is the real Gemma 3 tokenizer: a ``tokenizer.model`` rebuilt from
the published 270M GGUF the way Google ships it (user-defined pieces, the
whitespace runs at ids 138, 139, ..., spell spaces as U+2581). A converter
that copies those pieces verbatim writes a GGUF in which llama.cpp never
matches them, so every run of spaces (ToolGrad's prompt indents its tool list
by 4 spaces) tokenizes differently from sentencepiece and the published GGUF.
No transformers here: the weights are random and tiny, only the vocabulary is real.
"""

from __future__ import annotations

import json

import gguf
import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("llama_cpp")

from convert_fixtures import fake_gemma_checkpoint, gemma_tokenizer_dir, gguf_vocabulary  # noqa: E402
from toolgrad_edge.convert import convert_checkpoint  # noqa: E402
from toolgrad_edge.convert.tokenizer import read_vocabulary  # noqa: E402

TokenType = gguf.TokenType

# Whitespace-heavy text: what a tool-calling prompt is made of.
WHITESPACE_CASES = [
    "  two  spaces   three",
    json.dumps({"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}, indent=4),
    "def add(a, b):\n    if a:\n        return a + b\n    return b\n",
    "\tone tab\n\ttwo\t\ttabs\n\t\t\tthree\t\t\t\t\tfive",
    "runs of newlines\n\n\nthree\n\n\n\n\n\nsix\r\n\r\nwindows",
    "   leading and trailing   \n   ",
    " " * 31 + "x" + " " * 40,
    "mixed \t \t  \n  \t\n",
    "<start_of_turn>user\n[\n    {\n        \"name\": \"f\"\n    }\n]<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(gemma_270m_gguf):
    return gemma_tokenizer_dir(gemma_270m_gguf)


@pytest.fixture(scope="module")
def converted(tokenizer_dir, tmp_path_factory):
    """A BF16 GGUF converted from random 2-layer weights and the real tokenizer."""
    root = tmp_path_factory.mktemp("real-vocab")
    folder = fake_gemma_checkpoint(root / "m", tokenizer_dir=tokenizer_dir)
    [path] = convert_checkpoint(folder, outdir=root / "gguf", quants=["BF16"], progress=False)
    return path


def _mismatches(ours: list[tuple[bytes, float, int]], source: list[tuple[bytes, float, int]]) -> list:
    assert len(ours) == len(source)
    return [(i, ours[i], source[i]) for i in range(len(source)) if ours[i] != source[i]]


def test_vocabulary_is_the_published_one_token_by_token(tokenizer_dir, gemma_270m_gguf):
    source = gguf_vocabulary(gemma_270m_gguf)
    vocab = read_vocabulary(tokenizer_dir, len(source))
    ours = list(zip(vocab.tokens, vocab.scores, vocab.types))
    bad = _mismatches(ours, source)
    assert not bad, f"{len(bad)} tokens differ (id, ours, published), first: {bad[:5]}"
    # The user-defined whitespace runs in particular: raw spaces, USER_DEFINED, the added-token score.
    assert ours[138] == (b"  ", -1000.0, TokenType.USER_DEFINED)
    assert ours[139] == (b"   ", -1000.0, TokenType.USER_DEFINED)


def test_user_defined_pieces_get_raw_spaces_from_either_tokenizer_file(tmp_path):
    """Both sources, whatever score the pieces carry: raw spaces, USER_DEFINED, -1000 (llama.cpp's converter)."""
    folder = fake_gemma_checkpoint(tmp_path / "m")
    vocab = read_vocabulary(folder, 300)
    assert [(vocab.tokens[i], vocab.scores[i], vocab.types[i]) for i in (138, 139)] == [
        (b"  ", -1000.0, TokenType.USER_DEFINED), (b"   ", -1000.0, TokenType.USER_DEFINED)]
    assert vocab.tokens[150] == "\u2581p150".encode()  # normal pieces keep SentencePiece's spelling

    # The same layout as a tokenizer.json (transformers' conversion of a SentencePiece BPE model).
    (folder / "tokenizer.model").unlink()
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<unused{i}>" for i in range(4, 138)] + ["\u2581\u2581", "\u2581\u2581\u2581"]
    pieces += [f"<0x{b:02X}>" for b in range(256)] + [f"\u2581w{i}" for i in range(4)]
    added = [{"id": i, "content": p, "special": i < 138} for i, p in enumerate(pieces[:140])]
    (folder / "tokenizer.json").write_text(json.dumps({
        "added_tokens": added,
        "model": {"type": "BPE", "unk_token": "<unk>", "vocab": {p: i for i, p in enumerate(pieces)}, "merges": []},
    }))
    vocab = read_vocabulary(folder, len(pieces))
    assert vocab.source == "tokenizer.json"
    assert [(vocab.tokens[i], vocab.scores[i], vocab.types[i]) for i in (138, 139)] == [
        (b"  ", -1000.0, TokenType.USER_DEFINED), (b"   ", -1000.0, TokenType.USER_DEFINED)]


def test_converted_file_holds_the_same_vocabulary(converted, gemma_270m_gguf):
    bad = _mismatches(gguf_vocabulary(converted), gguf_vocabulary(gemma_270m_gguf))
    assert not bad, f"{len(bad)} tokens differ (id, converted, published), first: {bad[:5]}"


def test_whitespace_tokenizes_as_sentencepiece_and_the_published_gguf(converted, tokenizer_dir, gemma_270m_gguf):
    import llama_cpp
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    ours = llama_cpp.Llama(str(converted), vocab_only=True, verbose=False)
    published = llama_cpp.Llama(str(gemma_270m_gguf), vocab_only=True, verbose=False)
    try:
        for text in WHITESPACE_CASES:
            got = ours.tokenize(text.encode(), add_bos=False, special=True)
            assert got == published.tokenize(text.encode(), add_bos=False, special=True), text
            if "<start_of_turn>" not in text:  # sentencepiece has no notion of control tokens in text
                assert got == sp.encode(text), text
        # The example, spelled out.
        assert ours.tokenize(b"  two  spaces   three", add_bos=False)[:5] == [138, 13498, 138, 35220, 139]
    finally:
        ours.close()
        published.close()
