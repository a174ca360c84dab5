"""Backend ``torch`` of ``qk_norm_rope``: the reference itself (every device; checks indices on every call)."""

from __future__ import annotations

import torch

from .reference import qk_norm_rope_reference
from .request import RopeRequest

__all__ = ["RopeTorchBackend"]


class RopeTorchBackend:
    """:func:`qknorm.rope.reference.qk_norm_rope_reference` as a backend."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, f"torch {torch.__version__} (reference implementation)"

    def supports(self, req: RopeRequest) -> str | None:
        return None

    def run(self, req: RopeRequest) -> None:
        qk_norm_rope_reference(req)
