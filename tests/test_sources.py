"""sources: real safetensors files and Hugging Face folders, one tensor read, dtype kept."""
import json

import pytest
import torch
from safetensors.torch import save_file

from embdist import sources


def test_picks_lm_head_then_tied_names(tmp_path):
    a, b = torch.randn(7, 3).to(torch.bfloat16), torch.randn(7, 3).to(torch.bfloat16)
    save_file({"lm_head.weight": a, "model.embed_tokens.weight": b}, str(tmp_path / "both.safetensors"))
    save_file({"model.embed_tokens.weight": b}, str(tmp_path / "tied.safetensors"))
    m = sources.load_matrix(tmp_path / "both.safetensors")
    assert m.name == "lm_head.weight" and torch.equal(m.tensor, a) and m.tensor.dtype == torch.bfloat16
    m = sources.load_matrix(tmp_path / "tied.safetensors")
    assert m.name == "model.embed_tokens.weight" and torch.equal(m.tensor, b)


def test_sharded_folder_reads_the_right_shard(tmp_path):
    emb = torch.randn(11, 4)
    save_file({"model.embed_tokens.weight": emb}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.0.w": torch.randn(2, 2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.w": "model-00002-of-00002.safetensors"}}))
    m = sources.load_matrix(tmp_path)
    assert torch.equal(m.tensor, emb) and m.path.name == "model-00001-of-00002.safetensors"


def test_packaged_minilm_is_real():
    m = sources.load_matrix(sources.packaged_minilm_path())
    assert m.name == "embeddings.word_embeddings.weight"
    assert tuple(m.tensor.shape) == (30522, 384) and m.tensor.dtype == torch.float32


def test_errors_name_the_value(tmp_path):
    with pytest.raises(sources.InputError, match="does not exist"):
        sources.load_matrix(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(2, 2, 2)}, str(tmp_path / "cube.safetensors"))
    with pytest.raises(sources.InputError, match="it holds: x"):
        sources.load_matrix(tmp_path / "cube.safetensors", "y")
    with pytest.raises(sources.InputError, match="must be 2-D"):
        sources.load_matrix(tmp_path / "cube.safetensors", "x")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(sources.InputError, match="pickle"):
        sources.load_matrix(tmp_path / "model.bin")
    good = tmp_path / "cube.safetensors"
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:20])
    with pytest.raises(sources.InputError, match="truncated"):
        sources.load_matrix(tmp_path / "cut.safetensors")
    with pytest.raises(sources.InputError, match="3-D"):
        save_file({"embedding_history": torch.zeros(2, 2)}, str(tmp_path / "flat.safetensors"))
        sources.load_history(tmp_path / "flat.safetensors")
