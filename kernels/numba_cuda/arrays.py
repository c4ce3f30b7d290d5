"""The device hooks of ``fastdrmm.ops._Inputs``: wrap without copying, convert on the device,
and the range of an index array.

* ``asarray`` wraps numba device arrays (returned as they are), any object with
  ``__cuda_array_interface__`` (CuPy, PyTorch, ...: ``from_cuda_array_interface``, no copy, the
  producer's stream kept on the array so kernels are queued behind its work without a host
  synchronisation) and CUDA DLPack producers (``__dlpack__``, e.g. JAX), parsed here with ctypes
  since numba-cuda has no DLPack import.
* ``ascontiguousarray`` returns the array itself when it is already C-contiguous with the dtype;
  else a strided-gather/convert kernel makes a contiguous copy on the device.
* ``index_range`` is a block-reduction kernel with int64 atomics min/max: two ints to the host.
"""

import ctypes

import numpy as np
from numba import cuda, types

from . import _common, config

SIMULATOR = cuda.to_device.__module__.startswith("numba.cuda.simulator")


def is_device_array(obj):
    return getattr(obj, "__cuda_ndarray__", False) is True


# ---------------------------------------------------------------------------------- DLPack
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", _DELETER)]

_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.restype = ctypes.c_int
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_DL_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}


class _DLPackOwner:
    """Keeps a consumed DLPack tensor alive; calls its deleter when the wrapping array dies."""

    def __init__(self, managed):
        self._managed = managed

    def __del__(self):
        managed, self._managed = self._managed, None
        if managed is not None and managed.contents.deleter:
            managed.contents.deleter(managed)


def dlpack_descriptor(capsule):
    """Consume a DLPack capsule: (CUDA-array-interface dict, DLPack device type, owner).

    The capsule is renamed ``used_dltensor`` as the protocol asks; ``owner`` runs the producer's
    deleter when it is garbage collected, so keep it alive as long as the memory is used.
    """
    ptr = _get_pointer(capsule, b"dltensor")
    managed = ctypes.cast(ptr, ctypes.POINTER(_DLManagedTensor))
    _set_name(capsule, b"used_dltensor")
    owner = _DLPackOwner(managed)
    t = managed.contents.dl_tensor
    kind = _DL_KINDS.get(t.dtype.code)
    if kind is None or t.dtype.lanes != 1:
        raise TypeError(f"unsupported DLPack dtype (code {t.dtype.code}, lanes {t.dtype.lanes})")
    dtype = np.dtype(f"{kind}{t.dtype.bits // 8}") if kind != "b" else np.dtype(bool)
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = None
    if t.strides:
        strides = tuple(int(t.strides[i]) * dtype.itemsize for i in range(t.ndim))
    desc = {"shape": shape, "strides": strides, "typestr": dtype.str,
            "data": ((t.data or 0) + int(t.byte_offset), False), "version": 3, "stream": None}
    return desc, int(t.device.device_type), owner


# ---------------------------------------------------------------------------------- hooks
def asarray(obj):
    """A numba device array viewing ``obj``'s memory (no copy)."""
    if is_device_array(obj):
        return obj
    if SIMULATOR:
        raise TypeError(
            f"the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) holds no device memory: pass numba "
            f"device arrays (numba.cuda.to_device), got {type(obj).__name__}")
    if hasattr(obj, "__cuda_array_interface__"):
        return cuda.from_cuda_array_interface(obj.__cuda_array_interface__, owner=obj, sync=False)
    if hasattr(obj, "__dlpack__"):
        # stream=1: the producer orders its work before the legacy default stream we launch on.
        desc, device, owner = dlpack_descriptor(obj.__dlpack__(stream=1))
        if device not in (2, 13):
            raise TypeError(f"DLPack device type {device} is not CUDA memory")
        return cuda.from_cuda_array_interface(desc, owner=owner, sync=False)
    raise TypeError(f"cannot view {type(obj).__name__} as a CUDA array")


def _copy_source(ndim):
    def copy1(src, out):
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        for t in range(start, out.shape[0], cuda.gridDim.x * cuda.blockDim.x):
            out[t] = src[t]

    def copy2(src, out):
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        d1 = out.shape[1]
        for t in range(start, out.size, cuda.gridDim.x * cuda.blockDim.x):
            i = t // d1
            out[i, t - i * d1] = src[i, t - i * d1]

    def copy3(src, out):
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        d1, d2 = out.shape[1], out.shape[2]
        for t in range(start, out.size, cuda.gridDim.x * cuda.blockDim.x):
            r = t // d2
            c = t - r * d2
            i = r // d1
            j = r - i * d1
            out[i, j, c] = src[i, j, c]

    def copy4(src, out):
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        d1, d2, d3 = out.shape[1], out.shape[2], out.shape[3]
        for t in range(start, out.size, cuda.gridDim.x * cuda.blockDim.x):
            r = t // d3
            c = t - r * d3
            r2 = r // d2
            b = r - r2 * d2
            i = r2 // d1
            a = r2 - i * d1
            out[i, a, b, c] = src[i, a, b, c]

    return {1: copy1, 2: copy2, 3: copy3, 4: copy4}[ndim]


COPY_KERNELS = {nd: cuda.jit(_copy_source(nd)) for nd in (1, 2, 3, 4)}


def ascontiguousarray(arr, dtype):
    """``arr`` itself if C-contiguous with ``dtype``, else a contiguous device-side copy."""
    dtype = np.dtype(dtype)
    if np.dtype(arr.dtype) == dtype and arr.is_c_contiguous():
        return arr
    stream = _common.stream_of(arr)
    out = _common.empty(arr.shape, dtype, stream)
    if out.size == 0:
        return out
    if arr.ndim == 0 or arr.ndim > 4:
        raise ValueError(f"arrays of 1 to 4 dimensions only, got {arr.ndim}")
    cfg = config.snapshot()
    _common.over_items(COPY_KERNELS[arr.ndim], out.size, cfg, stream)(arr, out)
    return out


def _range_source(dtype, cfg):
    threads = cfg.threads
    p2 = 1
    while p2 < threads:
        p2 *= 2

    def index_range(idx, out):
        lo = cuda.shared.array(threads, types.int64)
        hi = cuda.shared.array(threads, types.int64)
        tid = cuda.threadIdx.x
        mn = types.int64(0x7FFFFFFFFFFFFFFF)
        mx = -mn - 1
        for t in range(cuda.blockIdx.x * threads + tid, idx.size, cuda.gridDim.x * threads):
            v = types.int64(idx[t])
            mn = min(mn, v)
            mx = max(mx, v)
        lo[tid] = mn
        hi[tid] = mx
        cuda.syncthreads()
        step = p2 // 2
        while step > 0:
            if tid < step and tid + step < threads:
                lo[tid] = min(lo[tid], lo[tid + step])
                hi[tid] = max(hi[tid], hi[tid + step])
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            cuda.atomic.min(out, 0, lo[0])
            cuda.atomic.max(out, 1, hi[0])

    nbt = types.int64 if dtype.kind in "iu" and dtype.itemsize == 8 else types.int32
    return index_range, types.void(nbt[::1], types.int64[::1])


def index_range(idx):
    """(min, max) of an integer device array as Python ints; (0, 0) when empty."""
    if idx.size == 0:
        return 0, 0
    dtype = np.dtype(idx.dtype)
    wide = dtype.itemsize == 8
    idx = ascontiguousarray(idx, np.int64 if wide else np.int32)
    stream = _common.stream_of(idx)
    cfg = config.snapshot()
    out = cuda.to_device(np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min], np.int64),
                         stream=stream)
    kern = _common.get_kernel(_range_source, np.int64 if wide else np.int32, cfg)
    _common.over_items(kern, idx.size, cfg, stream)(_common.flat(idx), out)
    host = out.copy_to_host(stream=stream)
    stream.synchronize()
    # (uint64 entries above 2**63 wrap negative: reported out of range, as they are.)
    return int(host[0]), int(host[1])
