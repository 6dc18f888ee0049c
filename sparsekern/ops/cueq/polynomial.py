"""What the cuEquivariance ops share: the polynomial's torch module, and the change of
layout around it (cuequivariance's kernels flatten ``ir_mul`` blocks, (2l + 1, mul);
the layers' features are e3nn's ``mul_ir``, (mul, 2l + 1))."""

from __future__ import annotations

import importlib.util

import cuequivariance as cue
import cuequivariance_torch as cuet
import torch

from ...paths import Blocks


def module(poly: cue.SegmentedPolynomial, like: torch.Tensor) -> torch.nn.Module:
    """The polynomial as a torch module on ``like``'s device: the ``uniform_1d`` CUDA
    kernel where the ops package is installed and every operand's channel extent is the
    same (MACE's uniform multiplicities), the ``naive`` method otherwise."""
    if like.device.type == "cuda" and importlib.util.find_spec("cuequivariance_ops_torch") is not None:
        try:
            return cuet.SegmentedPolynomial(poly, method="uniform_1d").to(like.device)
        except (AssertionError, ValueError):  # several channel extents: the kernel refuses
            pass
    return cuet.SegmentedPolynomial(poly, method="naive").to(like.device)


def transpose(x: torch.Tensor, blocks: Blocks, to_ir_mul: bool) -> torch.Tensor:
    """``x`` (rows, blocks.dim) from mul_ir to ir_mul blocks, or back."""
    if all(m == 1 or d == 1 for m, d in zip(blocks.muls, blocks.dims)):
        return x  # both layouts agree
    n = x.shape[0]
    return torch.cat([(b.reshape(n, m, d) if to_ir_mul else b.reshape(n, d, m)).transpose(1, 2).reshape(b.shape)
                      for b, m, d in zip(x.split(blocks.sizes, dim=1), blocks.muls, blocks.dims)], 1)
