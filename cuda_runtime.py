"""
A ctypes binding to the CUDA runtime that torch already loaded: cudaMallocManaged, cudaFree,
cudaMemPrefetchAsync, cudaMemAdvise and one device attribute, each call checked, for CUDA 12 and 13
(13 passes a cudaMemLocation struct by value where 12 took a device index). paged_adamw.py allocates
its managed (unified) memory through it. Loaded on first use only, so this module imports on
CPU-only machines.
"""
import ctypes
import ctypes.util
import glob
import os
import sys

import torch

cudaMemAttachGlobal = 1  # the allocation is accessible from any stream on any device
cudaDevAttrConcurrentManagedAccess = 89  # 1: GPU and CPU may touch managed memory at once
cudaMemLocationTypeDevice, cudaMemLocationTypeHost = 1, 2
cudaMemAdviseSetPreferredLocation, cudaMemAdviseSetAccessedBy = 3, 5
cudaErrorCudartUnloading = 4  # returned by calls made while the process is shutting down


class cudaMemLocation(ctypes.Structure):  # CUDA 13 passes it BY VALUE to prefetch and advise
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def find_libcudart():
    """Path of libcudart: the copy already loaded in this process first (the same runtime torch
    uses), then the pip wheels' copies (torch/lib, nvidia/cuda_runtime for CUDA 12, nvidia/cu13 for
    CUDA 13), then the system's."""
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            for line in f:  # "address perms offset dev inode path"; the path may be absent
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libcudart") and ".so" in path:
                    return path
    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    for sp in sys.path:  # site-packages directories hold the nvidia-* wheels beside torch
        dirs += [os.path.join(sp, "nvidia", sub, "lib") for sub in ("cuda_runtime", "cu13")]
    major = (torch.version.cuda or "").split(".")[0]  # prefer the runtime torch was built against
    for d in dirs:
        found = glob.glob(os.path.join(d, "libcudart*.so*"))
        found.sort(key=lambda p: not p.endswith("." + major))
        if found:
            return found[0]
    return ctypes.util.find_library("cudart")


class CudaRuntime:
    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(path)
        P, S, I, U = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint

        def fn(name, *argtypes, restype=ctypes.c_int):  # every signature: ctypes' default is int
            f = getattr(lib, name)
            f.argtypes, f.restype = list(argtypes), restype
            return f

        self._error_string = fn("cudaGetErrorString", I, restype=ctypes.c_char_p)
        version = ctypes.c_int()
        get_version = fn("cudaRuntimeGetVersion", ctypes.POINTER(I))
        self._check(get_version(ctypes.byref(version)), "cudaRuntimeGetVersion")
        self.version = version.value  # e.g. 12080 for 12.8, 13000 for 13.0
        self._malloc = fn("cudaMallocManaged", ctypes.POINTER(P), S, U)
        self._free = fn("cudaFree", P)
        self._attribute = fn("cudaDeviceGetAttribute", ctypes.POINTER(I), I, I)
        # CUDA 13 replaced the int device of prefetch/advise with a cudaMemLocation struct (+ flags
        # for prefetch)
        if self.version >= 13000:
            self._prefetch = fn("cudaMemPrefetchAsync", P, S, cudaMemLocation, U, P)
            self._advise = fn("cudaMemAdvise", P, S, I, cudaMemLocation)
        else:
            self._prefetch = fn("cudaMemPrefetchAsync", P, S, I, P)
            self._advise = fn("cudaMemAdvise", P, S, I, I)
        self._concurrent = {}  # device index -> bool, asked once

    def _check(self, err, call):
        if err != 0:
            why = self._error_string(err).decode()
            raise RuntimeError(f"CUDA runtime call {call} failed: error {err} ({why})")

    def _location(self, device):  # device index, or -1 (cudaCpuDeviceId) for host memory
        if self.version >= 13000:
            kind = cudaMemLocationTypeHost if device < 0 else cudaMemLocationTypeDevice
            return cudaMemLocation(kind, device)
        return device

    def malloc_managed(self, nbytes):
        ptr = ctypes.c_void_p()
        err = self._malloc(ctypes.byref(ptr), nbytes, cudaMemAttachGlobal)
        self._check(err, f"cudaMallocManaged({nbytes})")
        return ptr.value

    def free(self, ptr):
        err = self._free(ptr)  # cudaFree synchronizes the device: no kernel still uses the pages
        if err != cudaErrorCudartUnloading:  # at exit the runtime may be gone: nothing to free
            self._check(err, "cudaFree")

    def prefetch(self, ptr, nbytes, device, stream):  # stream-ordered: later kernels find the pages
        args = (0, stream) if self.version >= 13000 else (stream,)  # flags = 0 on CUDA 13
        err = self._prefetch(ptr, nbytes, self._location(device), *args)
        self._check(err, "cudaMemPrefetchAsync")

    def advise(self, ptr, nbytes, advice, device):
        self._check(self._advise(ptr, nbytes, advice, self._location(device)), "cudaMemAdvise")

    def concurrent_managed_access(self, device):
        if device not in self._concurrent:
            value = ctypes.c_int()
            err = self._attribute(ctypes.byref(value), cudaDevAttrConcurrentManagedAccess, device)
            self._check(err, "cudaDeviceGetAttribute(cudaDevAttrConcurrentManagedAccess)")
            self._concurrent[device] = value.value == 1
        return self._concurrent[device]


_runtime = None  # the binding, created by cudart() on first CUDA use; stays None on CPU-only runs


def cudart():
    global _runtime
    if _runtime is None:
        path = find_libcudart()
        if path is None:
            raise RuntimeError("cuda_runtime: libcudart not found (not loaded by torch, not in "
                               "torch/lib, nvidia/*/lib or the system library path); is this "
                               "a CUDA build of torch?")
        _runtime = CudaRuntime(path)
    return _runtime
