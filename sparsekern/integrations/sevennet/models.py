"""SevenNet models (``7net-0`` and ``7net-l3i5`` ship in the sevenn wheel)."""

from __future__ import annotations

import torch


def load_sevennet(name: str = "7net-0", device: str = "cpu") -> torch.nn.Module:
    """SevenNet model (``7net-0`` ships in the sevenn wheel)."""
    try:
        return calculator(name, device=device).model
    except ValueError as exc:
        if "modal" in str(exc):  # multi-fidelity: each frame's modality goes into its graph
            raise ValueError(f"SevenNet model {name!r} is multi-fidelity ({' '.join(str(exc).split())}): sparsekern "
                             "does not choose a modality yet; give a single-fidelity model (7net-0, 7net-l3i5, "
                             "a .pth checkpoint)") from exc
        raise ValueError(f"SevenNet model {name!r}: {' '.join(str(exc).split())}") from exc
    except (OSError, RuntimeError) as exc:  # offline (requests' errors are OSErrors)
        raise ValueError(f"SevenNet model {name!r}: {' '.join(str(exc).split())} (sevenn downloads some models the "
                         f"first time: without internet, give 7net-0, 7net-l3i5 or a .pth checkpoint)") from exc


def calculator(*args, **kwargs):
    """SevenNetCalculator, without its advice to enable a tensor-product accelerator:
    sparsekern loads the model through it to patch it, or hands it a patched model
    (already accelerated) or the plain merged model it checks on purpose."""
    import warnings

    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No tensor product accelerator", category=UserWarning)
        return SevenNetCalculator(*args, **kwargs)
