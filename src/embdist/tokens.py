"""Token ids -> readable strings and a category, for labelling rows of an embedding matrix.

``load_tokenizer`` reads a Hugging Face ``tokenizer.json`` or, failing that, a BERT
``vocab.txt`` (rebuilt as a WordPiece tokenizer with the ``tokenizers`` library).
``describe_tokens`` gives, for each id, a :class:`TokenInfo`:

* ``string`` - what a person wants to read. WordPiece: the raw vocabulary piece (``##ing``).
  Byte-level BPE (GPT-2, Qwen, Llama 3): the UTF-8 text of the token's bytes; bytes that are
  not valid UTF-8 on their own are written ``\\xNN`` (where ``tokenizer.decode`` would print
  U+FFFD and lose them). Other models: ``tokenizer.decode([id])``.
* ``raw`` - the vocabulary piece as stored (``Ġthe``, ``##ing``, ``<0x0A>``); None beyond the vocab.
* ``category``, first match wins:

  ``beyond_vocab``  the tokenizer has no token with this id: padding rows of the matrix
                    (Qwen3-4B: 151,936 rows, 151,669 tokens), never trained;
  ``special``       an added token marked special (``[CLS]``, ``<|im_start|>``);
  ``unused``        BERT's ``[unused*]`` placeholders;
  ``byte``          a token that is not text on its own: a byte-level piece whose bytes are not
                    valid UTF-8 (a lone lead byte, half of a Thai character ...), or a
                    byte-fallback piece ``<0xNN>`` (SentencePiece/Llama 2);
  ``normal``        everything else (non-special added tokens such as Qwen's ``<think>`` too);
  ``unknown``       no tokenizer was given (then ``string`` is ``str(id)``).

Everything vocabulary-wide is computed once per call from ``get_vocab``; describing all
150k ids of a Qwen vocabulary takes well under a second or two.
"""
from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

try:  # optional at import time: embdist's CLI does not need it
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - exercised only without the dependency
    Tokenizer = None  # type: ignore[assignment,misc]

CATEGORIES = ("normal", "special", "byte", "beyond_vocab", "unused", "unknown")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_UNUSED = re.compile(r"\[unused\d+\]\Z")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    string: str
    category: str
    raw: str | None = None


# ----------------------------------------------------------------------------------- loading

def load_tokenizer(model_dir_or_file: str | os.PathLike) -> "Tokenizer | None":
    """The tokenizer of a model, or None when there is none to read.

    Accepts a folder (``tokenizer.json`` preferred, else ``vocab.txt``), one of those files
    directly, or any other file in the folder (e.g. ``model.safetensors``: its folder is used).
    A file that exists but cannot be parsed raises ValueError naming it.
    """
    _require_tokenizers()
    p = Path(model_dir_or_file)
    if p.is_file():
        if p.suffix == ".json":
            return _from_json(p)
        if p.suffix == ".txt":
            return wordpiece_from_vocab(p)
        p = p.parent
    if not p.is_dir():
        return None
    if (p / "tokenizer.json").is_file():
        return _from_json(p / "tokenizer.json")
    if (p / "vocab.txt").is_file():
        return wordpiece_from_vocab(p / "vocab.txt")
    return None


def tokenizer_for(configured: str | os.PathLike | None, tensor_file: str | os.PathLike, n_rows: int,
                  what: str = "model.tokenizer") -> "Tokenizer | None":
    """The tokenizer a run labels its tokens with, read before any work (a run never fails on it
    after its distances were computed): ``model.tokenizer``, else the checkpoint folder of the
    tensor.  A file that cannot be read is a one-line InputError with the fix; a tokenizer that
    knows more ids than the matrix has rows is a warning."""
    import logging

    from embdist.errors import InputError
    from embdist.sources import regular_file

    location = Path(configured) if configured else Path(tensor_file).parent
    fix = (f"fix or replace it, or set {what} to another tokenizer.json / vocab.txt"
           + ("" if configured else f" ({what}=null reads the checkpoint folder)"))
    for candidate in ([location] if location.suffix in (".json", ".txt") else
                      [location / "tokenizer.json", location / "vocab.txt"]):
        if os.path.lexists(candidate):
            regular_file(candidate, "tokenizer file", fix)
            break
    try:
        tok = load_tokenizer(location)
    except ValueError as e:
        raise InputError(f"{e}; {fix}") from None
    if tok is None:
        if configured:
            raise InputError(f"{what}={str(configured)!r} holds no tokenizer.json or vocab.txt; "
                             f"point it at one (or null: the checkpoint folder)")
        return None
    size = vocab_size(tok)
    if size > n_rows:
        logging.getLogger(__name__).warning(
            "the tokenizer knows %s ids but the matrix has %s rows: ids %s..%s have no embedding "
            "(is it the model's own tokenizer? set %s)", f"{size:,}", f"{n_rows:,}", f"{n_rows:,}", f"{size - 1:,}", what)
    return tok


def _from_json(path: Path) -> "Tokenizer":
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise ValueError(f"cannot read {str(path)!r} as a tokenizers tokenizer.json ({e})") from None


def wordpiece_from_vocab(vocab_file: str | os.PathLike, lowercase: bool | None = None) -> "Tokenizer":
    """A BERT WordPiece tokenizer built from ``vocab.txt`` (one piece a line, id = line number).

    ``lowercase`` defaults to ``do_lower_case`` of a ``tokenizer_config.json`` beside the file,
    else True (the uncased BERT family, MiniLM included).
    """
    _require_tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    vocab_file = Path(vocab_file)
    try:
        vocab = models.WordPiece.read_file(str(vocab_file))
    except Exception as e:
        raise ValueError(f"cannot read {str(vocab_file)!r} as a WordPiece vocab.txt ({e})") from None
    if not vocab:
        raise ValueError(f"{str(vocab_file)!r} holds no vocabulary pieces")
    cfg = _tokenizer_config(vocab_file.parent)
    if lowercase is None:
        lowercase = bool(cfg.get("do_lower_case", True))
    unk = "[UNK]" if "[UNK]" in vocab else next(iter(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=cfg.get("strip_accents"), lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([t for t in BERT_SPECIALS if t in vocab])  # keep their vocab ids
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return tok


def _tokenizer_config(folder: Path) -> dict:
    f = folder / "tokenizer_config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def _require_tokenizers() -> None:
    if Tokenizer is None:
        raise ImportError("embdist.tokens needs the 'tokenizers' package: pip install tokenizers")


# ------------------------------------------------------------------------------- description

def vocab_size(tokenizer: "Tokenizer") -> int:
    """Number of ids the tokenizer knows, added tokens included (Qwen3: 151,669)."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def describe_tokens(tokenizer: "Tokenizer | None", ids: Iterable[int]) -> list[TokenInfo]:
    """One :class:`TokenInfo` per id, in the order given (ids: list, numpy array or tensor)."""
    id_list = _as_id_list(ids)
    if tokenizer is None:
        return [TokenInfo(i, str(i), "unknown") for i in id_list]

    pieces, added, kind, byte_fallback = _vocab_table(tokenizer)
    n = len(pieces)

    out: list[TokenInfo] = []
    to_decode: list[int] = []  # positions in `out` whose string comes from tokenizer.decode
    for i in id_list:
        piece = pieces[i] if i < n else None
        if piece is None:
            out.append(TokenInfo(i, "", "beyond_vocab", None))
            continue
        a = added.get(i)
        if a is not None:
            cat = "special" if a.special else ("unused" if _UNUSED.match(piece) else "normal")
            out.append(TokenInfo(i, a.content, cat, piece))
            continue
        if _UNUSED.match(piece):
            out.append(TokenInfo(i, piece, "unused", piece))
            continue
        if kind == "wordpiece":
            out.append(TokenInfo(i, piece, "normal", piece))
        elif kind == "bytelevel":
            b = _bytelevel_bytes(piece)
            if b is None:  # a piece outside the byte alphabet: let the library decode it
                to_decode.append(len(out))
                out.append(TokenInfo(i, "", "normal", piece))
            else:
                try:
                    out.append(TokenInfo(i, b.decode("utf-8"), "normal", piece))
                except UnicodeDecodeError:
                    out.append(TokenInfo(i, b.decode("utf-8", "backslashreplace"), "byte", piece))
        elif byte_fallback and _BYTE_FALLBACK.match(piece):
            b = bytes([int(_BYTE_FALLBACK.match(piece).group(1), 16)])
            out.append(TokenInfo(i, b.decode("utf-8", "backslashreplace"), "byte", piece))
        else:
            to_decode.append(len(out))
            out.append(TokenInfo(i, "", "normal", piece))

    if to_decode:
        texts = tokenizer.decode_batch([[out[k].id] for k in to_decode], skip_special_tokens=False)
        for k, text in zip(to_decode, texts):
            t = out[k]
            # U+FFFD that the piece itself does not hold: the token's bytes were not text alone.
            cat = "byte" if ("\ufffd" in text and "\ufffd" not in t.raw) else t.category
            out[k] = TokenInfo(t.id, text, cat, t.raw)
    return out


def category_counts(infos: Iterable[TokenInfo]) -> dict[str, int]:
    """{category: count} over a description, every category of CATEGORIES present (0 if none)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for t in infos:
        counts[t.category] += 1
    return counts


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    lst = arr.astype(np.int64).tolist()
    if lst and min(lst) < 0:
        raise ValueError(f"token ids must be >= 0, got {min(lst)}")
    return lst


# Vocabulary tables per tokenizer object (weakly held: dropped with the tokenizer), so that
# describing a few ids at a time does not re-read a 150k vocabulary each call. The key checks
# the vocabulary size, so tokens added after a first call are seen.
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocab_table(tokenizer):
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    try:
        hit = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None and hit[0] == size:
        return hit[1]
    table = (_id_to_piece(tokenizer), dict(tokenizer.get_added_tokens_decoder()), *_model_kind(tokenizer))
    try:
        _TABLES[tokenizer] = (size, table)
    except TypeError:
        pass
    return table


def _id_to_piece(tokenizer) -> list[str | None]:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n = max(vocab.values(), default=-1) + 1
    pieces: list[str | None] = [None] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    return pieces


def _model_kind(tokenizer) -> tuple[str, bool]:
    """('wordpiece' | 'bytelevel' | 'other', byte_fallback) from the tokenizer's JSON."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        return "wordpiece", False
    if _mentions_bytelevel(spec.get("decoder")):
        return "bytelevel", False
    return "other", bool(model.get("byte_fallback", False))


def _mentions_bytelevel(node) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_mentions_bytelevel(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_bytelevel(v) for v in node)
    return False


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _bytelevel_bytes(piece: str) -> bytes | None:
    dec = _byte_decoder()
    try:
        return bytes(dec[c] for c in piece)
    except KeyError:
        return None


def token_label(info: TokenInfo, max_chars: int = 16) -> str:
    """Short label for a plot axis: ``id 'string'`` (repr shows spaces and escapes), the
    category in brackets for anything but normal tokens."""
    s = info.string if len(info.string) <= max_chars else info.string[: max_chars - 1] + "…"
    tag = "" if info.category in ("normal", "unknown", "unused") else f" [{info.category}]"
    if info.category == "unknown":
        return str(info.id)
    return f"{info.id} {s!r}{tag}"
