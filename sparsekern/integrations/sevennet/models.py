"""SevenNet models (``7net-0`` and ``7net-l3i5`` ship in the sevenn wheel)."""

from __future__ import annotations

import torch


def load_sevennet(name: str = "7net-0", device: str = "cpu") -> torch.nn.Module:
    """SevenNet model (``7net-0`` ships in the sevenn wheel)."""
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(name, device=device).model
