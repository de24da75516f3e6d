"""The "opencl" backend: the backend interface on an OpenCL device through pyopencl.

Arrays are `DeviceArray`s (strided views of pyopencl buffers) on one device; weights are uploaded
once by `asarray` and stay there, KV caches are device arrays written in place, and only token ids
(in) and what the caller asks `to_numpy` for (out) cross the bus. Kernel sources live in
kernels/opencl/*.cl (found through `refslm.resources.kernels_dir()`), are compiled once per (file,
dtype, build options) and cached by
the backend instance (pyopencl and the driver also cache binaries on disk).

Device choice: the `device` argument or the environment variable REFSLM_OPENCL_DEVICE, either
"PLATFORM:DEVICE" indices (as `refslm devices` lists them) or a case-insensitive substring of the
device or platform name; otherwise the first GPU or accelerator, else the first device.
Everything that keeps the backend from running (pyopencl missing, no platform, no matching device,
a kernel that fails to build) raises BackendUnavailable naming the device, with the build log.

float32 everywhere; float64 too where the device has cl_khr_fp64. `weight_storage="float16"` keeps
the weight matrices (2-D arrays given to `weight`: projections, embedding, lm_head) as half, read
with vload_half and computed in float32, halving the bytes a decode step reads. vload_half is core
OpenCL C, so this works on every device (cl_khr_fp16, half arithmetic, is not needed).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import losses, ops
from ..resources import kernels_dir
from . import BackendUnavailable
from .base import Backend

try:
    import pyopencl as cl
    import pyopencl.tools as cl_tools
except ImportError as exc:  # the registry turns this into BackendUnavailable
    raise ImportError(f"pyopencl is not installed ({exc}); install the extra: pip install 'refslm[opencl]'") from exc

DEVICE_ENV = "REFSLM_OPENCL_DEVICE"
GEMM_TILE_ENV = "REFSLM_OPENCL_GEMM_TILE"
WEIGHT_STORAGE_ENV = "REFSLM_OPENCL_WEIGHT_STORAGE"
LOSS_KIND_CODES = {"cross_entropy": 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3, "skew_kl": 4,
                   "skew_reverse_kl": 5}  # kernels/opencl/loss.cl KIND_*
GEMV_MAX_M = 8  # gemm.cl GEMV_MAX_M: rows of A up to which linear uses the GEMV kernel
UPLOAD_CACHE_SIZE = 64  # small host inputs (ids, masks, cos/sin) kept on the device, most recent first


@dataclass(frozen=True)
class GemmTile:
    """Tiled GEMM shape: a tm x tn tile of C per work-group of (tn/rn, tm/rn) items, K in steps of tk."""

    tm: int
    tn: int
    tk: int
    rm: int
    rn: int

    @property
    def local_size(self) -> tuple[int, int]:
        return (self.tn // self.rn, self.tm // self.rm)

    def defines(self) -> dict[str, int]:
        return {"TM": self.tm, "TN": self.tn, "TK": self.tk, "RM": self.rm, "RN": self.rn}

    @classmethod
    def parse(cls, text: str) -> GemmTile:
        """'TM,TN,TK,RM,RN' -> GemmTile (ValueError naming the expected form otherwise)."""
        try:
            tm, tn, tk, rm, rn = (int(p) for p in text.split(","))
        except ValueError:
            raise ValueError(f"GEMM tile must be 'TM,TN,TK,RM,RN' (five integers), got {text!r}") from None
        return cls(tm, tn, tk, rm, rn)


GPU_GEMM_TILE = GemmTile(128, 128, 16, 8, 8)
CPU_GEMM_TILE = GemmTile(64, 64, 16, 4, 4)


# ---------------------------------------------------------------- devices


def list_devices() -> list[tuple[int, int, cl.Platform, cl.Device]]:
    """-> [(platform index, device index, platform, device)] of every OpenCL device here ([] if none)."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD / no platform: pyopencl raises instead of returning []
        return []
    found = []
    for p_index, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        found.extend((p_index, d_index, platform, device) for d_index, device in enumerate(devices))
    return found


def describe(platform: cl.Platform, device: cl.Device) -> str:
    """'device name (platform name, OpenCL version)'."""
    return f"{device.name.strip()} ({platform.name.strip()}, {device.version.strip()})"


PROBE_SOURCE = "__kernel void probe(__global float *x) { x[get_global_id(0)] = 1.0f; }"


def open_device(platform: cl.Platform, device: cl.Device) -> cl.Context:
    """A context on device, after building a one-line kernel (BackendUnavailable with the log if that fails).

    Some drivers list a device whose compiler cannot target it (e.g. an LLVM too old for the host
    CPU): the probe turns that into a clear error here rather than in the first real kernel.
    """
    try:
        context = cl.Context([device])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cl.Program(context, PROBE_SOURCE).build()
    except cl.Error as exc:
        raise BackendUnavailable(f"OpenCL device {describe(platform, device)} cannot build kernels: {exc}") from exc
    return context


def select_device(spec: str | None = None) -> tuple[cl.Platform, cl.Device, cl.Context]:
    """(platform, device, context) named by spec or REFSLM_OPENCL_DEVICE ('P:D' indices or a name substring).

    Without a spec: the first GPU or accelerator that builds a kernel, else the first other device
    that does. BackendUnavailable lists the devices and why each was refused.
    """
    spec = spec if spec is not None else os.environ.get(DEVICE_ENV) or None
    found = list_devices()
    if not found:
        raise BackendUnavailable("no OpenCL platform or device found (is an ICD installed? Debian: apt-get "
                                 "install pocl-opencl-icd gives a CPU device)")
    if spec is None:
        accelerator = cl.device_type.GPU | cl.device_type.ACCELERATOR
        candidates = sorted(found, key=lambda f: not f[3].type & accelerator)  # stable: accelerators first
    else:
        parts = spec.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            candidates = [f for f in found if (f[0], f[1]) == (int(parts[0]), int(parts[1]))]
        else:
            needle = spec.lower()
            candidates = [f for f in found if needle in f[3].name.lower() or needle in f[2].name.lower()]
        if not candidates:
            listing = "; ".join(f"{p}:{d} {describe(pl, dev)}" for p, d, pl, dev in found)
            raise BackendUnavailable(f"no OpenCL device matches {spec!r} ({DEVICE_ENV} or device argument); "
                                     f"available: {listing}")
    refusals = []
    for _, _, platform, device in candidates:
        try:
            return platform, device, open_device(platform, device)
        except BackendUnavailable as exc:
            refusals.append(str(exc))
    raise BackendUnavailable("no usable OpenCL device:\n" + "\n".join(refusals))


@functools.lru_cache(maxsize=1024)
def _dense_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides in elements (cached: a decode step asks for the same few shapes hundreds of times)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class DeviceArray:
    """The opencl backend's array: a strided view of a device buffer (strides and offset in elements).

    Deliberately thin (creating one costs about a microsecond; decode steps create hundreds):
    shape, dtype, ndim, size, strides, offset, data (the cl.Buffer), reshape of dense arrays and
    transpose views. Host copies go through OpenCLBackend.to_numpy.
    """

    __slots__ = ("data", "shape", "dtype", "strides", "offset", "keep")

    def __init__(self, data, shape: tuple[int, ...], dtype: np.dtype, strides: tuple[int, ...] | None = None,
                 offset: int = 0, keep: object = None):
        self.data = data
        self.shape = shape
        self.dtype = dtype
        self.strides = _dense_strides(shape) if strides is None else strides
        self.offset = offset
        self.keep = keep  # what must live as long as the array (a pending upload's event)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_dense(self) -> bool:
        """C-contiguous from the start of the buffer (what every kernel but copy4d and attention reads)."""
        if self.offset != 0:
            return False
        dense = _dense_strides(self.shape)
        return self.strides == dense or all(n == 1 or s == d for n, s, d in zip(self.shape, self.strides, dense,
                                                                                strict=True))

    def reshape(self, *shape: int) -> DeviceArray:
        """A view with another shape (dense arrays only)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if not self.is_dense or math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self!r} to {shape}")
        return DeviceArray(self.data, shape, self.dtype, keep=self.keep)

    def transpose(self, axes: tuple[int, ...]) -> DeviceArray:
        """A view with the axes permuted (no copy)."""
        return DeviceArray(self.data, tuple(self.shape[a] for a in axes), self.dtype,
                           tuple(self.strides[a] for a in axes), self.offset, self.keep)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, strides={self.strides}, offset={self.offset})"


def _numeric_dtype(name: str, dtype) -> np.dtype:
    """A bool, integer or float dtype (anything else, e.g. object arrays of host pointers, must never reach a
    device); TypeError naming it otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a bool, integer or float array, got dtype {dtype}")
    return dtype


def _numeric(name: str, x) -> np.ndarray:
    """x as an ndarray of a _numeric_dtype."""
    x = np.asarray(x)
    _numeric_dtype(name, x.dtype)
    return x


def _check_device(x) -> DeviceArray:
    """x, if it is a device array; TypeError otherwise (host arrays enter through asarray / weight)."""
    if not isinstance(x, DeviceArray):
        raise TypeError(f"the opencl backend's ops take its device arrays (backend.asarray(host) makes one), "
                        f"got {type(x).__name__}")
    return x


def _activation_code(kind: str) -> np.int32:
    """ops.activation_code as the kernels' int argument (common.h ACT_*)."""
    return np.int32(ops.activation_code(kind))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------- the backend


class OpenCLBackend(Backend):
    """Backend on one OpenCL device; arrays are DeviceArray (host arrays enter through asarray / weight).

    device: 'P:D' or a name substring (default: REFSLM_OPENCL_DEVICE, else first GPU, else first
    device). gemm_tile: GemmTile or 'TM,TN,TK,RM,RN' (default: REFSLM_OPENCL_GEMM_TILE, else chosen
    by device type). weight_storage: 'compute' (weights in the compute dtype) or 'float16' (default:
    REFSLM_OPENCL_WEIGHT_STORAGE, else 'compute').
    row_attention_max_tq: query rows up to which attention uses the decode (row) kernel.
    """

    name = "opencl"

    def __init__(self, device: str | None = None, gemm_tile: GemmTile | str | None = None,
                 weight_storage: str | None = None, row_attention_max_tq: int = 4):
        self.platform, self.device, self.context = select_device(device)
        self.device_name = describe(self.platform, self.device)
        try:
            # profiling on: kernel_seconds reads each kernel's device start/end times
            self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        except cl.Error as exc:
            raise BackendUnavailable(f"cannot open OpenCL device {self.device_name}: {exc}") from exc
        self.allocator = cl_tools.MemoryPool(cl_tools.ImmediateAllocator(self.queue))
        extensions = self.device.extensions.split()
        self.has_fp64 = "cl_khr_fp64" in extensions
        self.dtypes = ("float32", "float64") if self.has_fp64 else ("float32",)
        self._compute_dtypes = {np.dtype(name) for name in self.dtypes}
        self.is_gpu = bool(self.device.type & (cl.device_type.GPU | cl.device_type.ACCELERATOR))
        weight_storage = weight_storage or os.environ.get(WEIGHT_STORAGE_ENV) or "compute"
        if weight_storage not in ("compute", "float16"):
            raise ValueError(f"weight_storage ({WEIGHT_STORAGE_ENV} or argument) must be 'compute' or 'float16', "
                             f"got {weight_storage!r}")
        if weight_storage == "float16":
            self.dtypes = ("float32",)  # half weights are computed in float32
        self.weight_storage = weight_storage
        tile = gemm_tile if gemm_tile is not None else os.environ.get(GEMM_TILE_ENV) or None
        tile = GemmTile.parse(tile) if isinstance(tile, str) else tile
        self.gemm_tile = self._check_tile(tile or (GPU_GEMM_TILE if self.is_gpu else CPU_GEMM_TILE))
        self.group_size = min(256, self.device.max_work_group_size)  # row and elementwise kernels
        self.row_attention_max_tq = row_attention_max_tq
        self._kernels: dict[tuple, cl.Kernel] = {}
        self._typed_kernels: set[int] = set()  # ids of the kernels whose scalar types pyopencl knows
        self.launches = 0  # kernels enqueued so far (bench model reports launches per decode step)
        self._recorded: list[cl.Event] | None = None  # kernel events kept while kernel_seconds runs
        self._uploads: OrderedDict[tuple, DeviceArray] = OrderedDict()

    def __repr__(self) -> str:
        return f"OpenCLBackend({self.device_name!r})"

    # ---------------------------------------------------------------- programs

    def _check_tile(self, tile: GemmTile) -> GemmTile:
        lx, ly = tile.local_size
        local_bytes = tile.tk * (tile.tm + tile.tn + 2) * 4  # float32 tiles (float64 needs twice this)
        if tile.tm % tile.rm or tile.tn % tile.rn or lx * ly > self.device.max_work_group_size \
                or local_bytes > self.device.local_mem_size:
            raise ValueError(f"GEMM tile {tile} does not fit {self.device_name}: needs TM % RM == TN % RN == 0, "
                             f"(TN/RN)*(TM/RM) <= {self.device.max_work_group_size} work-items and "
                             f"local memory <= {self.device.local_mem_size} bytes")
        return tile

    def kernel(self, file: str, name: str, dtype: np.dtype, **defines: int) -> cl.Kernel:
        """The kernel `name` of kernels/opencl/`file` built for dtype with -D defines (built once per
        (file, name, dtype, defines in the order given): a decode step looks kernels up ~180 times, so
        the key is the arguments as they come, without normalising)."""
        key = (file, name, dtype, *defines.items())
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = getattr(self._build(file, np.dtype(dtype), defines), name)
        return kernel

    def _build(self, file: str, dtype: np.dtype, defines: dict[str, int]) -> cl.Program:
        source_dir = kernels_dir() / "opencl"
        path = source_dir / file
        options = ["-I", str(source_dir), f"-DREAL={'double' if dtype == np.float64 else 'float'}"]
        options += ["-DREAL_IS_DOUBLE"] if dtype == np.float64 else []
        options += ["-DHAS_FP64"] if self.has_fp64 else []
        options += [f"-D{k}={v}" for k, v in defines.items()]
        try:
            source = path.read_text()
        except OSError as exc:
            raise BackendUnavailable(f"OpenCL kernel source {path} cannot be read: {exc}") from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pyopencl warns with the (non-empty) build log of a success
                return cl.Program(self.context, source).build(options=options)
        except cl.Error as exc:
            raise BackendUnavailable(f"OpenCL kernel {file} failed to build on {self.device_name} with "
                                     f"{' '.join(options)}:\n{exc}") from exc

    def _launch(self, kernel: cl.Kernel, global_size: tuple[int, ...], local_size: tuple[int, ...] | None,
                *args) -> None:
        """Enqueue kernel with args: device buffers, cl.LocalMemory, and numpy scalars whose types are
        the kernel's C argument types (np.int32 for int, np.int64 for long, the compute dtype for REAL).

        The first launch of a kernel declares its scalar types to pyopencl (set_scalar_arg_dtypes), so
        later launches pack all scalars in one step; undeclared, pyopencl converts each numpy scalar on
        its own, about 6 us per argument on PoCL here: most of a decode step's host time.
        """
        if id(kernel) not in self._typed_kernels:
            kinds = []
            for i, a in enumerate(args):
                if not isinstance(a, (np.generic, cl.MemoryObjectHolder, cl.LocalMemory)):
                    raise TypeError(f"kernel {kernel.function_name} argument {i}: expected a numpy scalar, a "
                                    f"device buffer or cl.LocalMemory, got {type(a).__name__}")
                kinds.append(a.dtype if isinstance(a, np.generic) else None)
            kernel.set_scalar_arg_dtypes(kinds)
            self._typed_kernels.add(id(kernel))
        self.launches += 1
        event = kernel(self.queue, global_size, local_size, *args)
        if self._recorded is not None:
            self._recorded.append(event)

    def kernel_seconds(self, fn: Callable[[], object]) -> tuple[float, float]:
        """Run fn() to completion -> (wall seconds, seconds the device spent running the kernels fn
        enqueued: the sum of their profiled start-to-end times). The queue is in order, so kernels never
        overlap: busy / wall is the share of the time the device computed, and the rest went to the
        host (Python, pyopencl, the driver's enqueue) and transfers."""
        self.queue.finish()
        self._recorded = []
        try:
            start = time.perf_counter()
            fn()
            self.queue.finish()
            wall = time.perf_counter() - start
            busy = sum(e.profile.end - e.profile.start for e in self._recorded) * 1e-9
        finally:
            self._recorded = None
        return wall, busy

    def _elementwise_size(self, total: int) -> tuple[tuple[int], tuple[int]]:
        g = self.group_size
        return (max(1, math.ceil(total / g)) * g,), (g,)

    # ---------------------------------------------------------------- data movement

    def _new(self, shape: tuple[int, ...], dtype) -> DeviceArray:
        """A fresh dense device array; shape a tuple of Python ints (callers derive it from other arrays)."""
        dtype = np.dtype(dtype)
        return DeviceArray(self.allocator(max(math.prod(shape), 1) * dtype.itemsize), shape, dtype)

    def _real(self, dtype) -> type:
        return np.float64 if np.dtype(dtype) == np.float64 else np.float32

    def _check_dtype(self, *arrays: DeviceArray) -> np.dtype:
        """-> the operands' dtype: every one a device array, in a dtype this device computes in (the
        ops.check_* call before it has made their dtypes equal)."""
        for a in arrays:
            _check_device(a)
        dtype = arrays[0].dtype
        if dtype not in self._compute_dtypes:
            raise TypeError(f"opencl backend on {self.device_name} computes in {self.dtypes}, got {dtype}")
        return dtype

    def asarray(self, x: np.ndarray) -> DeviceArray:
        """Host array (bool, integer or float) -> device array of the same shape and dtype (a blocking upload)."""
        x = _numeric("asarray x", x)
        out = self._new(x.shape, x.dtype)
        if x.size:
            cl.enqueue_copy(self.queue, out.data, np.ascontiguousarray(x), is_blocking=True)
        return out

    def weight(self, x: np.ndarray) -> DeviceArray:
        """A model weight on the device; 2-D float matrices become half under weight_storage='float16'."""
        x = np.asarray(x)
        if self.weight_storage == "float16" and x.ndim == 2 and x.dtype.kind == "f":
            x = x.astype(np.float16)
        return self.asarray(x)

    def upload(self, host: np.ndarray) -> DeviceArray:
        """A small per-call host input (ids, masks, cos/sin) on the device, without waiting for the queue.

        The copy is enqueued without blocking; the device array is kept in a small cache keyed by the
        contents (equal inputs, e.g. the same cos/sin or mask in every layer, are uploaded once), which
        also keeps the host buffer alive until the copy has long completed.
        """
        host = np.ascontiguousarray(_numeric("upload host", host))
        key = (host.dtype.str, host.shape, host.tobytes())
        cached = self._uploads.get(key)
        if cached is None:
            cached = self._new(host.shape, host.dtype)
            if host.size:  # the event holds the host buffer until the copy is done
                cached.keep = cl.enqueue_copy(self.queue, cached.data, host, is_blocking=False)
            self._uploads[key] = cached
            if len(self._uploads) > UPLOAD_CACHE_SIZE:
                self._uploads.popitem(last=False)
        else:
            self._uploads.move_to_end(key)
        return cached

    def to_numpy(self, x: DeviceArray) -> np.ndarray:
        x = self._dense(x)
        host = np.empty(x.shape, x.dtype)
        if host.size:
            cl.enqueue_copy(self.queue, host, x.data, is_blocking=True)
        return host

    def empty(self, shape, dtype) -> DeviceArray:
        if not all(type(s) is int or isinstance(s, np.integer) for s in shape) or min(shape, default=0) < 0:
            raise ValueError(f"empty: shape must be ints >= 0, got {shape!r}")
        return self._new(tuple(int(s) for s in shape), _numeric_dtype("empty", dtype))

    def _copy(self, src: DeviceArray, dst: DeviceArray) -> None:
        """dst[...] = src[...] for (possibly strided) views of the same shape, up to 4-D."""
        if src.shape != dst.shape or src.dtype != dst.dtype or src.ndim > 4:
            raise ValueError(f"copy needs equal shapes and dtypes (<= 4-D), got {src.shape} {src.dtype} "
                             f"-> {dst.shape} {dst.dtype}")
        if src.size == 0:
            return
        pad = 4 - src.ndim
        shape = (1,) * pad + src.shape

        def layout(a):
            return (a.data, np.int64(a.offset), *(np.int64(s) for s in (0,) * pad + a.strides))

        global_size, local_size = self._elementwise_size(src.size)
        self._launch(self.kernel("elementwise.cl", "copy4d", src.dtype), global_size, local_size,
                     np.int32(shape[1]), np.int32(shape[2]), np.int32(shape[3]), np.int64(src.size),
                     *layout(src), *layout(dst))

    def _dense(self, x: DeviceArray) -> DeviceArray:
        """x itself if C-contiguous at offset 0, else a dense copy."""
        if _check_device(x).is_dense:
            return x
        out = self._new(x.shape, x.dtype)
        self._copy(x, out)
        return out

    def write_time(self, buf, x, start):
        ops.check_write_time(buf, x, start)
        self._copy(x, self.time_slice(buf, start, start + x.shape[-2]))

    def time_slice(self, x, start, stop):
        ops.check_time_slice(x, start, stop)
        return DeviceArray(x.data, (*x.shape[:-2], stop - start, x.shape[-1]), x.dtype, x.strides,
                           x.offset + start * x.strides[-2], x.keep)

    # ---------------------------------------------------------------- dense ops

    def embedding(self, ids, table):
        ids = ops.check_embedding(ids, table, half_table=self.weight_storage == "float16")
        vocab, width = table.shape
        half = table.dtype == np.float16  # weight_storage='float16': read as half, computed in float32
        dtype = np.dtype(np.float32) if half else self._check_dtype(table)
        out = self._new((*ids.shape, width), dtype)
        if out.size:
            device_ids = self.upload(ids)
            kernel = self.kernel("elementwise.cl", "embedding", dtype, **({"W_HALF": 1} if half else {}))
            self._launch(kernel, *self._elementwise_size(out.size), np.int64(out.size), np.int32(width),
                         device_ids.data, table.data, out.data)
        return out

    def linear(self, x, weight, bias=None, residual=None, activation=None):
        ops.check_linear(x, weight, bias, residual, activation, half_weight=self.weight_storage == "float16")
        act = np.int32(-1 if activation is None else _activation_code(activation))
        x = self._dense(x)
        residual = None if residual is None else self._dense(residual)
        dtype = self._check_dtype(x, *(a for a in (bias, residual) if a is not None))
        n, k = weight.shape
        half = weight.dtype == np.float16
        m = x.size // k if k else 0
        out = self._new((*x.shape[:-1], n), dtype)
        if out.size == 0:
            return out
        args = (np.int32(m), np.int32(n), np.int32(k), x.data, weight.data,
                (bias if bias is not None else x).data, np.int32(bias is not None), act,
                (residual if residual is not None else x).data, np.int32(residual is not None), out.data)
        extra = {"W_HALF": 1} if half else {}
        if m <= GEMV_MAX_M:
            gv = min(128, self.device.max_work_group_size)
            self._launch(self.kernel("gemm.cl", "gemv_nt", dtype, GV=gv, **extra), (n * gv,), (gv,), *args)
        else:
            tile = self.gemm_tile
            lx, ly = tile.local_size
            global_size = (math.ceil(n / tile.tn) * lx, math.ceil(m / tile.tm) * ly)
            self._launch(self.kernel("gemm.cl", "gemm_nt", dtype, **tile.defines(), **extra), global_size,
                         (lx, ly), *args)
        return out

    def _map(self, name: str, out_like: DeviceArray, *args) -> DeviceArray:
        """Run an elementwise kernel of elementwise.cl: kernel(total, *args, out)."""
        out = self._new(out_like.shape, out_like.dtype)
        if out.size:
            self._launch(self.kernel("elementwise.cl", name, out.dtype), *self._elementwise_size(out.size),
                         np.int64(out.size), *args, out.data)
        return out

    def activation(self, x, kind):
        code = _activation_code(kind)
        ops.check_float(f"{kind} x", x)
        x = self._dense(x)
        self._check_dtype(x)
        return self._map("activation", x, code, x.data)

    def gated(self, gate, up, kind):
        ops.check_gated(gate, up)
        gate, up = self._dense(gate), self._dense(up)
        self._check_dtype(gate, up)
        return self._map("gated", gate, _activation_code(kind), gate.data, up.data)

    def _row_groups(self, width: int) -> int:
        """Work-group size (a power of two) of a one-group-per-row kernel over rows of `width`."""
        return min(self.group_size, _next_pow2(max(width, 1)))

    def rmsnorm(self, x, weight, eps, unit_offset=False):
        eps = ops.check_rmsnorm(x, weight, eps)
        x = self._dense(x)
        dtype = self._check_dtype(x, weight)
        width = x.shape[-1]
        out = self._new(x.shape, dtype)
        rows = x.size // width if width else 0
        if rows:
            wg = self._row_groups(width)
            self._launch(self.kernel("elementwise.cl", "rmsnorm", dtype), (rows * wg,), (wg,), np.int32(width),
                         self._real(dtype)(eps), np.int32(bool(unit_offset)), x.data, weight.data, out.data,
                         cl.LocalMemory(wg * dtype.itemsize))
        return out

    def softmax(self, x):
        """[..., N] -> [..., N]: softmax over the last axis (ops.softmax)."""
        ops.check_softmax(x, -1)
        x = self._dense(x)
        dtype = self._check_dtype(x)
        width = x.shape[-1]
        out = self._new(x.shape, dtype)
        rows = x.size // width if width else 0
        if rows:
            wg = self._row_groups(width)
            self._launch(self.kernel("elementwise.cl", "softmax_rows", dtype), (rows * wg,), (wg,),
                         np.int32(width), x.data, out.data, cl.LocalMemory(wg * dtype.itemsize))
        return out

    # ---------------------------------------------------------------- attention

    def split_heads(self, x, n_head):
        ops.check_split_heads(x, n_head)
        b, t, width = x.shape
        return self._dense(x).reshape(b, t, n_head, width // n_head).transpose((0, 2, 1, 3))  # a view

    def merge_heads(self, x):
        ops.check_merge_heads(x)
        b, h, t, d = x.shape
        return self._dense(x.transpose((0, 2, 1, 3))).reshape(b, t, h * d)  # free for attention's output

    def rope(self, x, cos, sin, layout):
        ops.check_rope(x, cos, sin, layout)
        dtype = self._check_dtype(x)
        b, h, t, d = x.shape
        out = self._new(x.shape, dtype)
        if out.size:
            cos_d, sin_d = self.upload(cos.astype(dtype)), self.upload(sin.astype(dtype))
            self._launch(self.kernel("elementwise.cl", "rope", dtype), *self._elementwise_size(out.size),
                         np.int32(h), np.int32(t), np.int32(d), np.int64(out.size), np.int32(cos.shape[0] > 1),
                         np.int32(layout == "interleaved"), *self._bhtd_args(x), cos_d.data, sin_d.data, out.data)
        return out

    def rope_store_kv(self, q, k, v, cos, sin, layout, cache_k, cache_v, start):
        ops.check_rope_store_kv(q, k, v, cos, sin, layout, cache_k, cache_v, start)
        dtype = self._check_dtype(q, k, v, cache_k, cache_v)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        out = self._new(q.shape, dtype)
        total = b * (hq + 2 * hkv) * t * d
        if total:
            cos_d, sin_d = self.upload(cos.astype(dtype)), self.upload(sin.astype(dtype))
            window_k, window_v = (self.time_slice(c, start, start + t) for c in (cache_k, cache_v))
            self._launch(self.kernel("elementwise.cl", "rope_store_kv", dtype), *self._elementwise_size(total),
                         np.int32(hq), np.int32(hkv), np.int32(t), np.int32(d), np.int64(total),
                         np.int32(cos.shape[0] > 1), np.int32(layout == "interleaved"), *self._bhtd_args(q),
                         *self._bhtd_args(k), *self._bhtd_args(v), cos_d.data, sin_d.data, out.data,
                         *self._bhtd_args(window_k), *self._bhtd_args(window_v))
        return out

    def _bhtd_args(self, a: DeviceArray) -> tuple:
        """A [B, H, T, D] view with contiguous D -> (buffer, offset, stride b, stride h, stride t) in elements."""
        if a.ndim != 4 or (a.strides[3] != 1 and a.shape[3] > 1):
            raise ValueError(f"expected a [B, H, T, D] array with a contiguous last axis, got {a!r}")
        return (a.data, np.int64(a.offset), *(np.int64(s) for s in a.strides[:3]))

    def attention(self, q, k, v, *, key_mask, causal, q_start, interleaved, mask_fill, segment_ids=None):
        key_mask, q_start, segments = ops.check_attention(q, k, v, key_mask=key_mask, q_start=q_start,
                                                          mask_fill=mask_fill, segment_ids=segment_ids)
        dtype = self._check_dtype(q, k, v)
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        out = self._new((b, tq, hq, d), dtype).transpose((0, 2, 1, 3))  # [B, Hq, Tq, D]: merge_heads is free
        if out.size == 0:
            return out
        mask = self.upload((key_mask if key_mask is not None else np.ones((1, 1), bool)).astype(np.uint8))
        segment_data = self.upload(segments if segments is not None else np.zeros((1, 1), np.int32))
        fill = {"MASK_FILL_FINITE": 1} if mask_fill == "finite_min" else {}
        args = (np.int32(hq), np.int32(hkv), np.int32(tq), np.int32(tk), np.int32(hq // hkv),
                np.int32(bool(interleaved)), np.int32(bool(causal)), np.int32(q_start),
                np.int32(key_mask is not None), mask.data, np.int32(segments is not None), segment_data.data,
                *self._bhtd_args(q), *self._bhtd_args(k),
                *self._bhtd_args(v), *self._bhtd_args(out))
        if tq <= self.row_attention_max_tq:
            wg = self.group_size
            scores = self._new((b * hq * tq, tk), dtype)
            self._launch(self.kernel("attention.cl", "row_attention", dtype, HEAD_DIM=d, WG=wg, **fill),
                         (b * hq * tq * wg,), (wg,), *args, scores.data)
        else:
            bq = 64 if self.is_gpu else 16
            bk = max(1, min(32, self.device.local_mem_size // (4 * d * dtype.itemsize)))
            self._launch(self.kernel("attention.cl", "flash_attention", dtype, HEAD_DIM=d, BQ=bq, BK=bk, **fill),
                         (math.ceil(tq / bq) * bq, b * hq), (bq, 1), *args)
        return out

    # ---------------------------------------------------------------- losses

    def loss_rows(self, kind, student, teacher, targets, row_weight, *, temperature, beta, label_smoothing,
                  grad_out=None):
        student = self._dense(student)
        dtype = self._check_dtype(student)
        teacher = None if teacher is None else self._dense(teacher)
        targets, row_weight = losses.check_rows_contract(
            kind, student.shape, dtype, None if teacher is None else (teacher.shape, teacher.dtype), targets,
            row_weight, temperature, beta, label_smoothing)
        n, vocab = student.shape
        kept = row_weight != 0
        if kind == "cross_entropy":
            teacher = student
        else:
            targets = np.zeros(1, np.int64)
        kind = losses.plain_kind(kind, beta)
        if grad_out is not None and (not isinstance(grad_out, DeviceArray) or grad_out.shape != student.shape
                                     or grad_out.dtype != dtype or not grad_out.is_dense):
            raise ValueError(f"grad_out must be a dense device array of shape {student.shape} and dtype {dtype}")
        grad = grad_out if grad_out is not None else self._new(student.shape, dtype)
        if n == 0:
            return np.zeros(0), grad
        real = self._real(dtype)
        weight_a = beta  # weight of the first log-distribution in the mixtures of loss.cl
        with np.errstate(divide="ignore"):
            log_w, log_1mw = real(np.log(weight_a)), real(np.log1p(-weight_a))
        acc = np.float64 if self.has_fp64 else np.float32
        values = self._new((n,), acc)
        status = self._new((n,), np.int32)
        upload = [self.upload(a) for a in (targets, kept.astype(np.uint8), (row_weight / temperature).astype(dtype))]
        wg = self._row_groups(vocab)
        self._launch(self.kernel("loss.cl", "loss_rows", dtype), (n * wg,), (wg,), np.int32(vocab),
                     np.int32(LOSS_KIND_CODES[kind]), real(temperature), real(beta), log_w, log_1mw,
                     real(label_smoothing / vocab), real(1.0 - label_smoothing), student.data, teacher.data,
                     upload[0].data, upload[1].data, upload[2].data, values.data, grad.data, status.data,
                     cl.LocalMemory(wg * dtype.itemsize), cl.LocalMemory(wg * np.dtype(acc).itemsize))
        bad = self.to_numpy(status)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            name = "student" if bad[i] == 1 else "teacher"
            raise ValueError(f"{name} logits row {i} must hold finite values or -inf with at least one finite "
                             "value (found NaN, +inf, or only -inf)")
        return self.to_numpy(values).astype(np.float64), grad

