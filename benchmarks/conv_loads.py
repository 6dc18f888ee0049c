"""Bytes the Triton conv kernels ask the memory system for, counted on the CPU.

Runs MACE-MP-0 medium's two conv layers (float32, 128 channels, l <= 3) on a 27-atom
crystal through ``sparsekern.ops.triton.conv`` under Triton's interpreter and counts, per
kernel, every load it issues: the bytes requested (unmasked elements x element size:
what a GPU serves from L1, L2 or DRAM), the 32-byte sectors each load instruction touches
(what the memory system moves for it when nothing is cached between instructions: equal
to the bytes requested where a load is contiguous, up to 8x them where it reads one
float in a sector), against the distinct bytes (what must come from DRAM at least once),
the load instructions per program and the bytes stored. A proxy for the kernels' traffic
through the caches and their instruction count, not a timing.

    .venv-mace/bin/python benchmarks/conv_loads.py
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import collections  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Loads:
    """Per kernel name: programs run, load instructions, bytes requested, addresses read."""

    def __init__(self):
        self.by_kernel = collections.defaultdict(lambda: dict(programs=0, loads=0, requested=0, sectors=0,
                                                              addresses={}, stored=0))
        self.current = None

    def __enter__(self):
        B, G = interpreter.InterpreterBuilder, interpreter.GridExecutor
        self._saved = (B.create_masked_load, B.create_masked_store, B.set_grid_idx, G.__call__)
        load, store, grid_idx, call = self._saved
        me = self

        def counted_load(builder, ptrs, mask, other, *args):
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            k = me.by_kernel[me.current]
            k["loads"] += 1
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            k["requested"] += int(m.sum()) * size
            k["sectors"] += len(np.unique(ptrs.data[m] // 32))
            k["addresses"].update(dict.fromkeys(ptrs.data[m].tolist(), size))
            return load(builder, ptrs, mask, other, *args)

        def counted_store(builder, ptrs, value, mask, *args):
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            me.by_kernel[me.current]["stored"] += int(m.sum()) * size
            return store(builder, ptrs, value, mask, *args)

        def counted_program(builder, *idx):
            me.by_kernel[me.current]["programs"] += 1
            return grid_idx(builder, *idx)

        def named_call(executor, *args, **kwargs):
            me.current = executor.fn.__name__
            return call(executor, *args, **kwargs)

        B.create_masked_load, B.create_masked_store, B.set_grid_idx, G.__call__ = (
            counted_load, counted_store, counted_program, named_call)
        return self

    def __exit__(self, *exc):
        B, G = interpreter.InterpreterBuilder, interpreter.GridExecutor
        B.create_masked_load, B.create_masked_store, B.set_grid_idx, G.__call__ = self._saved


def main() -> None:
    from ase.build import bulk

    import sparsekern
    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped
    from sparsekern.ops.descriptors import TPDesc
    from sparsekern.ops.triton.conv import conv

    model = mace_mp0_shaped("medium", dtype=torch.float32)
    sparsekern.patch(model, backend="torch")
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    atoms.rattle(0.05, seed=0)
    edge_index = mace_batch(model, [atoms])["edge_index"]
    n, e = len(atoms), edge_index.shape[1]
    descs = [m.desc for m in model.modules() if isinstance(getattr(m, "desc", None), TPDesc)]
    print(f"MACE-MP-0 medium conv layers, float32, {n} atoms, {e} edges; per edge:\n")
    print("| layer | pass | kernel | programs | loads per program | requested kB per edge | sectors kB per edge | "
          "distinct kB per edge | requested / distinct | stored kB per edge |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for layer, desc in enumerate(descs):
        x = torch.randn(n, desc.irreps_in1.dim, generator=g, requires_grad=True)
        y = torch.randn(e, desc.irreps_in2.dim, generator=g, requires_grad=True)
        w = torch.randn(e, desc.weight_numel, generator=g, requires_grad=True)
        conv(desc, x, y, w, edge_index)  # the edge orderings, built once per graph
        with Loads() as fwd:
            out = conv(desc, x, y, w, edge_index)
        with Loads() as bwd:
            out.backward(torch.randn(out.shape, generator=g))
        for name, counts in (("forward", fwd), ("backward", bwd)):
            for kernel, k in counts.by_kernel.items():
                distinct = sum(k["addresses"].values())
                print(f"| {layer} | {name} | {kernel} | {k['programs']} | {k['loads'] / k['programs']:.0f} | "
                      f"{k['requested'] / e / 1e3:.2f} | {32 * k['sectors'] / e / 1e3:.2f} | {distinct / e / 1e3:.2f} | {k['requested'] / distinct:.1f} | "
                      f"{k['stored'] / e / 1e3:.2f} |")


if __name__ == "__main__":
    main()
