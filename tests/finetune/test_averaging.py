"""The moving average of the trained parameters (``--ema``): torch_ema's decay, swapped in
and out exactly, and restored from its state."""

import pytest
import torch

from sparsekern.finetune.averaging import ParameterAverage


def test_average_follows_torch_emas_decay_and_swaps_exactly():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    avg = ParameterAverage([p, q], decay=0.9)
    want = [p.detach().clone(), q.detach().clone()]
    for n in range(30):  # the decay warms up, (1 + n) / (10 + n), to its cap 0.9 at n = 80: not reached
        with torch.no_grad():
            p.add_(torch.randn_like(p))
            q.add_(torch.randn_like(q))
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        want = [d * w + (1 - d) * x.detach() for w, x in zip(want, (p, q))]
    assert all(torch.allclose(s, w, rtol=1e-14, atol=1e-14) for s, w in zip(avg.shadow, want))
    trained = [p.detach().clone(), q.detach().clone()]
    with avg.applied():
        assert torch.equal(p, avg.shadow[0]) and torch.equal(q, avg.shadow[1])
    assert torch.equal(p, trained[0]) and torch.equal(q, trained[1])

    fresh = ParameterAverage([p, q], decay=0.9)
    fresh.load_state_dict(avg.state_dict())
    assert fresh.updates == 30 and all(torch.equal(a, b) for a, b in zip(fresh.shadow, avg.shadow))
    with pytest.raises(ValueError, match="does not match"):
        ParameterAverage([q, p], decay=0.9).load_state_dict(avg.state_dict())
