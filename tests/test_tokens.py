"""embdist.tokens on the real all-MiniLM-L6-v2 tokenizer and on byte-level BPE tokenizers
built here with the tokenizers library (no hub access)."""
from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from embdist import sources, tokens  # noqa: E402

MINILM_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
TEXTS = ["Hello, the unbelievable Zürich café! 東京 tokenization ##x",
         "embeddings of [unused3] and [MASK] tokens", "naïve   spaces\tand\nnewlines 12345"]


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return sources.packaged_minilm_path()
    except sources.InputError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm_vocab(minilm_dir) -> list[str]:
    """vocab.txt read independently: one piece a line, id = line number."""
    return (minilm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return tokens.load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE (GPT-2/Qwen style) trained on text with multi-byte scripts, so that
    merges produce partial-UTF-8 tokens; two special tokens and one non-special added token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3,
              "สวัสดีครับ ภาษาไทย ขอบคุณ " * 5,  # Thai: 3-byte characters
              "こんにちは世界、東京タワー " * 5,
              "emoji 🎉🎉🙂 party " * 4] * 10
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["<think>"])
    return tok


# ------------------------------------------------------------------------------------ loading

def test_load_json_and_vocab_txt_agree(minilm_dir, minilm, minilm_vocab):
    wp = tokens.load_tokenizer(minilm_dir / "vocab.txt")
    assert isinstance(minilm, Tokenizer) and isinstance(wp, Tokenizer)
    assert tokens.vocab_size(minilm) == tokens.vocab_size(wp) == len(minilm_vocab) == 30522
    for i in (0, 1, 100, 101, 1996, 2000, 29000, 30521):
        assert minilm.id_to_token(i) == wp.id_to_token(i) == minilm_vocab[i]
    for text in TEXTS:
        a = minilm.encode(text)
        ids_json = [i for i, m in zip(a.ids, a.attention_mask) if m]  # tokenizer.json pads
        assert wp.encode(text).ids == ids_json
        assert ids_json[0] == 101 and ids_json[-1] == 102
    assert wp.get_added_tokens_decoder()[101].content == "[CLS]"


def test_load_tokenizer_finds_files(tmp_path, minilm_dir):
    assert tokens.load_tokenizer(tmp_path) is None
    assert tokens.load_tokenizer(tmp_path / "missing") is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert tokens.load_tokenizer(tmp_path / "model.safetensors") is None
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    t = tokens.load_tokenizer(tmp_path / "model.safetensors")  # its folder's vocab.txt
    assert t is not None and t.id_to_token(2000) == "to"
    assert tokens.load_tokenizer(tmp_path).encode("the dog").ids == [101, 1996, 3899, 102]
    shutil.copy(minilm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    t = tokens.load_tokenizer(tmp_path)  # tokenizer.json preferred over vocab.txt
    assert t.padding is not None  # only the shipped tokenizer.json pads


def test_load_tokenizer_corrupt(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokens.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------- MiniLM

def test_minilm_every_token(minilm, minilm_vocab):
    n = len(minilm_vocab)
    ids = np.arange(n + 7)  # 7 padding rows beyond the vocabulary
    infos = tokens.describe_tokens(minilm, ids)
    assert [t.id for t in infos] == ids.tolist()
    unused = {i for i, p in enumerate(minilm_vocab) if re.fullmatch(r"\[unused\d+\]", p)}
    assert len(unused) == 994
    for t in infos:
        if t.id >= n:
            assert t.category == "beyond_vocab" and t.raw is None
            continue
        assert t.string == t.raw == minilm_vocab[t.id]  # WordPiece: the raw piece (##ing)
        if t.id in MINILM_SPECIALS.values():
            assert t.category == "special"
        elif t.id in unused:
            assert t.category == "unused"
        else:
            assert t.category == "normal"
    counts = tokens.category_counts(infos)
    assert counts == {"normal": n - 994 - 5, "special": 5, "byte": 0, "beyond_vocab": 7, "unused": 994, "unknown": 0}
    sub = tokens.describe_tokens(minilm, [1, 2000, 3436])
    assert [t.string for t in sub] == ["[unused0]", "to", minilm_vocab[3436]]


def test_describe_tokens_fast_for_150k_ids(minilm):
    ids = np.arange(151_936) % 30_600  # some beyond the vocabulary, repeated ids
    t0 = time.perf_counter()
    infos = tokens.describe_tokens(minilm, ids)
    assert len(infos) == len(ids)
    assert time.perf_counter() - t0 < 10.0  # about 0.5 s measured


# ------------------------------------------------------------------------ byte-level BPE

def test_bytelevel_categories_against_decode(bpe):
    n = tokens.vocab_size(bpe)
    infos = tokens.describe_tokens(bpe, list(range(n + 5)))
    added = bpe.get_added_tokens_decoder()
    for t in infos:
        if t.id >= n:
            assert t.category == "beyond_vocab"
            continue
        assert t.raw == bpe.id_to_token(t.id)
        decoded = bpe.decode([t.id], skip_special_tokens=False)
        if t.id in added:
            assert t.category == ("special" if added[t.id].special else "normal")
            assert t.string == added[t.id].content
        elif "\ufffd" in decoded:  # the library's own decode: not text on its own
            assert t.category == "byte", t
            assert "\\x" in t.string
        else:
            assert t.category == "normal", t
            assert t.string == decoded
    counts = tokens.category_counts(infos)
    assert counts["special"] == 2 and counts["beyond_vocab"] == 5
    assert counts["byte"] >= 128  # at least the 128 lone bytes 0x80..0xFF
    assert counts["normal"] > 100 and counts["unused"] == 0


def test_bytelevel_strings_keep_the_bytes(bpe):
    # In GPT-2's alphabet the lone byte 0xE0 is "à", 0x0A is "Ċ", a space is "Ġ".
    lone = tokens.describe_tokens(bpe, [bpe.token_to_id("à"), bpe.token_to_id("Ċ"), bpe.token_to_id("Ġ")])
    assert [(t.string, t.category) for t in lone] == [("\\xe0", "byte"), ("\n", "normal"), (" ", "normal")]
    # Token pieces of a Thai word concatenate back to the word's bytes.
    enc = bpe.encode("ภูเขาน้ำ")
    infos = tokens.describe_tokens(bpe, enc.ids)
    assert any(t.category == "byte" for t in infos)  # Thai not in the training text splits inside characters
    raw = b"".join(bytes(tokens._byte_decoder()[c] for c in t.raw) for t in infos)
    assert raw.decode("utf-8") == "ภูเขาน้ำ"
    think = tokens.describe_tokens(bpe, [bpe.token_to_id("<think>")])[0]
    assert (think.string, think.category) == ("<think>", "normal")


def test_byte_fallback_pieces():
    vocab = {"<unk>": 0, "<s>": 1, "▁the": 2, "<0x0A>": 3, "<0xE3>": 4, "a": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>"])
    infos = tokens.describe_tokens(tok, [1, 2, 3, 4, 5, 6])
    assert [t.category for t in infos] == ["special", "normal", "byte", "byte", "normal", "beyond_vocab"]
    assert infos[2].string == "\n" and infos[3].string == "\\xe3"
    assert infos[1].string == tok.decode([2])


# ----------------------------------------------------------------------------- no tokenizer

def test_no_tokenizer_and_id_types(minilm):
    infos = tokens.describe_tokens(None, torch.tensor([5, 151_935]))
    assert [(t.id, t.string, t.category) for t in infos] == [(5, "5", "unknown"), (151_935, "151935", "unknown")]
    a = tokens.describe_tokens(minilm, [1996, 2000])
    assert a == tokens.describe_tokens(minilm, np.array([1996, 2000], dtype=np.int32))
    assert a == tokens.describe_tokens(minilm, torch.tensor([1996, 2000]))
    assert tokens.describe_tokens(minilm, []) == []
    with pytest.raises(ValueError, match=">= 0"):
        tokens.describe_tokens(minilm, [3, -1])
    with pytest.raises(TypeError):
        tokens.describe_tokens(minilm, np.array([1.5]))


def test_token_label(minilm, bpe):
    a, b, c = tokens.describe_tokens(minilm, [2000, 101, 40_000])
    assert tokens.token_label(a) == "2000 'to'"
    assert tokens.token_label(b) == "101 '[CLS]' [special]"
    assert tokens.token_label(c).endswith("[beyond_vocab]")
    assert tokens.token_label(tokens.describe_tokens(None, [7])[0]) == "7"


def test_tables_follow_added_tokens(bpe):
    tok = Tokenizer.from_str(bpe.to_str())  # a copy: the fixture stays unchanged
    n = tokens.vocab_size(tok)
    assert tokens.describe_tokens(tok, [n])[0].category == "beyond_vocab"
    tok.add_special_tokens(["<|new|>"])
    t = tokens.describe_tokens(tok, [n])[0]
    assert (t.string, t.category) == ("<|new|>", "special")
