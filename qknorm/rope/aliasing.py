"""Whether two strided tensors share memory, from their byte spans (no data read).

Each tensor is seen as ``rows`` equally spaced byte windows: the rows are its dimension of
largest stride, a window spans all its other dimensions. For two tensors with equal row
strides the answer is exact at window granularity, which covers what calls pass: q, k and v
views of one packed ``[T, (Hq + 2 Hk) * D]`` buffer (rows = tokens), and k/v cache views of
one ``[num_blocks, 2, block_size, Hk, D]`` allocation, NHD or HND (rows = blocks). Otherwise
the tensors' whole spans are compared, which may report an overlap that is not there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:  # private torch API (2.1+); if it moves, the data_ptr() probe in storage_less still applies
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # pragma: no cover

    def is_fake(x: object) -> bool:  # type: ignore[misc]
        return False


__all__ = ["overlaps", "same_view", "storage_less"]


def _rows(t: torch.Tensor) -> tuple[int, int, int, int]:
    """``(start, rows, row stride, window)`` in bytes; one row when no dimension separates windows."""
    es = t.element_size()
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s > 1), reverse=True)
    span = 1 + sum(st * (s - 1) for st, s in dims)  # elements from the first to the last
    if dims:
        stride, rows = dims[0]
        window = span - stride * (rows - 1)
        if window <= stride:
            return t.data_ptr(), rows, stride * es, window * es
    return t.data_ptr(), 1, 0, span * es


def overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True when ``x`` and ``y`` may share a byte (exact for equal row strides, see the module)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    a0, ra, sa, wa = _rows(x)
    b0, rb, sb, wb = _rows(y)
    if a0 + (ra - 1) * sa + wa <= b0 or b0 + (rb - 1) * sb + wb <= a0:
        return False
    if ra == 1 or rb == 1 or sa != sb:
        return True
    # Row i of x and row j of y collide iff some k = i - j in [-(rb-1), ra-1] puts the windows
    # on top of each other: -(wb-1) <= d - k*s <= wa-1 with d = b0 - a0.
    s, d = sa, b0 - a0
    k_lo = max(-(rb - 1), -((-(d - wa + 1)) // s))  # ceil((d - wa + 1) / s)
    k_hi = min(ra - 1, (d + wb - 1) // s)
    return k_lo <= k_hi


def same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The same elements in the same order: pointer, shape, strides and dtype equal."""
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype


def storage_less(tensors: Iterable[torch.Tensor]) -> bool:
    """True when some tensor has no real memory (fake tensors while tracing, functional wrappers).

    torch 2.13 returns 0 from a fake tensor's data_ptr() (with a warning) instead of raising, so ask first.
    """
    tensors = tuple(tensors)
    if any(is_fake(t) for t in tensors):
        return True
    try:
        for t in tensors:
            t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return True
    return False
