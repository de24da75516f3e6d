"""The numpy-only safetensors reader/writer: bfloat16 rounding, agreement with the package, corrupt files."""

from __future__ import annotations

import json
import os
import threading
from fractions import Fraction

import numpy as np
import pytest

from refslm import safetensors_io as sio
from refslm.safetensors_io import SafetensorsError

IMPLS = ["builtin", pytest.param("package", marks=pytest.mark.skipif(not sio.package_available(),
                                                                      reason="safetensors not installed"))]


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 2)),
        "i32": rng.integers(-(2**30), 2**30, size=3).astype(np.int32),
        "i16": np.array([-3, 7], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "u16": np.array([65535], np.uint16),
        "u32": np.array([2**32 - 1], np.uint32),
        "u64": np.array([2**64 - 1], np.uint64),
        "bool": np.array([[True, False, True]]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
    }


# ---------------------------------------------------------------- bfloat16


def test_bfloat16_hand_values():
    bits = np.array([0x3F80, 0x4049, 0xC000, 0x7F80, 0xFF80, 0x0001, 0x8000, 0x7F7F], np.uint16)
    expected = [1.0, 3.140625, -2.0, np.inf, -np.inf, 2.0**-133, -0.0, (2 - 2.0**-7) * 2.0**127]
    got = sio.decode_bfloat16(bits)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
    assert np.signbit(got[6])
    # 1 + 2^-8 is a tie between 1 (even) and 1 + 2^-7 (odd): goes to 1. 1 + 3 * 2^-8 goes to 1 + 2^-6 (even).
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, 3.4e38, np.nan], np.float32)
    np.testing.assert_array_equal(sio.encode_bfloat16(x)[:4], [0x3F80, 0x3F82, 0x3F81, 0x7F80])
    assert np.isnan(sio.decode_bfloat16(sio.encode_bfloat16(x)[4:]))[0]


def test_bfloat16_every_pattern_round_trips():
    bits = np.arange(2**16, dtype=np.uint16)
    values = sio.decode_bfloat16(bits)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(sio.encode_bfloat16(values)[finite], bits[finite])
    assert np.isnan(sio.decode_bfloat16(sio.encode_bfloat16(values[~finite]))).all()


def test_bfloat16_matches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7F7FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000, 0x00008000, 0x80018000],
                                    np.uint32)])
    x = bits.view(np.float32)
    ours = sio.encode_bfloat16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    all_bits = np.arange(2**16, dtype=np.uint16)
    decoded = torch.from_numpy(all_bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(sio.decode_bfloat16(all_bits).view(np.uint32), decoded.view(np.uint32))


def _nearest_bfloat16_exact(x: float) -> int:
    """Correct rounding by exact rational arithmetic over the two bfloat16 neighbours (x finite, > 0)."""
    lo = int(np.float32(x).view(np.uint32) >> 16)
    while Fraction(float(sio.decode_bfloat16(np.uint16(lo)))) > Fraction(x):
        lo -= 1
    while Fraction(float(sio.decode_bfloat16(np.uint16(lo + 1)))) <= Fraction(x):
        lo += 1
    below, above = (Fraction(float(sio.decode_bfloat16(np.uint16(b)))) for b in (lo, lo + 1))
    gap_lo, gap_hi = Fraction(x) - below, above - Fraction(x)
    if gap_lo != gap_hi:
        return lo if gap_lo < gap_hi else lo + 1
    return lo if lo % 2 == 0 else lo + 1


def test_bfloat16_from_float64_is_correctly_rounded():
    # 1 + 2^-8 + 2^-40: float32 rounds it to the tie 1 + 2^-8, a second rounding would give 1.0.
    assert sio.encode_bfloat16(np.array([1 + 2.0**-8 + 2.0**-40]))[0] == 0x3F81
    rng = np.random.default_rng(3)
    # values near bfloat16 ties, where double rounding would go wrong
    base = sio.decode_bfloat16(rng.integers(0x0080, 0x7F00, 300).astype(np.uint16)).astype(np.float64)
    x = base * (1 + 2.0**-8 + rng.choice([-1, 1], 300) * 2.0 ** rng.integers(-45, -25, 300))
    x = np.concatenate([x, np.abs(rng.standard_normal(200)) * 10.0 ** rng.integers(-30, 30, 200)])
    np.testing.assert_array_equal(sio.encode_bfloat16(x), [_nearest_bfloat16_exact(float(v)) for v in x])
    np.testing.assert_array_equal(sio.encode_bfloat16(-x), np.array([_nearest_bfloat16_exact(float(v)) for v in x])
                                  | 0x8000)


def test_bfloat16_float64_overflow_and_underflow():
    x = np.array([1e300, -1e300, 1e-300, -1e-300, np.inf, np.nan])
    got = sio.encode_bfloat16(x)
    np.testing.assert_array_equal(got[:5], [0x7F80, 0xFF80, 0x0000, 0x8000, 0x7F80])
    assert np.isnan(sio.decode_bfloat16(got[5:]))[0]


# ---------------------------------------------------------------- round trips, builtin vs package


@pytest.mark.parametrize("writer", IMPLS)
@pytest.mark.parametrize("reader", IMPLS)
def test_every_dtype_round_trips_across_implementations(tmp_path, writer, reader):
    tensors = every_dtype()
    path = tmp_path / "t.safetensors"
    sio.write_safetensors(path, tensors, metadata={"format": "np"}, implementation=writer)
    assert sio.read_header(path).metadata == {"format": "np"}
    got = sio.read_safetensors(path, implementation=reader)
    assert sorted(got) == sorted(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("storage", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("writer", IMPLS)
def test_float_storage_conversion(tmp_path, storage, writer):
    tensors = {"w": np.random.default_rng(1).standard_normal((4, 3)), "ids": np.arange(3)}
    path = tmp_path / "t.safetensors"
    sio.write_safetensors(path, tensors, storage=storage, implementation=writer)
    header = sio.read_header(path)
    assert header.tensors["w"].dtype == sio.FLOAT_STORAGE[storage]
    assert header.tensors["ids"].dtype == "I64"
    got = sio.read_safetensors(path)
    if storage == "bfloat16":
        expected = sio.decode_bfloat16(sio.encode_bfloat16(tensors["w"]))
    else:
        expected = tensors["w"].astype(storage)
    assert got["w"].dtype == expected.dtype
    np.testing.assert_array_equal(got["w"], expected)
    np.testing.assert_array_equal(got["ids"], tensors["ids"])


def test_package_reads_builtin_bfloat16_file(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    tensors = {"b": np.array([1.0, -2.5, 3.140625], np.float32), "i": np.arange(2)}
    path = tmp_path / "t.safetensors"
    sio.write_safetensors(path, tensors, storage="bfloat16", implementation="builtin")
    with safetensors.safe_open(str(path), framework="numpy") as f:  # the package validates the whole layout
        assert sorted(f.keys()) == ["b", "i"]
        np.testing.assert_array_equal(f.get_tensor("i"), [0, 1])
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    np.testing.assert_array_equal(load_file(str(path))["b"].to(torch.float32).numpy(), tensors["b"])


def test_builtin_reads_package_bfloat16_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.tensor([[0.1, -7.0], [1e-3, 65504.0]], dtype=torch.float64)
    path = tmp_path / "t.safetensors"
    save_file({"x": x.to(torch.bfloat16), "h": x.to(torch.float16)}, str(path))
    for impl in ("builtin", "package"):
        got = sio.read_safetensors(path, implementation=impl)
        np.testing.assert_array_equal(got["x"], x.to(torch.bfloat16).float().numpy())
        np.testing.assert_array_equal(got["h"], x.to(torch.float16).numpy())


def test_read_selected_names(tmp_path):
    path = tmp_path / "t.safetensors"
    sio.write_safetensors(path, {"a": np.zeros(2), "b": np.ones(3)})
    assert list(sio.read_safetensors(path, ["b"])) == ["b"]
    with pytest.raises(SafetensorsError, match=r"no tensors named \['c'\]"):
        sio.read_safetensors(path, ["c"])


def test_writer_rejects_bad_input(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(SafetensorsError, match="'c'.*complex128"):
        sio.write_safetensors(path, {"c": np.zeros(2, np.complex128)}, implementation="builtin")
    with pytest.raises(SafetensorsError, match="'l'.*ndarray"):
        sio.write_safetensors(path, {"l": [1.0]})
    with pytest.raises(ValueError, match="storage"):
        sio.write_safetensors(path, {"a": np.zeros(1)}, storage="int8")
    with pytest.raises(SafetensorsError, match="metadata"):
        sio.write_safetensors(path, {"a": np.zeros(1)}, metadata={"k": 1})
    sio.write_safetensors(path, {"a": np.zeros(1)})
    with pytest.raises(ValueError, match="implementation"):
        sio.read_safetensors(path, implementation="torch")


# ---------------------------------------------------------------- corrupt files


def _with_header(raw: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def _raw_file(header: object, data: bytes, length: int | None = None) -> bytes:
    return _with_header(json.dumps(header).encode(), data, length)


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CORRUPT = {
    "too short": (b"\x01\x00", "too short"),
    "header longer than file": (_raw_file({}, b"", length=10_000), "header length 10000 is impossible"),
    "not json": (_with_header(b"{abc"), "not valid UTF-8 JSON"),
    "not utf-8": (_with_header(b'{"\xff":1}'), "not valid UTF-8 JSON"),
    "not an object": (_raw_file([1], b""), "must be a JSON object"),
    "nested too deeply": (_with_header(b"[" * 200_000), "not valid UTF-8 JSON"),  # json's RecursionError
    "duplicate key": (_with_header(b'{"a":{},"a":{}}'), "duplicate key 'a'"),
    "bad metadata": (_raw_file({"__metadata__": {"k": 3}}, b""), "__metadata__ must map strings"),
    "unknown dtype": (_raw_file({"w": _entry("F8", [1], 0, 1)}, b"\x00"), "'w': unsupported dtype 'F8'"),
    "extra field": (_raw_file({"w": {**_entry("F32", [1], 0, 4), "x": 1}}, b"\x00" * 4), "'w': header entry"),
    "negative shape": (_raw_file({"w": _entry("F32", [-1], 0, 4)}, b"\x00" * 4), "'w': shape must be"),
    "offsets reversed": (_raw_file({"w": _entry("F32", [1], 4, 0)}, b"\x00" * 4), "'w': data_offsets"),
    "shape vs bytes": (_raw_file({"w": _entry("F32", [2, 3], 0, 20)}, b"\x00" * 20),
                       "'w': F32 shape \\[2, 3\\] needs 24"),
    "overlap": (_raw_file({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\x00" * 12),
                "'b' bytes \\[4, 12\\) overlap tensor 'a'"),
    "hole": (_raw_file({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\x00" * 12),
             "'b' starts at byte 8, leaving a hole after 'a'"),
    "truncated data": (_raw_file({"a": _entry("F32", [3], 0, 12)}, b"\x00" * 11), "truncated"),
    "trailing bytes": (_raw_file({"a": _entry("F32", [1], 0, 4)}, b"\x00" * 9), "holds 9 bytes"),
    "bool byte 2": (_raw_file({"m": _entry("BOOL", [3], 0, 3)}, b"\x01\x00\x02"),
                    "'m' \\(BOOL\\) holds bytes other than 0 and 1"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("impl", IMPLS)
def test_corrupt_files_raise_clear_errors(tmp_path, case, impl):
    raw, message = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafetensorsError, match=message) as info:
        sio.read_safetensors(path, implementation=impl)
    assert str(path) in str(info.value)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "t.safetensors"
    sio.write_safetensors(path, every_dtype())
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SafetensorsError, match="truncated"):
        sio.read_safetensors(path)


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")


def error_without_blocking(call, fifo, seconds: float = 10.0) -> BaseException | None:
    """The exception call() raises (None if none); fails the test, instead of hanging it, if call()
    blocks opening the FIFO `fifo` (then released by opening and closing its write end)."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is waiting: this releases it
        thread.join(seconds)
        pytest.fail(f"reading {fifo} blocked (a FIFO must be refused, not opened for a blocking read)")
    return outcome[0]


@needs_fifo
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    error = error_without_blocking(lambda: sio.read_safetensors(fifo), fifo)
    assert isinstance(error, SafetensorsError)
    assert str(error) == f"{fifo}: expected a regular file, found a FIFO, socket or device"


def test_directory_and_device_are_refused(tmp_path):
    """A directory raised a bare IsADirectoryError; a device is no file to parse."""
    with pytest.raises(SafetensorsError, match=f"{tmp_path}: expected a regular file, found a directory"):
        sio.read_header(tmp_path)
    if os.path.exists(os.devnull) and os.name == "posix":
        with pytest.raises(SafetensorsError, match="expected a regular file, found a FIFO, socket or device"):
            sio.read_safetensors(os.devnull)
    with pytest.raises(FileNotFoundError):
        sio.read_header(tmp_path / "missing.safetensors")


def test_link_to_a_regular_file_is_read(tmp_path):
    sio.write_safetensors(tmp_path / "t.safetensors", {"a": np.arange(3.0)})
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(sio.read_safetensors(tmp_path / "link.safetensors")["a"], np.arange(3.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_writing_onto_a_directory_names_the_path(tmp_path, impl):
    with pytest.raises((SafetensorsError, IsADirectoryError), match=str(tmp_path)):
        sio.write_safetensors(tmp_path, {"a": np.zeros(2)}, implementation=impl)
