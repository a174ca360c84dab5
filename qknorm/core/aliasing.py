"""The aliasing check: no output may share a byte with another tensor of the call.

The exceptions are the in-place forms an operator allows (``k_out`` is ``k``, ...), which must
be exactly the same view. Whether two tensors overlap depends on their signatures (shapes,
strides, dtypes: fixed per plan) and on where they are in memory (checked on every call), so
:class:`AliasCheck` is built once per plan and called once per call. Its common case, disjoint
byte spans, costs two integer comparisons per pair; interleaved views of one buffer (``q_out``
and ``k_out`` as column slices of one allocation, say) get the exact row-by-row answer, cached
per relative offset because for fixed signatures that offset decides it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .signature import TensorSpec

__all__ = ["AliasCheck", "overlaps"]

# Verdicts remembered per plan (pointer tuples known good; exact answers per pair and offset);
# past this many a memo starts over.
_MAX_VERDICTS = 256


def _window(t: TensorSpec, start: int) -> tuple[int, int, int, int]:
    """Byte window of a tensor as (start, rows, row stride, row width), all in bytes.

    The rows are the dimension of largest stride; a row's window spans all the other
    dimensions. When windows of consecutive rows would overlap, the whole span is one row.
    For 2-D views this is the row-major (or column-major) reading; for N-D it makes q/k/v
    views of one packed ``[T, H * D]`` buffer and k/v views of one ``[blocks, 2, ...]`` cache
    allocation exact as well.
    """
    es = t.element_size()
    dims = sorted(((st, n) for n, st in zip(t.shape, t.strides) if n > 1), reverse=True)
    if not dims:
        return start, 1, 0, es
    span = 1 + sum(st * (n - 1) for st, n in dims)  # elements from the first to the last
    stride, rows = dims[0]
    width = span - stride * (rows - 1)
    if width <= stride:
        return start, rows, stride * es, width * es
    return start, 1, 0, span * es  # rows interleave: the whole span


def overlaps(x: TensorSpec, x_ptr: int, y: TensorSpec, y_ptr: int) -> bool:
    """Whether two tensors share at least one byte (exact at window granularity for equal row strides, else by span)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    a0, ra, sa, wa = _window(x, x_ptr)
    b0, rb, sb, wb = _window(y, y_ptr)
    if a0 + (ra - 1) * sa + wa <= b0 or b0 + (rb - 1) * sb + wb <= a0:
        return False
    if ra == 1 or rb == 1 or sa != sb or wa > sa or wb > sb:
        return True
    # Rows i of x and j of y collide iff some t = i - j in [-(rb-1), ra-1] puts the column
    # ranges on top of each other: -(wb-1) <= d - t*s <= wa-1 with d = b0 - a0.
    s, d = sa, b0 - a0
    t_lo = max(-(rb - 1), -((-(d - wa + 1)) // s))  # ceil((d - wa + 1) / s)
    t_hi = min(ra - 1, (d + wb - 1) // s)
    return t_lo <= t_hi


class AliasCheck:
    """Checks one plan's outputs against every other tensor of a call.

    Parameters
    ----------
    names : the field names of the call's tensor slots, in order.
    specs : each slot's :class:`TensorSpec` (None where absent).
    outputs : the names of the slots the operator writes.
    in_place : (output, input) pairs that may be exactly the same view.
    """

    __slots__ = ("_good", "_in_place", "_names", "_outputs", "_pairs", "_slots", "_specs", "_verdicts")

    def __init__(
        self,
        names: Sequence[str],
        specs: Sequence[TensorSpec | None],
        outputs: frozenset[str],
        in_place: frozenset[tuple[str, str]],
    ) -> None:
        present = [i for i, s in enumerate(specs) if s is not None and s.numel() > 0]
        pairs = []
        for ia in present:
            if names[ia] not in outputs:
                continue
            for ib in present:
                if ib == ia or (names[ib] in outputs and ib < ia):
                    continue  # each pair of outputs once
                a, b = specs[ia], specs[ib]
                same_view_ok = (names[ia], names[ib]) in in_place and a[1:] == b[1:] if a and b else False
                pairs.append((ia, ib, a.extent(), b.extent(), same_view_ok))  # type: ignore[union-attr]
        self._slots = tuple(sorted({i for p in pairs for i in p[:2]}))
        pos = {slot: j for j, slot in enumerate(self._slots)}  # pairs index the pointer list
        self._pairs = tuple((pos[a], pos[b], ea, eb, ok) for a, b, ea, eb, ok in pairs)
        self._good: set[tuple[int, ...]] = set()  # pointer tuples whose verdict was "no overlap"
        self._names, self._specs, self._outputs, self._in_place = tuple(names), tuple(specs), outputs, in_place
        self._verdicts: dict[tuple[int, int, int], bool] = {}

    def __call__(self, tensors: Sequence[Any], display: Mapping[str, str] | None = None) -> None:
        """Raise ``ValueError`` when an output overlaps another tensor (``display`` renames fields in the message)."""
        ptr = tuple([tensors[i].data_ptr() for i in self._slots])
        if ptr in self._good:  # the verdict is a function of the pointers (the plan fixes the rest)
            return
        for a, b, ext_a, ext_b, same_view_ok in self._pairs:
            pa, pb = ptr[a], ptr[b]
            if pa + ext_a <= pb or pb + ext_b <= pa or (same_view_ok and pa == pb):
                continue
            ia, ib = self._slots[a], self._slots[b]
            key = (ia, ib, pb - pa)
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = not overlaps(self._specs[ia], pa, self._specs[ib], pb)  # type: ignore[arg-type]
                if len(self._verdicts) >= _MAX_VERDICTS:
                    self._verdicts.clear()
                self._verdicts[key] = verdict
            if not verdict:
                self._raise(ia, ib, display or {})
        if len(self._good) >= _MAX_VERDICTS:
            self._good.clear()
        self._good.add(ptr)

    def _raise(self, ia: int, ib: int, display: Mapping[str, str]) -> None:
        a, b = self._names[ia], self._names[ib]
        name = lambda n: display.get(n, n)
        if b in self._outputs:
            raise ValueError(f"{name(a)} and {name(b)} must not overlap in memory")
        forms = sorted(name(i) for o, i in self._in_place if o == a)
        hint = f" (in place it may only be exactly the same view as {' or '.join(forms)})" if forms else ""
        raise ValueError(f"{name(a)} must not overlap input {name(b)}{hint}")
