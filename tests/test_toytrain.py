"""Tests for embdist.toytrain: the bundled bf16 toy training run (about 10 s in all)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from embdist import store
from embdist import toytrain
from embdist.toytrain import (
    HIDDEN_DIM,
    HISTORY_KEY,
    VOCAB_SIZE,
    count_distinct_rows,
    load_corpus,
    train_snapshots,
)

STEPS = 50


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toytrain")


@pytest.fixture(scope="module")
def run_a(run_dir) -> Path:
    return train_snapshots(run_dir / "a" / "embedding_evolution.safetensors", steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def loaded_a(run_a):
    return _read(run_a)


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return load_corpus()[0]


def test_file_layout(run_a, loaded_a, corpus):
    tensors, meta = loaded_a
    assert run_a.name == "embedding_evolution.safetensors" and run_a.is_file()
    assert set(tensors) == {HISTORY_KEY}
    h = tensors[HISTORY_KEY]
    assert h.shape == (STEPS + 1, VOCAB_SIZE, HIDDEN_DIM) == (51, 128, 64)
    assert h.dtype == torch.bfloat16
    assert torch.isfinite(h.float()).all()
    assert meta["steps"] == str(STEPS) and meta["seed"] == "0"
    assert meta["text"] == toytrain.default_text_path().name
    assert meta["vocab_size"] == "128" and meta["hidden_dim"] == "64"
    for key in ("lr", "batch_size", "context", "layers", "heads", "init_std", "weight_decay",
                "torch_threads", "text_sha256"):
        assert meta[key], key
    assert float(meta["lr"]) == toytrain.DEFAULT_LR
    assert int(meta["batch_size"]) == toytrain.DEFAULT_BATCH_SIZE
    absent = [b for b in range(VOCAB_SIZE) if b not in set(corpus)]
    assert meta["absent_bytes"] == ",".join(map(str, absent))


def test_it_really_trains(loaded_a):
    _, meta = loaded_a
    first, last = float(meta["loss_first10_mean"]), float(meta["loss_last10_mean"])
    # ln(128) = 4.85 is a uniform guess; 50 steps must already do clearly better than the start
    assert first > 3.5
    assert last < first - 0.5


def test_step0_all_rows_identical_then_they_move(loaded_a):
    h = loaded_a[0][HISTORY_KEY]
    assert (h[0] == h[0, 0]).all()
    assert count_distinct_rows(h[0]) == [1]
    assert h[0, 0].float().norm() > 0.05  # one real random vector, not zeros
    assert not torch.equal(h[0], h[-1])
    # every step is recorded: consecutive snapshots differ (each step updates the rows)
    assert all(not torch.equal(h[s], h[s + 1]) for s in range(STEPS))


def test_absent_bytes_stay_together_frequent_bytes_separate(loaded_a, corpus):
    h = loaded_a[0][HISTORY_KEY]
    counts = Counter(corpus)
    absent = [b for b in range(VOCAB_SIZE) if b not in counts]
    assert 40 <= len(absent) <= 70  # control bytes and some punctuation; the corpus is ASCII
    for step in (1, STEPS // 2, STEPS):
        rows = h[step, absent]
        assert (rows == rows[0]).all(), f"absent bytes split at step {step}"
    frequent = [b for b, _ in counts.most_common(20)]
    final = h[-1]
    group = final[absent[0]]
    rows = final[frequent]
    assert count_distinct_rows(rows) == [len(frequent)]
    assert not (rows == group).all(dim=1).any()
    # the absent group moved away from the shared start too (the softmax pushes it)
    assert not torch.equal(group, h[0, 0])
    # groups of identical tokens: 1 at step 0, then (present bytes) + (one absent group)
    per_step = count_distinct_rows(h)
    assert per_step[0] == 1
    assert per_step[-1] == len(counts) + 1


def test_same_seed_bit_identical_other_seed_differs(run_a, run_dir):
    again = train_snapshots(run_dir / "b" / "hist.safetensors", steps=STEPS, seed=0)
    assert again.read_bytes() == run_a.read_bytes()
    other = train_snapshots(run_dir / "c" / "hist.safetensors", steps=STEPS, seed=1)
    assert other.read_bytes() != run_a.read_bytes()
    t_a, t_o = _read(run_a)[0][HISTORY_KEY], _read(other)[0][HISTORY_KEY]
    assert not torch.equal(t_a[0], t_o[0])


def test_no_temp_file_left(run_a):
    assert sorted(p.name for p in run_a.parent.iterdir()) == [run_a.name]


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    out = tmp_path / "hist.safetensors"
    out.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store.os, "fsync", boom)  # fails after the temporary holds the data
    with pytest.raises(RuntimeError, match="disk full"):
        train_snapshots(out, steps=2, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.safetensors"]
    assert out.read_bytes() == b"old"


def test_directory_out_path_and_cli(tmp_path, capsys):
    assert toytrain.main([str(tmp_path), "--steps", "3", "--seed", "5", "--no-progress"]) == 0
    out = tmp_path / toytrain.DEFAULT_FILENAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    tensors, meta = _read(out)
    assert tensors[HISTORY_KEY].shape == (4, VOCAB_SIZE, HIDDEN_DIM)
    assert meta["seed"] == "5" and meta["steps"] == "3"
    printed = capsys.readouterr().out
    assert "step 0: 1," in printed and "distinct embedding rows" in printed


def test_zero_steps_is_only_the_initial_matrix(tmp_path):
    out = train_snapshots(tmp_path / "h.safetensors", steps=0, seed=3)
    h = _read(out)[0][HISTORY_KEY]
    assert h.shape == (1, VOCAB_SIZE, HIDDEN_DIM)
    assert count_distinct_rows(h) == [1]


def test_threads_restored(tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:
        torch.set_num_threads(other)
        out = train_snapshots(tmp_path / "h.safetensors", steps=1, threads=3)
        assert torch.get_num_threads() == other
        assert _read(out)[1]["torch_threads"] == "3"
    finally:
        torch.set_num_threads(before)


def test_weights_and_optimizer_state_are_bf16(tmp_path, monkeypatch):
    seen: list[tuple[torch.dtype, ...]] = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            out = super().step(closure)
            params = [p for g in self.param_groups for p in g["params"]]
            seen.append(tuple({p.dtype for p in params}))
            seen.append(tuple({v.dtype for p in params for v in self.state[p].values()
                               if torch.is_tensor(v) and v.dim() > 0}))
            return out

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    train_snapshots(tmp_path / "h.safetensors", steps=2, seed=0)
    assert seen and all(dtypes == (torch.bfloat16,) for dtypes in seen)


def test_count_distinct_rows():
    x = torch.zeros(2, 4, 3, dtype=torch.bfloat16)
    x[0, 1, 0] = -0.0  # numerically equal to +0.0
    x[1, 1, 0] = 1.0
    x[1, 2, 2] = 1.0
    x[1, 3, 2] = 1.0  # rows 2 and 3 equal
    assert count_distinct_rows(x) == [1, 3]
    assert count_distinct_rows(x[1]) == [3]
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    one_ulp = one.nextafter(torch.tensor(2.0, dtype=torch.bfloat16))
    assert float(one_ulp) == 1.0 + 2.0**-7
    y = torch.ones(2, 3, dtype=torch.bfloat16)
    y[1, 0] = one_ulp  # one bf16 step apart is distinct
    assert count_distinct_rows(y) == [2]


def test_bundled_corpus_header_and_ascii(tmp_path):
    path = toytrain.default_text_path()
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# Source:") and "ublic domain" in first
    body, name = load_corpus()
    assert name == path.name
    assert len(body) > 20_000
    assert not body.startswith(b"#") and b"Public domain" not in body
    assert max(body) < 128
    assert b"We hold these truths to be self-evident" in body

    bad = tmp_path / "utf8.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("utf-8") * 20)
    with pytest.raises(ValueError, match="not ASCII"):
        load_corpus(bad)
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"# header (only a leading one is dropped)\n\nabc abc abc\n" * 3)
    assert load_corpus(plain)[0].startswith(b"abc abc abc\n#")


def test_custom_text_changes_absent_bytes(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_bytes(b"abcabcabd " * 200)
    out = train_snapshots(tmp_path / "h.safetensors", steps=5, seed=0, text_path=text,
                          batch_size=4, context=16)
    tensors, meta = _read(out)
    h = tensors[HISTORY_KEY]
    assert meta["text"] == "tiny.txt" and meta["context"] == "16" and meta["batch_size"] == "4"
    present = sorted(set(b"abcd "))
    absent = [b for b in range(VOCAB_SIZE) if b not in present]
    assert meta["absent_bytes"] == ",".join(map(str, absent))
    assert (h[-1, absent] == h[-1, absent[0]]).all()
    assert count_distinct_rows(h[-1]) == [len(present) + 1]
