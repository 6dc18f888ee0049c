"""Bytes the Triton kernels ask the memory system for, counted on the CPU.

Runs MACE-MP-0 medium's conv layers, irrep linears and symmetric contractions (float32,
128 channels, l <= 3) on a 27-atom crystal through the Triton back end under Triton's
interpreter and counts, per kernel, every load it issues: the bytes requested (unmasked elements x element size:
what a GPU serves from L1, L2 or DRAM), the 32-byte sectors each load instruction touches
(what the memory system moves for it when nothing is cached between instructions: equal
to the bytes requested where a load is contiguous, up to 8x them where it reads one
float in a sector), the sectors each warp's share of it touches (a tile's elements 32 at
a time in row order, the layout Triton gives these tiles: one element per thread, 32
threads along a row, as their TTGIR shows; the L1's work per load grows with them even
where every sector is cached), against the distinct bytes (what must come from DRAM at
least once), the load instructions per program, and the bytes stored with their warps'
sectors. A proxy for the kernels' traffic through the caches and their instruction
count, not a timing. Per edge for the convs, per node for the linears and contractions.

    .venv-mace/bin/python benchmarks/kernel_loads.py [--ops conv,linear,contraction]
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _warp_sectors(ptrs: np.ndarray, mask: np.ndarray) -> int:
    """The distinct 32-byte sectors of each run of 32 elements (row order), summed."""
    # signed: the interpreter's pointers are uint64, where -1 would be a sector of its own
    sec = np.where(mask, ptrs.astype(np.int64) // 32, -1).reshape(-1)
    sec = np.concatenate([sec, np.full(-len(sec) % 32, -1)]).reshape(-1, 32)
    sec.sort(axis=1)
    new = (sec[:, 1:] != sec[:, :-1]) & (sec[:, 1:] >= 0)
    return int(new.sum() + (sec[:, 0] >= 0).sum())


class Loads:
    """Per kernel name: programs run, load instructions, bytes requested, addresses read."""

    def __init__(self):
        self.by_kernel = collections.defaultdict(lambda: dict(programs=0, loads=0, requested=0, sectors=0,
                                                              warp_sectors=0, addresses={}, stored=0,
                                                              stored_warp_sectors=0))
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
            k["warp_sectors"] += _warp_sectors(ptrs.data, m)
            k["addresses"].update(dict.fromkeys(ptrs.data[m].tolist(), size))
            return load(builder, ptrs, mask, other, *args)

        def counted_store(builder, ptrs, value, mask, *args):
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            me.by_kernel[me.current]["stored"] += int(m.sum()) * size
            me.by_kernel[me.current]["stored_warp_sectors"] += _warp_sectors(ptrs.data, m)
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


_HEAD = ("| layer | pass | kernel | programs | loads per program | requested kB | sectors kB | warp sectors kB | "
         "distinct kB | requested / distinct | stored kB | stored warp sectors kB |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _rows(layer, passes, per: int) -> None:
    """One row per (pass, kernel), bytes per ``per`` (edges or nodes)."""
    for name, counts in passes:
        for kernel, k in counts.by_kernel.items():
            distinct = sum(k["addresses"].values())
            kb = [f"{b / per / 1e3:.2f}" for b in (k["requested"], 32 * k["sectors"], 32 * k["warp_sectors"], distinct)]
            print(f"| {layer} | {name} | {kernel} | {k['programs']} | {k['loads'] / k['programs']:.0f} | "
                  f"{' | '.join(kb)} | {k['requested'] / distinct:.1f} | {k['stored'] / per / 1e3:.2f} | "
                  f"{32 * k['stored_warp_sectors'] / per / 1e3:.2f} |")


def _passes(run, g, double=()):
    """Loads of run()'s forward and of its backward (all input gradients); with
    ``double`` (the inputs), of the double backward too: a loss on the gradients of
    (out * out).sum() differentiated again (as in force training, the output's gradient
    depends on the inputs)."""
    run()  # plans built once per graph
    with Loads() as fwd:
        out = run()
    with Loads() as bwd:
        out.backward(torch.randn(out.shape, generator=g))
    passes = [("forward", fwd), ("backward", bwd)]
    if double:
        out = run()
        grads = torch.autograd.grad((out * out).sum(), double, create_graph=True)
        loss = sum((gi * torch.randn(gi.shape, generator=g)).sum() for gi in grads)
        with Loads() as dbl:
            torch.autograd.grad(loss, double)
        passes.append(("double backward", dbl))
    return passes


_OPS = ("conv", "linear", "contraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(_OPS), help=f"comma-separated, of {', '.join(_OPS)}")
    ops = parser.parse_args().ops.split(",")
    if set(ops) - set(_OPS):
        parser.error(f"unknown --ops {', '.join(sorted(set(ops) - set(_OPS)))}; choose from {', '.join(_OPS)}")
    from ase.build import bulk

    import sparsekern
    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped
    from sparsekern.layers import IrrepsLinear, SymmetricContraction
    from sparsekern.ops.triton.symmetric_contraction import _BT, _BT_INTERPRETED
    from sparsekern.ops.descriptors import TPDesc
    from sparsekern.ops.triton.conv import conv

    model = mace_mp0_shaped("medium", dtype=torch.float32)
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    atoms.rattle(0.05, seed=0)
    edge_index = mace_batch(model, [atoms])["edge_index"]
    n, e = len(atoms), edge_index.shape[1]
    linears = [IrrepsLinear.from_e3nn(i.linear).set_backend("triton") for i in model.interactions]
    contractions = [SymmetricContraction.from_e3nn(p.symmetric_contractions).set_backend("triton")
                    for p in model.products]
    species = torch.tensor([model.atomic_numbers.tolist().index(z) for z in atoms.numbers])
    one_hot = torch.nn.functional.one_hot(species, len(model.atomic_numbers)).float()
    sparsekern.patch(model, backend="torch")
    descs = [m.desc for m in model.modules() if isinstance(getattr(m, "desc", None), TPDesc)]
    g = torch.Generator().manual_seed(0)
    print(f"MACE-MP-0 medium, float32, {n} atoms, {e} edges")
    if "conv" in ops:
        print(f"\nThe conv layers, per edge:\n\n{_HEAD}")
    for layer, desc in enumerate(descs if "conv" in ops else ()):
        x = torch.randn(n, desc.irreps_in1.dim, generator=g, requires_grad=True)
        y = torch.randn(e, desc.irreps_in2.dim, generator=g, requires_grad=True)
        w = torch.randn(e, desc.weight_numel, generator=g, requires_grad=True)
        _rows(layer, _passes(lambda: conv(desc, x, y, w, edge_index), g, (x, y, w)), e)
    if "linear" in ops:
        print(f"\nThe irrep linears after the convs (interactions[i].linear), per node:\n\n{_HEAD}")
    for layer, lin in enumerate(linears if "linear" in ops else ()):
        x = torch.randn(n, lin.desc.blocks_in.dim, generator=g, requires_grad=True)
        _rows(layer, _passes(lambda: lin(x), g), n)
    if "contraction" in ops:
        print(f"\nThe symmetric contractions (products[i]), per node (the interpreter's {_BT_INTERPRETED} table "
              f"entries a step, not a GPU's {_BT}: loads per program differ, bytes do not):\n\n{_HEAD}")
    for layer, sc in enumerate(contractions if "contraction" in ops else ()):
        x = torch.randn(n, sc.num_features, sc.desc.coupling_dim, generator=g, requires_grad=True)
        _rows(layer, _passes(lambda: sc(x, one_hot), g, (x,)), n)


if __name__ == "__main__":
    main()
