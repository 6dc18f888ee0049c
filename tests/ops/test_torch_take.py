"""The torch back end's gathers whose every derivative is a gather or an addition of
rows (ops/torch/take.py): values against ``index_select``, first to third derivatives
(gradcheck, gradgradcheck, float64), and gradients that arrive transposed."""

import torch
from torch.autograd import gradcheck, gradgradcheck

from sparsekern.ops.torch.take import Take, TakeRows


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def test_take_rows_reads_rows_many_times():
    """Rows read twice, once and never: the value is index_select's, the gradient
    index_add's, and every derivative to the third passes gradcheck."""
    x, rows = _x((5, 7)), torch.tensor([3, 0, 3, 4, 0, 0])
    assert torch.equal(TakeRows.apply(x, rows), x.index_select(0, rows))
    g = torch.randn(6, 7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(TakeRows.apply(x, rows), x, g)
    assert torch.equal(grad, torch.zeros(5, 7, dtype=torch.float64).index_add(0, rows, g))
    assert gradcheck(lambda t: TakeRows.apply(t, rows), (x,))
    assert gradgradcheck(lambda t: TakeRows.apply(t, rows).sin(), (x,))

    def first(t):
        return torch.autograd.grad(TakeRows.apply(t, rows).sin().sum(), t, create_graph=True)

    assert gradgradcheck(first, (x,))  # third derivatives


def test_take_rows_of_transposed_operands():
    """A transposed x and a transposed gradient (as force training's double backward
    hands one in) give what contiguous ones give."""
    base, rows = _x((7, 5)), torch.tensor([1, 1, 4, 2])
    x = base.t()  # (5, 7), strides (1, 5)
    assert torch.equal(TakeRows.apply(x, rows), x.index_select(0, rows))
    g = torch.randn(7, 4, dtype=torch.float64).t()  # (4, 7), transposed
    (grad,) = torch.autograd.grad(TakeRows.apply(x, rows), base, g)
    assert torch.equal(grad.t(), torch.zeros(5, 7, dtype=torch.float64).index_add(0, rows, g.contiguous()))
    assert gradgradcheck(lambda t: TakeRows.apply(t.t(), rows).cos(), (base,))


def test_take_with_zeroed_slots_is_closed():
    """Take: a map into padded slots (slots 1 and 4 zero), its gradient the gather by
    the inverse map, to the third derivative."""
    x = _x((3, 4))
    index, zero = torch.tensor([2, 0, 0, 1, 0]), torch.tensor([1, 4])
    back = torch.tensor([2, 3, 0])  # where index reads x's rows 0, 1, 2
    expected = x.index_select(0, index).index_fill(0, zero, 0)
    assert torch.equal(Take.apply(x, 0, index, zero, back, None), expected)

    def take(t):
        return Take.apply(t, 0, index, zero, back, None)

    assert gradcheck(take, (x,)) and gradgradcheck(lambda t: take(t).sin(), (x,))

    def first(t):
        return torch.autograd.grad(take(t).sin().sum(), t, create_graph=True)

    assert gradgradcheck(first, (x,))
