"""How much the STR delta's active set moves during training (CPU, seconds).

The soft threshold S(V, tau) has zero gradient where |V| <= tau, so inactive entries of V
never move; the density controller keeps exactly the target fraction active from the first
step. The active set within a parameter can then change only at its margin. This trains a
tiny MACE model (Al/Cu, EMT-like random force targets) and prints how many of the initial
active entries are still active.

    .venv-mace/bin/python benchmarks/mask_drift.py [--steps 30] [--lr 0.1] [--density 0.03]
"""

from __future__ import annotations

import argparse

import torch
from ase.build import bulk

import sparsekern  # first: lets e3nn 0.4.4 import under torch >= 2.6
from e3nn import o3  # noqa: E402
from sparsekern import delta_slot
from sparsekern.finetune import calibrate_density
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--density", type=float, default=0.03)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mace_mp0_shaped("small", seed=1, num_elements=2, atomic_numbers=[13, 29], max_ell=2, correlation=2,
                            hidden_irreps=o3.Irreps("8x0e+8x1o"), r_max=3.5, radial_MLP=[8, 8], num_bessel=4,
                            atomic_energies=[-3.0, -4.0])
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.numbers[::3] = 13
    atoms.rattle(0.1, seed=1)
    batch = mace_batch(model, [atoms])
    sparsekern.prepare(model, sparsekern.SparseConfig(density=args.density))

    def active():
        return torch.cat([(d().detach() != 0).reshape(-1) for *_, d in delta_slot.iter_deltas(model)])

    calibrate_density(model)  # (prepared, the model is the base: density 0 until the first step)
    start = active()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, amsgrad=True)
    target = torch.randn(len(atoms), 3, dtype=torch.float64)
    model.train()
    for _ in range(args.steps):
        loss = (model(dict(batch), training=True, compute_force=True)["forces"] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    calibrate_density(model)
    end = active()
    print(f"{args.steps} steps, lr {args.lr}, density {args.density}: {int(start.sum())} entries active at the "
          f"start, {int(end.sum())} at the end, {int((start & end).sum())} of them the same "
          f"({100 * float((start & end).sum()) / max(int(start.sum()), 1):.0f} %), of {start.numel()} weights")


if __name__ == "__main__":
    main()
