"""The Gemma 3 vocabulary for GGUF: pieces, scores, token types, special ids, chat template.

The source of truth is ``tokenizer.model`` (a SentencePiece protobuf, read
here with a small wire-format parser so no protobuf or sentencepiece package is
needed). Fine-tune folders sometimes ship only ``tokenizer.json``; then the
pieces come from there and the scores are rebuilt from SentencePiece BPE's
convention (score falls by one per merge rank, i.e. per id). Added tokens from
``tokenizer_config.json`` / ``tokenizer.json`` are applied on top, as
llama.cpp's converter does, and Gemma's turn markers are always CONTROL.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ConversionError
from .source import read_json_object

TokenType = gguf.TokenType

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"

# SentencePiece writes a space as U+2581 in every piece. llama.cpp matches
# USER_DEFINED pieces against the raw text, before that escaping, so they are
# stored with real spaces and the added-token score (Gemma's whitespace runs,
# ids 138, 139, ...), as llama.cpp's converter and the published GGUFs store
# them, whether or not tokenizer_config.json lists them; other pieces keep U+2581.
ESCAPED_SPACE = "\u2581".encode("utf-8")

# Score llama.cpp's converter gives added tokens and padding entries.
ADDED_TOKEN_SCORE = -1000.0

# Tokens that must be CONTROL whatever the tokenizer files say: if they were
# NORMAL or USER_DEFINED, llama.cpp would split or print them as text and
# every chat prompt would tokenize wrongly.
GEMMA_CONTROL_TOKENS = frozenset({
    "<pad>",            # id 0
    "<eos>",            # id 1
    "<bos>",            # id 2
    "<unk>",            # id 3
    "<mask>",           # id 4
    "<start_of_turn>",  # id 105: opens a chat turn
    "<end_of_turn>",    # id 106: closes a turn; the -it models' end of generation
})

# Spellings that are special even when a tokenizer_config marks them "special": false
# (llama.cpp's converter makes the same call for Gemma's unused slots).
def looks_special(text: str) -> bool:
    return text in GEMMA_CONTROL_TOKENS or (text.startswith("<unused") and text.endswith(">")) or (
        text.startswith("<|") and text.endswith("|>")
    )


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    source: str  # file the pieces came from

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, text: str) -> int | None:
        raw = text.encode("utf-8")
        try:
            return self.tokens.index(raw)
        except ValueError:
            return None


# --- SentencePiece protobuf (ModelProto) -------------------------------------
# ModelProto: field 1 = repeated SentencePiece { 1: piece (string), 2: score (float), 3: type (enum) }.
# Other fields (trainer/normalizer specs) are skipped by wire type.

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, pos: int = 0, end: int | None = None):
    """Yield (field number, wire type, value) where value is int, float bytes or a (start, end) span."""
    end = len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _WIRE_I64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _WIRE_LEN:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == _WIRE_I32:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError("field runs past the end of the message")
        yield number, wire, value


def read_sentencepiece(path: Path) -> list[tuple[bytes, float, int]]:
    """(piece, score, type) for every piece of a SentencePiece ``tokenizer.model``."""
    buf = path.read_bytes()
    pieces = []
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == _WIRE_LEN:
                pieces.append(_piece(buf, *value))
    except (ValueError, struct.error) as exc:
        raise ConversionError(f"{path}: not a SentencePiece model ({exc}); fetch tokenizer.model again") from exc
    if not pieces:
        raise ConversionError(f"{path}: holds no SentencePiece pieces; fetch tokenizer.model again")
    return pieces


def _piece(buf: bytes, start: int, end: int) -> tuple[bytes, float, int]:
    piece, score, kind = b"", 0.0, int(TokenType.NORMAL)
    pos = start
    while pos < end:
        key = buf[pos]
        if key == 0x0A and buf[pos + 1] < 0x80:  # fast path: field 1 (piece), one-byte length
            n = buf[pos + 1]
            piece, pos = buf[pos + 2:pos + 2 + n], pos + 2 + n
        elif key == 0x15:  # field 2 (score), fixed32 float
            (score,), pos = struct.unpack_from("<f", buf, pos + 1), pos + 5
        elif key == 0x18 and buf[pos + 1] < 0x80:  # field 3 (type), one-byte varint
            kind, pos = buf[pos + 1], pos + 2
        else:  # anything else: the general decoder
            for n, w, v in _fields(buf, pos, end):
                if n == 1 and w == _WIRE_LEN:
                    piece = buf[v[0]:v[1]]
                elif n == 2 and w == _WIRE_I32:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and w == _WIRE_VARINT:
                    kind = v
            break
    return piece, score, kind


# --- tokenizer.json fallback -------------------------------------------------


def _pieces_from_tokenizer_json(path: Path) -> list[tuple[bytes, float, int]]:
    """Rebuild SentencePiece pieces from a tokenizer.json converted from one.

    A SentencePiece BPE vocabulary is laid out as: control and user-defined
    pieces, the 256 byte pieces, then merged pieces in merge order (scores
    0, -1, -2, ...). tokenizer.json keeps the order but not the scores or
    types, so both are recovered from the layout.
    """
    data = read_json_object(path)
    model = data.get("model") or {}
    kind = model.get("type")
    added = {t["id"]: bool(t.get("special")) for t in data.get("added_tokens", [])}
    unk = model.get("unk_token")
    if kind == "Unigram":
        entries = [(p, float(s)) for p, s in model["vocab"]]
    elif kind == "BPE":
        by_id = sorted((i, p) for p, i in model["vocab"].items())
        if [i for i, _ in by_id] != list(range(len(by_id))):
            raise ConversionError(f"{path}: BPE vocabulary ids are not contiguous from 0")
        entries = [(p, 0.0) for _, p in by_id]
    else:
        raise ConversionError(f"{path}: tokenizer model type {kind!r}; expected a SentencePiece-style BPE or Unigram")

    is_byte = [len(p) == 6 and p.startswith("<0x") and p.endswith(">") for p, _ in entries]
    first_merged = max((i for i, b in enumerate(is_byte) if b), default=-1) + 1
    pieces = []
    rank = 0  # merged pieces' scores count down over NORMAL pieces only
    for i, (piece, score) in enumerate(entries):
        if piece == unk:
            pieces.append((piece.encode("utf-8"), ADDED_TOKEN_SCORE, int(TokenType.UNKNOWN)))
        elif added.get(i):
            pieces.append((piece.encode("utf-8"), ADDED_TOKEN_SCORE, int(TokenType.CONTROL)))
        elif is_byte[i]:
            pieces.append((piece.encode("utf-8"), 0.0, int(TokenType.BYTE)))
        elif i < first_merged or i in added:
            pieces.append((piece.encode("utf-8"), ADDED_TOKEN_SCORE, int(TokenType.USER_DEFINED)))
        else:
            pieces.append((piece.encode("utf-8"), -float(rank) if kind == "BPE" else score, int(TokenType.NORMAL)))
            rank += 1
    return pieces


# --- assembling the vocabulary -----------------------------------------------


def read_vocabulary(folder: Path, n_vocab: int) -> Vocabulary:
    """Pieces padded (or cut) to ``n_vocab``, with added and control tokens applied."""
    model_file, json_file = folder / TOKENIZER_MODEL, folder / TOKENIZER_JSON
    if model_file.is_file():
        pieces, source = read_sentencepiece(model_file), TOKENIZER_MODEL
    elif json_file.is_file():
        pieces, source = _pieces_from_tokenizer_json(json_file), TOKENIZER_JSON
    else:
        raise ConversionError(
            f"{folder}: no tokenizer: expected {TOKENIZER_MODEL} (SentencePiece) or {TOKENIZER_JSON}. "
            "Fine-tunes often omit them; copy tokenizer.model and tokenizer_config.json from the base "
            "model (e.g. google/gemma-3-4b-it) into this folder"
        )
    # Entries past the tokenizer (the 4B's 64 image-padding rows) become unused placeholders.
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [ADDED_TOKEN_SCORE] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i, (piece, score, kind) in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i], types[i] = piece, score, kind

    for token_id, text, special in _added_tokens(folder):
        if not 0 <= token_id < n_vocab:
            continue  # out of the model's vocabulary: llama.cpp's converter drops these too
        types[token_id] = int(TokenType.CONTROL if special or looks_special(text) else TokenType.USER_DEFINED)
        tokens[token_id] = text.encode("utf-8")
        scores[token_id] = ADDED_TOKEN_SCORE

    for i, raw in enumerate(tokens[:max(n_vocab, 0)]):
        if raw.decode("utf-8", "replace") in GEMMA_CONTROL_TOKENS:
            types[i] = int(TokenType.CONTROL)
        elif types[i] == TokenType.USER_DEFINED:
            tokens[i] = raw.replace(ESCAPED_SPACE, b" ")
            scores[i] = ADDED_TOKEN_SCORE
    return Vocabulary(tokens, scores, types, source)


def _added_tokens(folder: Path) -> list[tuple[int, str, bool]]:
    """(id, text, special) from added_tokens.json, tokenizer.json and tokenizer_config.json, later wins."""
    found: list[tuple[int, str, bool]] = []
    added = folder / ADDED_TOKENS
    if added.is_file():
        found += [(int(i), t, False) for t, i in read_json_object(added).items()]
    tok_json = folder / TOKENIZER_JSON
    if tok_json.is_file():
        found += [(int(t["id"]), t["content"], bool(t.get("special"))) for t in read_json_object(tok_json).get("added_tokens", [])]
    config = folder / TOKENIZER_CONFIG
    if config.is_file():
        decoder = read_json_object(config).get("added_tokens_decoder", {})
        found += [(int(i), t["content"], bool(t.get("special"))) for i, t in decoder.items()]
    return found


def special_vocab(folder: Path, vocab: Vocabulary) -> gguf.SpecialVocab:
    """Special ids, add_bos/add_eos and the chat template, read the way llama.cpp's converter reads them.

    gguf resolves ``bos_token`` & co. through tokenizer.json; a folder with only
    tokenizer.model gets them from tokenizer_config.json's spellings looked up
    in the vocabulary, and the unknown token from the pieces' own types.
    """
    # gguf logs heuristics about BOS/SEP templates as warnings; the values it settles on are what we want.
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab))
    finally:
        log.setLevel(level)
    config_path = folder / TOKENIZER_CONFIG
    config = read_json_object(config_path) if config_path.is_file() else {}
    for kind in ("bos", "eos", "unk", "pad"):
        if kind in special.special_token_ids:
            continue
        text = config.get(f"{kind}_token")
        text = text.get("content") if isinstance(text, dict) else text
        token_id = vocab.id_of(text) if isinstance(text, str) else None
        if token_id is None and kind == "unk" and TokenType.UNKNOWN in vocab.types:
            token_id = vocab.types.index(TokenType.UNKNOWN)
        if token_id is not None:
            special.special_token_ids[kind] = token_id
    return special
