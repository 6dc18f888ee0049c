"""Where a patched MACE's host time goes: aten ops per module, counted on the CPU.

On the H200 (results/gpu_suite_20261204_182714.md) a 5,120-atom energy+forces took 36.8 ms
eager and 9.2 ms replayed from a CUDA graph: eager, the GPU waits for the host, which
spends its time dispatching aten ops (each a few microseconds, most a kernel launch). This
runs MACE-MP-0 medium (float32, Triton back end, launches stubbed) on ``meta`` tensors,
27 atoms, and counts every aten op of energy+forces (``--step``: a sparse training step),
by the model's block or interaction/product sub-module that issued it in the forward
pass, or by the autograd node that ran it in the backward passes (the forces' and, with
``--step``, the loss's). A count, not a timing. ``--model 7net-0``: SevenNet-0 on 16
silicon atoms (its host reads patched away: integrations/sevennet/sync_free.py).

    TRITON_INTERPRET=1 .venv-mace/bin/python benchmarks/host_ops.py [--step]
    TRITON_INTERPRET=1 .venv-sevenn/bin/python benchmarks/host_ops.py --model 7net-0 [--step]

``--host-ms``: instead, the host's time for an inference energy+forces (frozen weights, as
ASE calculators run), MACE-MP-0 medium on one Cu atom (78 edges), real CPU tensors on one
thread, Triton's launches stubbed (what the host does around the kernels), against e3nn's
(MACE as built, which computes too: an upper bound of its host time); the least of 20 calls.
"""
from __future__ import annotations

import argparse
import collections
import copy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Ops(TorchDispatchMode):
    """aten ops by name and by issuer: the module on top of ``where`` in the forward,
    the autograd node inside the engine."""

    def __init__(self, where: list):
        super().__init__()
        self.where, self.by_name, self.by_module = where, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func.overloadpacket.__name__] += 1
        node = torch._C._current_autograd_node()
        self.by_module[self.where[-1] if node is None else f"backward: {node.name()}"] += 1
        return func(*args, **(kwargs or {}))


def label_modules(model: torch.nn.Module, where: list) -> None:
    """Push a module's label on ``where`` for the time of its forward: the model (its
    own code), its blocks, and the sub-modules of each interaction and product block."""
    for name, module in model.named_modules():
        if name.count(".") <= (2 if name.split(".")[0] in ("interactions", "products") else 1):
            label = f"{type(module).__name__} ({name.split('.')[-1] or 'own code'})"
            module.register_forward_pre_hook(lambda m, a, label=label: where.append(label))
            module.register_forward_hook(lambda m, a, out: where.pop() and None)


def _mace():
    """MACE-MP-0 medium, 27 atoms of three elements, on meta tensors: (model, a function of
    the model giving a function of a device giving a new batch there, predict, device)."""
    from ase.build import bulk

    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

    model = mace_mp0_shaped("medium", dtype=torch.float32)
    atoms = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    atoms.numbers = [29, 8, 1] * 9
    atoms.rattle(0.05, seed=0)

    def predict(m, batch, training):
        out = m(batch, compute_force=True, training=training)
        return out["energy"], out["forces"]

    def batches(m):
        batch = mace_batch(m, [atoms])
        return lambda device: {k: v.detach().clone().to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    return model, batches, predict, "meta"


def _sevennet():
    """SevenNet-0, 16 silicon atoms, on meta tensors (as :func:`_mace`)."""
    from ase.build import bulk

    from sparsekern.integrations.sevennet.family import SevenNetFamily

    family = SevenNetFamily()
    atoms = bulk("Si", "diamond", a=5.43) * (2, 2, 2)
    atoms.rattle(0.05, seed=0)
    def batches(m):
        graph = family.graph(m, atoms)
        return lambda device: family.collate([graph], device)

    return family.load("7net-0", "cpu"), batches, family.predict, "meta"


def host_ms() -> None:
    """``--host-ms`` (the module's docstring)."""
    import time

    from ase.build import bulk

    import sparsekern
    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

    torch.set_num_threads(1)
    for variant in ("e3nn", "sparsekern triton, launches stubbed"):
        model = mace_mp0_shaped("medium", dtype=torch.float32).eval()
        if variant != "e3nn":
            model = sparsekern.patch(model, backend="triton")
        for p in model.parameters():
            p.requires_grad_(False)
        batch = mace_batch(model, [bulk("Cu", "fcc", a=3.6)])
        times = []
        for _ in range(23):
            data = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            t0 = time.perf_counter()
            model(data, compute_force=True)
            times.append(time.perf_counter() - t0)
        print(f"{variant}: {1e3 * min(times[3:]):.2f} ms an energy+forces, "
              f"{batch['edge_index'].shape[1]} edges")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step", action="store_true", help="a sparse (3 %%) training step instead of energy+forces")
    ap.add_argument("--model", choices=("mace-mp0-medium", "7net-0"), default="mace-mp0-medium")
    ap.add_argument("--host-ms", action="store_true", help="time the host path instead (MACE-MP-0 medium)")
    args = ap.parse_args()
    if args.host_ms and (args.step or args.model != "mace-mp0-medium"):
        ap.error("--host-ms times MACE-MP-0 medium's energy+forces: leave out --step and --model")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import sparsekern
    from sparsekern.finetune.backward import backward

    # launches stubbed: the op counts do not depend on what the kernels compute
    JITFunction.run = InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
    if args.host_ms:
        return host_ms()
    model, batches, predict, device = (_mace if args.model == "mace-mp0-medium" else _sevennet)()
    model = sparsekern.patch(model.train(args.step), backend="triton")
    if args.step:
        sparsekern.prepare(model, sparsekern.SparseConfig(density=0.03), backend="triton")
    new_batch = batches(model)  # read from the model while its tensors are real

    def run(m, data):
        energy, forces = predict(m, data, args.step)
        if args.step:  # as the trainer: into the trained tensors, their gradients unset before
            trained = [p for p in m.parameters() if p.requires_grad]
            for p in trained:
                p.grad = None
            backward(energy.sum() + (forces ** 2).sum(), trained)

    run(model, new_batch("cpu"))  # the descriptors' constants
    model = copy.deepcopy(model).to(device)
    where = ["outside the model (the loss)"]
    label_modules(model, where)
    for _ in range(2):  # the second call: constants already on the device
        graph = new_batch(device)  # a new graph: planned anew
        with Ops(where) as ops:
            run(model, graph)
    syncs = ops.by_name["_local_scalar_dense"]
    print(f"{'sparse training step' if args.step else 'energy+forces'}, {args.model}: "
          f"{sum(ops.by_name.values())} aten ops ({syncs} reads back to the host)")
    print("\n| issued by | aten ops |\n|---|---|")
    for label, n in ops.by_module.most_common():
        print(f"| {label} | {n} |")
    print("\nmost frequent: " + ", ".join(f"{name} {n}" for name, n in ops.by_name.most_common(12)))


if __name__ == "__main__":
    main()
