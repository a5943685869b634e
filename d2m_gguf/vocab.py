"""Tokenizer -> GGUF vocabulary metadata, with the same values llama.cpp's converter writes.

Two tokenizer kinds are supported, as in llama.cpp:
- SentencePiece (`tokenizer.model`, or a llama-style `tokenizer.json`) -> `tokenizer.ggml.model = llama`;
- byte-level BPE (`tokenizer.json`) -> `tokenizer.ggml.model = gpt2` plus a pre-tokenizer name.

llama.cpp names BPE pre-tokenizers by hashing the token ids of a probe text, so a
tokenizer it has not seen is refused even when its pre-tokenizer is a known one.
Here the name is read from the structure of `tokenizer.json`'s pre_tokenizer
(PRE_TOKENIZERS below), which recognises any tokenizer built the same way; a
tokenizer that matches nothing can be named with `--pre-tokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import D2MError


def _byte_level(add_prefix_space: bool = False, use_regex: bool = True) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer name and the HF `pre_tokenizer` that implements it."""

    name: str
    hf: dict[str, Any]
    clean_spaces: bool | None = None  # llama.cpp's clean_spaces, when it tells two names apart


_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt2", _byte_level()),
    PreTokenizer("smollm", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level()]}, clean_spaces=False),
    PreTokenizer("starcoder", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level()]}, clean_spaces=True),
    PreTokenizer("llama-bpe", {"type": "Sequence", "pretokenizers": [
        _split(_LLAMA3_REGEX), _byte_level(use_regex=False)]}),
    PreTokenizer("qwen2", {"type": "Sequence", "pretokenizers": [
        _split(_QWEN2_REGEX), _byte_level(use_regex=False)]}),
)


def _signature(pre: dict[str, Any] | None) -> tuple:
    """What makes two HF pre_tokenizers split text the same way (offsets handling ignored)."""
    if not pre:
        return ()
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts:
        kind = p.get("type")
        if kind == "ByteLevel":
            sig.append((kind, bool(p.get("add_prefix_space")), bool(p.get("use_regex", True))))
        elif kind == "Digits":
            sig.append((kind, bool(p.get("individual_digits"))))
        elif kind == "Split":
            pattern = p.get("pattern", {})
            sig.append((kind, pattern.get("Regex"), pattern.get("String"), p.get("behavior"), bool(p.get("invert"))))
        else:
            sig.append((kind, json.dumps(p, sort_keys=True)))
    return tuple(sig)


def pre_tokenizer_by_name(name: str) -> PreTokenizer:
    for pre in PRE_TOKENIZERS:
        if pre.name == name:
            return pre
    raise D2MError(f"unknown pre-tokenizer {name!r} (known: {', '.join(p.name for p in PRE_TOKENIZERS)})")


def detect_pre_tokenizer(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name for this tokenizer.json, or None if none matches."""
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    matches = [p for p in PRE_TOKENIZERS if _signature(p.hf) == sig]
    if len(matches) > 1:
        clean = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        matches = [p for p in matches if p.clean_spaces in (None, clean)]
    return matches[0].name if matches else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise D2MError(f"{path}: cannot read tokenizer file: {e}") from e


def _looks_special(text: str) -> bool:
    """Added tokens that are control tokens in practice even when not flagged special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _add_sentencepiece(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    """tokenizer.model -> llama (SPM) vocabulary, padded to the model's vocab_size."""
    from sentencepiece import SentencePieceProcessor

    T = gguf.TokenType
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(hf_dir / "tokenizer.model"))
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(T.UNUSED)] * n
    for i in range(min(sp.vocab_size(), n)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i)
                       else T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)

    added = hf_dir / "added_tokens.json"
    for text, i in (_read_json(added).items() if added.is_file() else []):
        if i < n:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, int(T.USER_DEFINED)
    config_path = hf_dir / "tokenizer_config.json"
    decoder = _read_json(config_path).get("added_tokens_decoder", {}) if config_path.is_file() else {}
    for key, entry in decoder.items():
        i, text = int(key), entry["content"]
        if i >= n:
            continue
        if entry.get("special") or _looks_special(text):
            types[i] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(T.USER_DEFINED)
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    _write_spm(writer, hf_dir, tokens, scores, types)


def _add_llama_hf(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """A SentencePiece tokenizer saved as tokenizer.json (gguf-py's LlamaHfVocab reads it)."""
    tokens, scores, types = zip(*gguf.LlamaHfVocab(hf_dir).all_tokens())
    _write_spm(writer, hf_dir, list(tokens), list(scores), list(types))


def _write_spm(writer: gguf.GGUFWriter, hf_dir: Path, tokens: list, scores: list[float], types: list[int]) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_bpe(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, pre_tokenizer: str | None) -> None:
    """tokenizer.json (byte-level BPE) -> gpt2 vocabulary with merges and a pre-tokenizer name."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    tok_json = _read_json(path)
    config_path = hf_dir / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.is_file() else {}
    if pre_tokenizer is None:
        pre_tokenizer = detect_pre_tokenizer(tok_json, tok_config)
        if pre_tokenizer is None:
            raise D2MError(
                f"{path}: BPE pre-tokenizer not recognised "
                f"(known: {', '.join(p.name for p in PRE_TOKENIZERS)}); name it with --pre-tokenizer")
    else:
        pre_tokenizer_by_name(pre_tokenizer)

    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise D2MError(f"{path}: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size}")
    by_id = {i: text for text, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()

    T = gguf.TokenType
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        text = by_id[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalised
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids,
                                        skip_special_tokens=False)
            if added[i].special or _looks_special(text):
                types.append(int(T.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
        tokens.append(text)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(writer, quiet=True)


def check_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    """Fail early, in one line, if `hf_dir` has no readable tokenizer or one that does not fit `vocab_size`."""
    hf_dir = Path(hf_dir)
    spm_path, json_path = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    if spm_path.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        try:
            sp.LoadFromFile(str(spm_path))
        except (OSError, RuntimeError) as e:
            raise D2MError(f"{spm_path}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from e
        n = sp.vocab_size()
        path = spm_path
    elif json_path.is_file():
        from tokenizers import Tokenizer

        _read_json(json_path)  # a JSON error names its line
        try:
            vocab = Tokenizer.from_file(str(json_path)).get_vocab(with_added_tokens=True)
        except Exception as e:  # tokenizers raises its own Exception subclass for a malformed file
            raise D2MError(f"{json_path}: not a valid tokenizer ({str(e).splitlines()[0]})") from e
        n = max(vocab.values()) + 1 if vocab else 0
        path = json_path
    else:
        raise D2MError(f"{hf_dir}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    if n == 0:
        raise D2MError(f"{path}: the tokenizer has no tokens")
    if n > vocab_size:
        raise D2MError(f"{path}: the tokenizer has token ids up to {n - 1}, "
                       f"which do not fit the model's vocab_size {vocab_size} (config.json)")


def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int, pre_tokenizer: str | None = None,
              family: str | None = None) -> None:
    """Write the tokenizer of `hf_dir` as GGUF metadata (tokens, types, scores or merges, specials, template)."""
    hf_dir = Path(hf_dir)
    check_tokenizer(hf_dir, vocab_size)
    config_path = hf_dir / "tokenizer_config.json"
    add_prefix_space = _read_json(config_path).get("add_prefix_space") if config_path.is_file() else None
    if family == "gemma3" and (hf_dir / "tokenizer.model").is_file():
        add_prefix_space = False   # Gemma's SentencePiece model adds no prefix space (upstream writes so)
    if add_prefix_space is not None:
        writer.add_add_space_prefix(add_prefix_space)
    if (hf_dir / "tokenizer.model").is_file():
        _add_sentencepiece(writer, hf_dir, vocab_size)
        return
    if not (hf_dir / "tokenizer.json").is_file():
        raise D2MError(f"{hf_dir}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    try:
        _add_llama_hf(writer, hf_dir)
    except (TypeError, FileNotFoundError):  # not a SentencePiece-style tokenizer.json
        _add_bpe(writer, hf_dir, vocab_size, pre_tokenizer)
