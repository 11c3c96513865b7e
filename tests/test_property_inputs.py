"""Property test: whatever bytes, index files or config values a user hands over, the loaders
and validators answer with a clean result or the project's user error (InputError), never
another exception (a library's error, a Rust panic, a TypeError, a hang)."""
import json
import math
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save

from embdist import config, sources
from embdist.sources import InputError

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
GOOD = save({"model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3).to(torch.bfloat16)})
ST_DTYPES = ["BF16", "F16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "XX", ""]


def _clean_or_input_error(fn, check):
    try:
        out = fn()
    except InputError as e:
        assert str(e) and "\n" not in str(e), repr(e)   # one line
        return
    check(out)


def _matrix_ok(m):
    assert m.tensor.ndim == 2 and m.tensor.shape[0] >= 2 and m.tensor.shape[1] >= 1
    assert m.tensor.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _history_ok(h):
    assert h.ndim == 3 and h.shape[0] >= 1 and h.shape[1] >= 2 and h.shape[2] >= 1
    assert h.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _header_file(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


ints = st.one_of(st.integers(-3, 12), st.integers(-(2**63), 2**64), st.just(2**40))
entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(ST_DTYPES), st.integers(), st.none()),
    "shape": st.one_of(st.lists(ints, max_size=4), st.text(max_size=3), st.none()),
    "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), st.none()),
})
headers = st.dictionaries(st.sampled_from(["model.embed_tokens.weight", "embedding_history", "__metadata__", "x"]),
                          st.one_of(entry, st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
                          max_size=3)


@SETTINGS
@given(header=headers, data=st.binary(max_size=200), length=st.one_of(st.none(), ints))
def test_random_safetensors_headers(header, data, length):
    raw = _header_file(json.dumps(header).encode(), data, None if length is None else max(0, min(length, 2**64 - 1)))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        p.write_bytes(raw)
        _clean_or_input_error(lambda: sources.load_matrix(p), _matrix_ok)
        _clean_or_input_error(lambda: sources.load_matrix(p, "x"), _matrix_ok)
        _clean_or_input_error(lambda: sources.load_history(p), _history_ok)


SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1}


@SETTINGS
@given(dtype=st.sampled_from(sorted(SIZES)), shape=st.lists(st.integers(0, 4), max_size=4),
       name=st.sampled_from(["model.embed_tokens.weight", "embedding_history"]), fill=st.integers(0, 255))
def test_well_formed_files_of_any_dtype_and_shape(dtype, shape, name, fill):
    """Headers that safetensors itself accepts: every dtype and shape, including 0 rows, 1 row,
    0 columns, 0 steps, integer and bool tensors."""
    n = SIZES[dtype] * math.prod(shape)
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, n]}}).encode()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        p.write_bytes(_header_file(header, bytes([fill if dtype != "BOOL" else fill & 1]) * n))
        _clean_or_input_error(lambda: sources.load_matrix(p), _matrix_ok)
        _clean_or_input_error(lambda: sources.load_history(p), _history_ok)


@SETTINGS
@given(cut=st.integers(0, len(GOOD)), flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=6))
def test_truncated_and_bit_flipped_files(cut, flips):
    raw = bytearray(GOOD)
    for i, b in flips:
        raw[i] = b
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        p.write_bytes(bytes(raw[:cut]) if cut < len(GOOD) else bytes(raw))
        _clean_or_input_error(lambda: sources.load_matrix(p), _matrix_ok)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)
shard_names = st.one_of(st.sampled_from(["shard.safetensors", "missing.safetensors", "sub", "../outside.safetensors",
                                         "/etc/passwd", "", "loop.safetensors", "sub/../shard.safetensors",
                                         "link-out.safetensors", "nul\0.safetensors"]),
                        st.text(max_size=12), st.integers(), st.none())
weight_maps = st.dictionaries(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "other"]), shard_names, max_size=3)
index_docs = st.one_of(
    st.builds(lambda wm, extra: json.dumps({"metadata": extra, "weight_map": wm}).encode(), weight_maps, json_values),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.binary(max_size=40),
)


@SETTINGS
@given(doc=index_docs, tensor=st.sampled_from([None, "model.embed_tokens.weight", "other"]))
def test_random_index_files(doc, tensor):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "ckpt"
        folder.mkdir()
        (folder / "shard.safetensors").write_bytes(GOOD)
        (folder / "sub").mkdir()
        (folder / "loop.safetensors").symlink_to("loop.safetensors")
        (root / "outside.safetensors").write_bytes(GOOD)
        (folder / "link-out.safetensors").symlink_to(root / "outside.safetensors")
        (folder / sources.INDEX_FILE).write_bytes(doc)
        _clean_or_input_error(lambda: sources.load_matrix(folder, tensor), _matrix_ok)
        # a clean result never comes from outside the checkpoint folder
        try:
            m = sources.load_matrix(folder, tensor)
        except InputError:
            return
        assert m.path.resolve().is_relative_to(folder.resolve())


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, -1.0]))


@SETTINGS
@given(lat=st.tuples(floats, floats), lon=st.tuples(floats, floats), r=st.tuples(floats, floats),
       mem=st.one_of(st.none(), floats), basis=st.tuples(*[st.integers(-5, 5)] * 3),
       k=st.integers(-2, 20), radii=st.lists(floats, max_size=9), bins=st.integers(-1, 1 << 25),
       hist_max=st.one_of(st.none(), floats), near=st.one_of(st.none(), st.integers(-2, 70)),
       steps=st.one_of(st.none(), st.integers(-2, 3)), vocab_size=st.one_of(st.none(), st.integers(-2, 3)),
       tokenizer=st.one_of(st.none(), st.sampled_from(["", "/nonexistent/tokenizer.json", "."])),
       device=st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:x", "mps", "tpu", ""]),
       shard=st.tuples(st.integers(-2, 4), st.integers(-2, 4)))
def test_random_config_values(lat, lon, r, mem, basis, k, radii, bins, hist_max, near, steps, vocab_size, tokenizer,
                              device, shard):
    def bbox():
        b = config.BBoxConfig(lat[0], lat[1], lon[0], lon[1], r[0], r[1])
        for v in (b.lat_min, b.lat_max, b.lon_min, b.lon_max, b.r_min, b.r_max):
            assert not math.isnan(v)
        assert -90 <= b.lat_min <= b.lat_max <= 90 and -180 <= b.lon_min <= b.lon_max <= 180
        assert 0 <= b.r_min <= b.r_max and math.isfinite(b.r_min)
        return b

    def task():
        t = config.TaskConfig(device=device, memory_limit_gb=mem)
        assert t.memory_limit_gb is None or (math.isfinite(t.memory_limit_gb) and t.memory_limit_gb > 0)
        return t

    def vocab():
        v = config.VocabConfig(k=k, radii=radii, bins=bins, hist_max=hist_max, near_steps=near)
        assert all(math.isfinite(x) and x >= 0 for x in v.radii) and v.k >= 1
        return v

    for build in (bbox, task, vocab,
                  lambda: config.BasisConfig(*basis),
                  lambda: config.ModelConfig(tokenizer=tokenizer),
                  lambda: config.HistoryConfig(expected_steps=steps, vocab_size=vocab_size),
                  lambda: config.ShardConfig(index=shard[0], count=shard[1])):
        _clean_or_input_error(build, lambda out: None)
