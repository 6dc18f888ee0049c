"""SevenNet models (``7net-0``, ``7net-l3i5`` and the multi-fidelity ``7net-mf-0`` ship in
the sevenn wheel)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch


def load_sevennet(name: str = "7net-0", device: str = "cpu") -> torch.nn.Module:
    """SevenNet model ``name`` (a name or a .pth checkpoint), as ``SevenNetCalculator``
    loads it. A multi-fidelity model computes at the modality each graph names
    (``KEY.DATA_MODALITY``; ``modalities``)."""
    model = checkpoint(name).build_model()
    model.set_is_batch_data(False)
    return model.to(device).eval()


def modalities(name: str) -> List[str]:
    """The modalities (fidelities) of SevenNet model ``name``, sorted; [] for a model of one."""
    import sevenn._keys as KEY

    return sorted(checkpoint(name).config.get(KEY.MODAL_MAP) or {})


def checkpoint(name: str):
    """sevenn's checkpoint of ``name``, read (sevenn reads the file at its first use), or
    a one-line error."""
    from sevenn import util

    try:
        loaded = util.load_checkpoint(name)
        loaded.config  # noqa: B018  (reads the file: a damaged one fails here)
        return loaded
    except Exception as exc:  # a name sevenn lacks, a download that failed, a damaged or foreign file
        offline = isinstance(exc, OSError) and not Path(name).exists()  # (requests' errors are OSErrors)
        advice = (" (sevenn downloads some models the first time: without internet, give 7net-0, 7net-l3i5, "
                  "7net-mf-0 or a .pth checkpoint)") if offline else ""
        raise ValueError(f"SevenNet model {name!r}: {' '.join(str(exc).split())}{advice}") from exc


def calculator(*args, **kwargs):
    """SevenNetCalculator, without its advice to enable a tensor-product accelerator:
    sparsekern hands it a patched model (already accelerated) or the plain merged model
    it checks on purpose. Its refusals (a multi-fidelity model without its ``modal``, or
    with one it lacks) in one line."""
    import warnings

    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No tensor product accelerator", category=UserWarning)
        try:
            return SevenNetCalculator(*args, **kwargs)
        except ValueError as exc:
            raise ValueError(f"SevenNetCalculator: {' '.join(str(exc).split())}") from exc
