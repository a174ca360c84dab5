"""Backend ``torch``: the pure-PyTorch reference, available everywhere PyTorch runs."""

from __future__ import annotations

from ..reference import qk_rmsnorm_reference
from ..request import QKNormRequest

__all__ = ["TorchBackend"]


class TorchBackend:
    """SPEC §4 in plain PyTorch ops (:mod:`qknorm.reference`): every mode, every device."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        return True, "pure PyTorch, runs on every device"

    def supports(self, req: QKNormRequest) -> str | None:
        return None

    def run(self, req: QKNormRequest) -> None:
        qk_rmsnorm_reference(req)
