"""The safetensors file format, read and written with NumPy alone (the `safetensors` package when installed).

Layout of a file (https://github.com/huggingface/safetensors, SPEC.md section "Checkpoints"):

    [8 bytes: N, unsigned little-endian]  [N bytes: JSON header, UTF-8, may end in spaces]  [data]

The header maps each tensor name to {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
(byte offsets into the data block) and may hold "__metadata__": {str: str}. Tensors are C-order,
little-endian, and together cover the data block exactly: no holes, no overlaps.

NumPy has no bfloat16: BF16 tensors are always decoded here (exactly, to float32, by shifting the
16 stored bits into the high half of a float32) and encoded here (round to nearest, ties to even),
because `safetensors.numpy` refuses them. Every file's header is parsed and validated by this
module, whichever implementation then reads the tensor bytes, so errors read the same either way.
Only regular files are read (a FIFO would block, a directory or device is refused by name).
Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAX_HEADER_BYTES = 100_000_000  # the safetensors package refuses larger headers too
HEADER_ALIGNMENT = 8  # writers pad the header with spaces to a multiple of 8 bytes

# File dtype code -> NumPy dtype of the stored bytes (BF16 is read as its raw uint16 bits).
STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODE_OF_NUMPY = {np.dtype(dt).newbyteorder("<"): code for code, dt in STORED_DTYPES.items() if code != "BF16"}
# Names accepted for `storage` in write_safetensors -> file dtype code.
FLOAT_STORAGE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
IMPLEMENTATIONS = ("auto", "package", "builtin")


class SafetensorsError(ValueError):
    """A safetensors file is unreadable, corrupt, or a tensor cannot be stored."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: file dtype code, shape, and [begin, end) byte range in the data block."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed and validated header: its tensors (in file order), metadata, and where data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def package_available() -> bool:
    """True when the `safetensors` package is importable."""
    return importlib.util.find_spec("safetensors") is not None


def _use_package(implementation: str) -> bool:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "package" and not package_available():
        raise ImportError("implementation='package' needs the safetensors package (pip install safetensors)")
    return implementation == "package" or (implementation == "auto" and package_available())


# ---------------------------------------------------------------- bfloat16


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    """uint16 [...] -> float32 [...]: bfloat16 bit patterns to their exact float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 or float64 [...] -> uint16 [...]: the bfloat16 nearest to x, ties to even.

    NaN stays NaN (quiet bit set), overflow gives +-inf. float64 input is rounded once, correctly:
    it is first narrowed to float32 with round-to-odd (enough extra bits that the second rounding
    cannot create a false tie). PyTorch narrows float64 -> float32 -> bfloat16 with two
    round-to-nearest steps, so it can differ by one unit in the last place on rare near-ties.
    """
    if x.dtype == np.float64:
        x = _float32_round_to_odd(x)
    elif x.dtype != np.float32:
        raise TypeError(f"encode_bfloat16 needs float32 or float64, got {x.dtype}")
    bits = x.astype(np.float32, order="C", copy=False).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | np.uint32(0x0040)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def _float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 [...] -> float32 [...]: truncate toward zero, then set the last bit if anything was lost."""
    with np.errstate(over="ignore"):
        nearest = x.astype(np.float32)
    overshot = np.abs(nearest.astype(np.float64)) > np.abs(x)
    truncated = np.where(overshot, np.nextafter(nearest, np.float32(0)), nearest)
    inexact = (truncated.astype(np.float64) != x) & ~np.isnan(x)
    bits = truncated.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)


def storage_max(storage: str) -> float:
    """The largest finite value of a float storage name of FLOAT_STORAGE ("float16": 65504, "bfloat16":
    (2 - 2^-7) 2^127 = 3.39e38, "float32": 3.40e38, "float64": 1.80e308)."""
    if storage == "bfloat16":
        return float(decode_bfloat16(np.array(0x7F7F, dtype=np.uint16)))
    return float(np.finfo(storage).max)


def rounds_to_inf(array: np.ndarray, storage: str) -> bool:
    """Whether a finite element of a float array [...] becomes +-inf when stored as storage (a name of
    FLOAT_STORAGE), rounded to nearest as the writers round. Rounding is monotone, so the largest
    finite magnitude decides; NaN and +-inf elements are ignored (they are stored as they are)."""
    peak = np.abs(array).max(initial=0)
    if not np.isfinite(peak):
        peak = np.abs(array[np.isfinite(array)]).max(initial=0)
    peak = np.array([peak], dtype=np.promote_types(array.dtype, np.float32))
    with np.errstate(over="ignore"):  # the overflow is the answer
        stored = decode_bfloat16(encode_bfloat16(peak)) if storage == "bfloat16" else peak.astype(storage)
    return bool(np.isinf(stored[0]))


# ---------------------------------------------------------------- header


def open_regular_file(path: str | os.PathLike, error: type[Exception] = SafetensorsError) -> BinaryIO:
    """Open path for reading bytes; raise `error` naming it unless it is a regular file (or a link to one).

    The check is made on the opened descriptor, opened without blocking: a FIFO would otherwise hang
    the reader, and a directory or device is no file to parse. A missing path raises FileNotFoundError.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise error(f"{path}: expected a regular file, found {kind}")
        return os.fdopen(fd, "rb")  # O_NONBLOCK does not affect reads of regular files
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: str | os.PathLike, error: type[Exception]) -> object:
    """The JSON value in a regular UTF-8 file (`open_regular_file`); `error` naming the file otherwise."""
    with open_regular_file(path, error) as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise error(f"{path}: not valid JSON ({exc})") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise SafetensorsError(f"duplicate key {key!r} in the header")
        seen[key] = value
    return seen


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets; "
                               f"got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in STORED_DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {sorted(STORED_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                               f"got {offsets!r}")
    expected = math.prod(shape) * STORED_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(f"tensor {name!r}: {dtype} shape {shape} needs {expected} bytes, "
                               f"data_offsets {offsets} hold {offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_coverage(tensors: list[TensorInfo], data_bytes: int) -> None:
    """The tensors' byte ranges must tile [0, data_bytes) exactly."""
    position, previous = 0, None
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin < position:
            raise SafetensorsError(f"tensor {info.name!r} bytes [{info.begin}, {info.end}) overlap tensor "
                                   f"{previous!r} (ends at {position})")
        if info.begin > position:
            raise SafetensorsError(f"tensor {info.name!r} starts at byte {info.begin}, leaving a hole after "
                                   f"{'the header' if previous is None else repr(previous)} (ends at {position})")
        position, previous = info.end, info.name
    if position != data_bytes:
        raise SafetensorsError(f"tensors end at byte {position} of the data block but it holds {data_bytes} bytes "
                               "(truncated or padded file)")


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file against the file's size.

    The path must be a regular file (SafetensorsError otherwise, see open_regular_file)."""
    path = Path(path)
    with open_regular_file(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {file_size} bytes is too short for a safetensors file (needs 8 + header)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise SafetensorsError(f"{path}: header length {n} is impossible for a file of {file_size} bytes "
                                   f"(limit {MAX_HEADER_BYTES}); not a safetensors file or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({exc})") from None
    except SafetensorsError as exc:
        raise SafetensorsError(f"{path}: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    try:
        tensors = [_parse_entry(name, entry) for name, entry in header.items()]
        _check_coverage(tensors, file_size - 8 - n)
    except SafetensorsError as exc:
        raise SafetensorsError(f"{path}: {exc}") from None
    return Header({t.name: t for t in tensors}, metadata, 8 + n)


# ---------------------------------------------------------------- reading


def _read_builtin(path: Path, header: Header, names: list[str]) -> dict[str, np.ndarray]:
    arrays = {}
    with path.open("rb") as f:
        for name in names:
            info = header.tensors[name]
            stored = STORED_DTYPES[info.dtype]
            f.seek(header.data_start + info.begin)
            flat = np.fromfile(f, dtype=stored, count=math.prod(info.shape))
            arrays[name] = flat.reshape(info.shape).astype(stored.newbyteorder("="), copy=False)
    return arrays


def _read_package(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in names}


def read_safetensors(path: str | os.PathLike, names: list[str] | None = None, *,
                     implementation: str = "auto") -> dict[str, np.ndarray]:
    """Read tensors (all, or `names`) as native-endian NumPy arrays; BF16 comes back as exact float32.

    implementation: "auto" (the safetensors package if installed, else the built-in reader),
    "package" or "builtin". BF16 tensors are always decoded by this module.
    """
    path = Path(path)
    header = read_header(path)
    wanted = list(header.tensors) if names is None else list(names)
    missing = [n for n in wanted if n not in header.tensors]
    if missing:
        raise SafetensorsError(f"{path}: no tensors named {missing}")
    bf16 = [n for n in wanted if header.tensors[n].dtype == "BF16"]
    others = [n for n in wanted if header.tensors[n].dtype != "BF16"]
    arrays = _read_package(path, others) if _use_package(implementation) else _read_builtin(path, header, others)
    arrays.update({n: decode_bfloat16(bits) for n, bits in _read_builtin(path, header, bf16).items()})
    for name in wanted:  # a BOOL byte is 0 or 1; NumPy would read any other byte as True
        if header.tensors[name].dtype == "BOOL" and (arrays[name].view(np.uint8) > 1).any():
            raise SafetensorsError(f"{path}: tensor {name!r} (BOOL) holds bytes other than 0 and 1")
    return {n: arrays[n] for n in wanted}


# ---------------------------------------------------------------- writing


def _stored_form(name: str, array: np.ndarray, storage: str | None) -> tuple[str, np.ndarray]:
    """-> (file dtype code, C-contiguous little-endian array of the bytes to write)."""
    if not isinstance(array, np.ndarray):
        raise SafetensorsError(f"tensor {name!r}: expected a numpy ndarray, got {type(array).__name__}")
    code = FLOAT_STORAGE[storage] if storage is not None and array.dtype.kind == "f" else None
    if code == "BF16":
        return code, encode_bfloat16(array.astype(np.promote_types(array.dtype, np.float32), copy=False))
    if code is not None:
        array = array.astype(STORED_DTYPES[code], copy=False)
    little = array.dtype.newbyteorder("<")
    if little not in _CODE_OF_NUMPY:
        raise SafetensorsError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
    return _CODE_OF_NUMPY[little], array.astype(little, order="C", copy=False)


def _write_builtin(path: Path, stored: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (code, data) in stored.items():
        header[name] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, data in stored.values():
            f.write(data.tobytes())


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None, storage: str | None = None,
                      implementation: str = "auto") -> None:
    """Write NumPy arrays to a safetensors file.

    storage: None keeps each array's dtype; "float64" | "float32" | "float16" | "bfloat16" converts
    every floating array (round to nearest, ties to even; integers and bools are kept).
    implementation: as in read_safetensors; files holding BF16 are always written by the built-in
    writer (the package's NumPy API has no bfloat16).
    """
    if storage is not None and storage not in FLOAT_STORAGE:
        raise ValueError(f"storage must be None or one of {sorted(FLOAT_STORAGE)}, got {storage!r}")
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"metadata must map strings to strings, got {metadata!r}")
    bad_names = [n for n in tensors if not isinstance(n, str) or not n or n == "__metadata__"]
    if bad_names:
        raise SafetensorsError(f"tensor names must be non-empty strings other than '__metadata__', got {bad_names}")
    stored = {name: _stored_form(name, tensors[name], storage) for name in sorted(tensors)}
    path = Path(path)
    if _use_package(implementation) and all(code != "BF16" for code, _ in stored.values()):
        from safetensors.numpy import save_file

        try:
            save_file({name: data for name, (_, data) in stored.items()}, str(path), metadata=metadata or None)
        except Exception as exc:  # the package's errors (e.g. "I/O error: Is a directory") lack the path
            raise SafetensorsError(f"{path}: cannot write: {exc}") from exc
    else:
        _write_builtin(path, stored, metadata)
