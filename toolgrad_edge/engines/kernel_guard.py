"""The kernel guard: llama.cpp's list of extra CPU buffer types edited before any model loads.

``hardware.kernel_plan`` decides, from figures, which of llama.cpp's kernels to avoid on this CPU
(its AMX kernels crash on the first prompt on Sapphire Rapids class Xeons, llama.cpp issue #20824).
This module carries the plan out where models are loaded: it takes the avoided buffer types out of
the CPU device's null-terminated list of extra buffer types (``ggml_backend_dev_get_extra_bufts``,
the array llama.cpp's loader reads) through ctypes, and sets ``use_extra_bufts`` on the model
parameters of every model this project loads (``apply_kernel_plan``, ``load_llama``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Sequence

from ..hardware import ENV_AMX, ENV_REPACK, KernelPlan, ggml_device_api, kernel_plan, plan_after_edit, system_info

# What reading the list can raise where llama-cpp-python's ggml library or one of its calls is missing.
LOAD_ERRORS = (ImportError, OSError, AttributeError, ValueError)


def _extra_buffer_list():
    """The CPU device's null-terminated array of extra buffer types (llama.cpp's loader reads this same
    array), or None when this llama.cpp has no CPU device; an empty tuple when it lists none."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    lib = ggml_device_api()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return None
    reg = lib.ggml_backend_dev_backend_reg(dev)
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not address:
        return ()
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    return get_extra(dev) or ()


def _entries(array) -> list[int]:
    out, i = [], 0
    while array and array[i]:
        out.append(array[i])
        i += 1
    return out


def _names(entries: Sequence[int]) -> list[str]:
    lib = ggml_device_api()
    return [lib.ggml_backend_buft_name(entry).decode(errors="replace") for entry in entries]


def read_extra_buffer_types() -> list[str] | None:
    """The names of the CPU device's extra buffer types now listed (e.g. ``AMX``, ``CPU_REPACK``); None when
    this llama.cpp has no CPU device. Raises one of LOAD_ERRORS where ggml's library cannot be used."""
    array = _extra_buffer_list()
    return None if array is None else _names(_entries(array))


def detect_extra_buffer_types() -> list[str] | None:
    """read_extra_buffer_types(), None if unknown (doctor names the reason: its "off" lines)."""
    try:
        return read_extra_buffer_types()
    except LOAD_ERRORS:
        return None


_ORIGINAL_EXTRA: list[int] | None = None  # the list as llama.cpp made it, before any edit here
_EXTRA_LOCK = threading.Lock()


def _remember_original(array) -> list[int]:
    global _ORIGINAL_EXTRA
    if _ORIGINAL_EXTRA is None:
        _ORIGINAL_EXTRA = _entries(array)
    return _ORIGINAL_EXTRA


def original_extra_buffer_types() -> list[str] | None:
    """The CPU device's extra buffer types as llama.cpp listed them, whatever an edit here left (None if unknown)."""
    try:
        with _EXTRA_LOCK:
            array = _extra_buffer_list()
            if array is None:
                return None
            entries = _remember_original(array) if array else []
        return _names(entries)
    except LOAD_ERRORS:
        return None


def restrict_extra_buffer_types(drop: Sequence[str] = ()) -> list[str] | None:
    """Make the CPU device list its extra buffer types minus ``drop`` (by name), in their order.

    The array is llama.cpp's own (a static one the CPU backend hands out); it is rewritten in place, never
    grown, and always from the list as first seen, so ``drop=()`` puts everything back. Models loaded
    afterwards choose their weights' buffer types from what is left; models already loaded keep theirs.
    Returns the names now listed, or None when the list cannot be read.
    """
    try:
        with _EXTRA_LOCK:
            array = _extra_buffer_list()
            if not array:
                return None if array is None else []
            original = _remember_original(array)
            unwanted = {name.upper() for name in drop}
            keep = [entry for entry, name in zip(original, _names(original)) if name.upper() not in unwanted]
            for i in range(len(original)):
                array[i] = keep[i] if i < len(keep) else None
        return detect_extra_buffer_types()
    except LOAD_ERRORS:
        return None


@functools.lru_cache(maxsize=4)
def _detected_plan(opt_in: str, repack: str = "") -> KernelPlan:
    # The plan is made from llama.cpp's own list, whatever an earlier plan in this process left in it, and
    # the list is then written once, to what this plan keeps (no moment with AMX back in it).
    plan = kernel_plan(system_info(), original_extra_buffer_types(), opt_in, repack)
    return plan_after_edit(plan, restrict_extra_buffer_types(plan.dropped))


def detect_kernel_plan() -> KernelPlan:
    """This process's plan (computed once per value of $TOOLGRAD_EDGE_AMX and $TOOLGRAD_EDGE_REPACK)."""
    return _detected_plan(os.environ.get(ENV_AMX, ""), os.environ.get(ENV_REPACK, ""))


def apply_kernel_plan(model_params, plan: KernelPlan | None = None):
    """Set llama_model_params for the plan (every model this project loads goes through here)."""
    plan = plan or detect_kernel_plan()
    model_params.use_extra_bufts = plan.use_extra_bufts
    return model_params


def load_llama(model_path, **kwargs):
    """llama-cpp-python's ``Llama`` with the kernel plan applied (it has no argument for extra buffer types).

    Llama builds its model parameters from ``llama_model_default_params()``; the plan is applied to
    them through a wrapper that stands in for that function while this one object loads.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    plan = detect_kernel_plan()
    if plan.use_extra_bufts:
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    with _LOAD_LOCK:
        original = llama_module.llama_cpp.llama_model_default_params

        def defaults():
            return apply_kernel_plan(original(), plan)

        llama_module.llama_cpp.llama_model_default_params = defaults
        try:
            return llama_cpp.Llama(model_path=str(model_path), **kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = original


_LOAD_LOCK = threading.Lock()
