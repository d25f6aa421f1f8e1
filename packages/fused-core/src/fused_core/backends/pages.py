"""Moving a large CPU parameter into a flat buffer without holding it twice.

Adopting a parameter copies it into its slot, then re-points it there, and its old storage is
freed. Copied in one piece, the parameter exists twice for a moment: the first step of a
momentum-free optimizer would peak at the parameters' bytes plus the largest parameter. Instead
:func:`copy_releasing` copies a parameter that alone holds its storage piece by piece and gives
each copied piece's pages back to the kernel (``madvise(MADV_DONTNEED)``) before the next
piece: the peak grows by one piece (:data:`PIECE_BYTES`), whatever the parameter's size.

Only memory nobody else can read is given back: the parameter must be the only tensor over its
storage (no view, no ``.data`` alias, no ``state_dict()`` entry kept), and only whole pages
inside its own bytes are released. Anywhere ``madvise`` is unavailable the copy is one piece.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

PIECE_BYTES = 8 << 20
"""Bytes copied between two releases; parameters under two pieces are copied whole."""
_MADV_DONTNEED = 4


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def sole_owner(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the only tensor over its storage (not a view, nothing else shares it),
    so re-pointing it (``tensor.data = ...``) or releasing its pages cannot be seen through
    another tensor (what :func:`copy_releasing` needs, and what binding a gradient needs)."""
    if tensor._is_view():
        return False
    # The tensor's own reference, and the one of the storage object made to ask.
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2


def copy_releasing(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Copy the dense CPU tensor ``source`` into ``target`` (one dimension, ``source.numel()``
    elements, in ``source``'s memory order), releasing ``source``'s pages as they are copied.

    ``source`` must be :func:`sole_owner` of its storage and about to be re-pointed: the released
    part of it reads as zeros. Interrupted (``KeyboardInterrupt``), it completes the copy before
    the exception goes on, so that ``target`` holds every value. Returns False, having copied
    nothing, where this does not apply (small tensor, no ``madvise``): copy in one piece."""
    nbytes = source.numel() * source.element_size()
    release = _madvise()
    if release is None or nbytes < 2 * PIECE_BYTES:
        return False
    memory = source.as_strided((source.numel(),), (1,), source.storage_offset())
    page = mmap.PAGESIZE
    base = source.data_ptr()
    released = -(-base // page) * page  # first whole page inside the tensor
    step = PIECE_BYTES // source.element_size()
    copied = 0
    try:
        for start in range(0, source.numel(), step):
            end = min(start + step, source.numel())
            target[start:end].copy_(memory[start:end])
            copied = end
            upto = (base + end * source.element_size()) // page * page
            if upto > released:
                release(released, upto - released, _MADV_DONTNEED)  # an error only keeps the pages
                released = upto
    except BaseException:
        target[copied:].copy_(memory[copied:])
        raise
    return True
