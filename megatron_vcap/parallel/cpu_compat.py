"""CPU stand-ins for the few CUDA-only calls in Megatron-Core's TP and PP code paths.

Megatron-Core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` and
``.cuda()`` for buffers, the CUDA RNG get/set in ``tensor_parallel.random`` (the model-parallel
RNG tracker), and tensor factories called with ``device="cuda"`` (the pipeline schedules and p2p
communication). With these redirected to the CPU, the real Megatron code runs over gloo, which is
how the distributed tests exercise TP and PP on machines without a GPU.

The layer is installed only when CUDA is absent and refuses to install otherwise; nothing else
in the project patches Megatron or torch.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: TorchFunctionMode | None = None  # the process-wide device redirect, once installed


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal (what torch.cuda.current_device() returns).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=<cuda>`` in tensor factories and ``.to(<cuda>)`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


_ORIG_TENSOR_TYPE = torch.Tensor.type


def _tensor_type_as_cuda(self, *args, **kwargs):
    # Megatron's optimizers dispatch on the legacy type string ("torch.cuda.FloatTensor", ...);
    # report CPU tensors under their CUDA names so the same code path runs. Only the no-argument
    # query form is changed; conversions (``t.type(dtype)``) go through untouched.
    if args or kwargs:
        return _ORIG_TENSOR_TYPE(self, *args, **kwargs)
    name = _ORIG_TENSOR_TYPE(self)
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch.") :]
    return name


def is_active() -> bool:
    return _INSTALLED


def install() -> None:
    """Install the CPU stand-ins (idempotent). Raises if CUDA is available."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat must never be installed on a machine with CUDA")
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: 0
    torch.cuda.get_rng_state = functools.partial(_cpu_get_rng_state)
    torch.cuda.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so these must not recurse.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type_as_cuda
    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _INSTALLED = True


def maybe_install() -> bool:
    """Install when CUDA is absent; returns whether the layer is active."""
    if not torch.cuda.is_available():
        install()
    return _INSTALLED


@contextlib.contextmanager
def device_redirect_suspended():
    """Run a block without the process-wide device redirect (a no-op when it is not installed
    or another mode sits above it on the stack).

    A ``TorchFunctionMode`` costs a Python call on every torch op; in a KV-cached decode step of
    a small model (hundreds of tiny ops per token) that was about half of the CPU time. Only
    code that creates no tensors on a ``"cuda"`` device may run inside: Megatron allocates its
    KV buffers with ``device=torch.cuda.current_device()``, so prefill keeps the redirect.
    """
    try:  # private: the mode stack has no public reader; without it, stay safe and keep the mode
        from torch.overrides import _get_current_function_mode_stack

        stack = _get_current_function_mode_stack()
    except ImportError:
        stack = []
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


@contextlib.contextmanager
def cuda_to_cpu():
    """Scoped version of the device redirect, for code that runs outside ``install()``."""
    with _CudaToCpuMode():
        yield
