# Paged AdamW: AdamW whose fp32 moments live in CUDA managed (unified) memory, so that under GPU
# memory pressure the driver pages them out to host RAM instead of the step failing with
# out-of-memory. This is the "paged optimizer" of QLoRA (Dettmers et al. 2023, section 3) as
# bitsandbytes' PagedAdamW32bit implements it, written with torch + ctypes only: managed memory from
# the CUDA runtime torch already loaded (cuda_runtime.py: cudaMallocManaged, cudaMemPrefetchAsync),
# a zero-copy torch view of it (__cuda_array_interface__), and the exact update of torch.optim.AdamW
# (_single_tensor_adam). Managed memory is invisible to torch.cuda's memory stats and to
# set_per_process_memory_fraction: that is the point, and also why we check free memory ourselves.
# PagedAdamW8bit is bitsandbytes' PagedAdamW8bit: the same update with both moments stored
# blockwise in 8 bits (Dettmers et al. 2022), a quarter of the memory, quantized in plain torch.
import math

import torch

import qlora as Q
from cuda_runtime import cudart

# -----------------------------------------------------------------------------
# managed tensors: torch tensors over cudaMallocManaged memory


class ManagedBuffer:
    """Owns one managed allocation. torch.as_tensor keeps a reference to it for as long as any
    tensor (or view) of the memory lives, so __del__ runs once, after the last one dies, and frees
    the pages exactly once."""
    frees = 0  # number of cudaFree calls made, for tests

    def __init__(self, nbytes):
        self.ptr = None  # set first, so __del__ has nothing to free if the allocation fails
        self.ptr = cudart().malloc_managed(nbytes)
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "version": 3,
                                         "data": (self.ptr, False)}  # (pointer, read_only)

    def __del__(self):
        if self.ptr is not None:
            cudart().free(self.ptr)
            self.ptr = None
            ManagedBuffer.frees += 1


def managed_tensor(shape, dtype, device):
    """Zero-filled tensor of `shape` and `dtype` on CUDA `device`, backed by managed memory."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"managed memory is CUDA memory, got device {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    device, nbytes = torch.device("cuda", index), math.prod(shape) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if not 0 < nbytes <= free:  # oversubscribing managed memory at allocation can stall the GPU
        raise RuntimeError(f"managed_tensor: refusing to allocate {nbytes} bytes of managed memory "
                           f"on {device} with {free} bytes free")
    with torch.cuda.device(device):  # the pointer's device (what torch reads back) is the current
        buf = ManagedBuffer(nbytes)
        t = torch.as_tensor(buf, device=device)  # (nbytes,) uint8, zero copy (typestr via numpy)
    return t.view(dtype).view(shape).zero_()  # zero_ on the current stream maps the pages on GPU


def prefetch(t, device=None):
    """Queue a migration of managed tensor t's pages to `device` (its own; "cpu": host RAM)."""
    device = t.device if device is None else torch.device(device)
    index = -1 if device.type == "cpu" else device.index  # -1 = cudaCpuDeviceId
    stream = torch.cuda.current_stream(t.device).cuda_stream
    cudart().prefetch(t.data_ptr(), t.numel() * t.element_size(), index, stream)


# -----------------------------------------------------------------------------
# 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each
# moment in blocks of 256 values over its flattened elements, one fp32 absmax a block and a uint8
# code a value, by qlora.quantize_blockwise (the quantizer of double quantization). exp_avg takes
# the signed dynamic map (qlora.DYNAMIC); exp_avg_sq, never negative, the unsigned one, which
# spends the sign bit on twice the fractions per exponent. Both are bitsandbytes' bit for bit.

STATE_BLOCKSIZE = 256  # bitsandbytes' blockwise optimizers (optimizer.py: blocksize = 256)
SIGNED_MAP, UNSIGNED_MAP = Q.DYNAMIC, Q.dynamic_map(signed=False)

# -----------------------------------------------------------------------------
# the optimizers


class PagedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction), with fp32 moments kept in
    managed memory for CUDA parameters of at least `page_threshold` elements (bitsandbytes' rule:
    small tensors are not worth paging)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_threshold=100_000, paged=True, **extra):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        page_threshold=page_threshold, paged=paged, **extra)
        super().__init__(params, defaults)

    @staticmethod
    def _is_paged(p, group):
        return group["paged"] and p.is_cuda and p.numel() >= max(group["page_threshold"], 1)

    def _zeros(self, p, group, shape, dtype, pageable=True):  # paged or not by the rule above
        if pageable and self._is_paged(p, group):
            return managed_tensor(shape, dtype, p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _layout(self, p, group):  # a parameter's state: name -> (shape, dtype, pageable)
        return {"exp_avg": (p.shape, torch.float32, True),  # 32-bit: two fp32 moments like p
                "exp_avg_sq": (p.shape, torch.float32, True)}

    def _moments(self, state):  # fp32 m, v to update in place
        return state["exp_avg"], state["exp_avg_sq"]

    def _store(self, state, m, v):  # 32-bit: m and v are the state itself, nothing to write back
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:  # step: a CPU fp32 scalar, as torch's non-capturable AdamW keeps it
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for name, (shape, dtype, pageable) in self._layout(p, group).items():
                        state[name] = self._zeros(p, group, shape, dtype, pageable)
                if self._is_paged(p, group) and cudart().concurrent_managed_access(p.device.index):
                    for name, (_, _, pageable) in self._layout(p, group).items():
                        if pageable:
                            prefetch(state[name])  # evicted pages back before the kernels below
                m, v = self._moments(state)
                state["step"] += 1
                step = state["step"].item()
                # the maths in fp32 even for bf16/fp16 params: the update lr*m/sqrt(v) is far below
                # bf16's resolution near 1, so it must be accumulated in fp32 and rounded once on
                # write-back
                p32 = p if p.dtype == torch.float32 else p.float()
                g = p.grad.float()  # no copy when already fp32
                # the same operations in the same order as torch's _single_tensor_adam, so results
                # match bitwise
                if wd != 0:
                    p32.mul_(1 - lr * wd)  # decoupled weight decay: p <- p (1 - lr wd), not via g
                m.lerp_(g, 1 - beta1)  # m <- b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v <- b2 v + (1 - b2) g^2
                bias_correction1 = 1 - beta1 ** step  # m, v start at 0: divide out that bias
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)  # sqrt(v_hat) + eps
                p32.addcdiv_(m, denom, value=-step_size)  # p <- p - lr m_hat / (sqrt(v_hat) + eps)
                if p32 is not p:
                    p.copy_(p32)
                self._store(state, m, v)
        return loss

    def state_dict(self):
        # checkpoints hold plain CPU tensors: never managed memory, loadable on a machine without a
        # GPU
        sd = super().state_dict()
        sd["state"] = {k: {name: x.cpu() if torch.is_tensor(x) else x for name, x in s.items()}
                       for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        # torch's loader would cast the states to the param's dtype and device (bf16 moments,
        # allocated in torch's pool); give it only the step counters, then rebuild the states in
        # (managed) memory ourselves
        saved = state_dict["state"]
        steps = {k: {"step": torch.tensor(float(s["step"]), dtype=torch.float32)}
                 for k, s in saved.items()}
        # (settings another optimizer lacks: this one's defaults)
        groups = [{**self.defaults, **g} for g in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "state": steps, "param_groups": groups})
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, k in zip(group["params"], saved_group["params"]):
                if k not in saved:  # a param that had no gradient yet has no state
                    continue
                layout = self._layout(p, group)
                if sorted(layout) != sorted(n for n in saved[k] if n != "step"):
                    raise ValueError(f"{type(self).__name__}: the saved state of parameter {k} "
                                     f"holds {sorted(saved[k])}, this optimizer keeps "
                                     f"{sorted(layout)}: it was saved by another optimizer (32-bit "
                                     "and 8-bit states do not convert)")
                for name, (shape, dtype, pageable) in layout.items():
                    t = saved[k][name]
                    if t.shape != shape or t.dtype != dtype:
                        raise ValueError(f"{type(self).__name__}: saved {name} of parameter {k} "
                                         f"is {t.dtype} {list(t.shape)}, expected {dtype} "
                                         f"{list(shape)}")
                    self.state[p][name] = self._zeros(p, group, shape, dtype, pageable).copy_(t)


class PagedAdamW8bit(PagedAdamW):
    """bitsandbytes' PagedAdamW8bit: the same AdamW update, with both moments stored blockwise in 8
    bits (uint8 codes in managed memory, like the fp32 moments of PagedAdamW, plus one fp32 absmax
    per 256 values): 2.03 bytes per trained parameter instead of 8. Each step dequantizes a
    parameter's moments to fp32, updates them and the parameter exactly as PagedAdamW does, and
    quantizes them back; so the only difference from PagedAdamW is the rounding of the stored
    moments. Parameters under `min_8bit_size` elements keep fp32 moments (bitsandbytes' rule: for
    them the absmax overhead is large and the saving nil)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_threshold=100_000, paged=True, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, page_threshold, paged,
                         min_8bit_size=min_8bit_size)
        self.maps = {}  # device -> (signed, unsigned) map there: copied once, not every step

    def _maps(self, device):
        if device not in self.maps:
            self.maps[device] = SIGNED_MAP.to(device), UNSIGNED_MAP.to(device)
        return self.maps[device]

    def _layout(self, p, group):
        if p.numel() < group["min_8bit_size"]:
            return super()._layout(p, group)
        nb = (-(-p.numel() // STATE_BLOCKSIZE),)
        return {"exp_avg": (p.shape, torch.uint8, True),
                "exp_avg_absmax": (nb, torch.float32, False),
                "exp_avg_sq": (p.shape, torch.uint8, True),
                "exp_avg_sq_absmax": (nb, torch.float32, False)}

    def _moments(self, state):
        if state["exp_avg"].dtype == torch.float32:
            return super()._moments(state)
        signed, unsigned = self._maps(state["exp_avg"].device)
        return (Q.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed),
                Q.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], unsigned))

    def _store(self, state, m, v):
        if state["exp_avg"].dtype == torch.uint8:  # requantized in place: the same memory
            signed, unsigned = self._maps(m.device)
            Q.quantize_blockwise(m, signed, out=state["exp_avg"], absmax=state["exp_avg_absmax"])
            Q.quantize_blockwise(v, unsigned, out=state["exp_avg_sq"],
                                 absmax=state["exp_avg_sq_absmax"])


def state_bytes(numel, bits=32, min_8bit_size=4096):
    """Bytes of one parameter's optimizer states: two fp32 moments, or two uint8 code tensors and
    their fp32 absmax (for parameters of at least min_8bit_size elements). For the memory plan."""
    if bits == 32 or numel < min_8bit_size:
        return 8 * numel
    return 2 * (numel + 4 * -(-numel // STATE_BLOCKSIZE))
