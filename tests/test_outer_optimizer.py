"""outer_step against torch.optim.SGD (dampening 0), model averaging, and the skip mask."""
from __future__ import annotations

import pytest
import torch

from megatron_edit.outer_optimizer import needs_outer_momentum, outer_step


def _torch_sgd_trajectory(anchor0, pseudo_grads, lr, momentum, nesterov):
    param = torch.nn.Parameter(anchor0.clone())
    opt = torch.optim.SGD([param], lr=lr, momentum=momentum, nesterov=nesterov, dampening=0.0, foreach=False)
    trajectory = []
    for g in pseudo_grads:
        param.grad = g.clone()
        opt.step()
        trajectory.append(param.detach().clone())
    return trajectory


@pytest.mark.parametrize(
    "method,lr,momentum",
    [("nesterov", 0.8, 0.85), ("nesterov", 0.7, 0.9), ("sgd", 0.8, 0.85), ("sgd", 0.4, 0.0)],
)
def test_outer_step_matches_torch_sgd(method, lr, momentum):
    gen = torch.Generator().manual_seed(0)
    anchor0 = torch.randn(1000, generator=gen)
    pseudo_grads = [torch.randn(1000, generator=gen) * 0.1 for _ in range(6)]
    expected = _torch_sgd_trajectory(anchor0, pseudo_grads, lr, momentum, nesterov=(method == "nesterov"))

    anchor = anchor0.clone()
    outer_momentum = torch.zeros_like(anchor)
    for step, g in enumerate(pseudo_grads):
        outer_step(anchor, outer_momentum, g, method, lr, momentum)
        torch.testing.assert_close(anchor, expected[step], rtol=1e-7, atol=0.0)
    assert not torch.equal(anchor, anchor0)


def test_nesterov_first_two_steps_by_hand():
    anchor = torch.tensor([1.0, -2.0])
    m = torch.zeros(2)
    g1 = torch.tensor([0.5, 0.25])
    outer_step(anchor, m, g1, "nesterov", lr=0.5, momentum_coef=0.5)
    # m = g1; anchor -= 0.5 * (g1 + 0.5 * g1) = 0.75 * g1
    assert m.tolist() == [0.5, 0.25]
    assert anchor.tolist() == [1.0 - 0.375, -2.0 - 0.1875]
    g2 = torch.tensor([1.0, 0.0])
    outer_step(anchor, m, g2, "nesterov", lr=0.5, momentum_coef=0.5)
    # m = 0.5*m + g2 = [1.25, 0.125]; update = g2 + 0.5*m = [1.625, 0.0625]
    assert m.tolist() == [1.25, 0.125]
    assert anchor.tolist() == [0.625 - 0.8125, -2.1875 - 0.03125]


def test_sgd_without_momentum_needs_no_buffer():
    anchor = torch.tensor([1.0, 2.0])
    outer_step(anchor, None, torch.tensor([0.5, -1.0]), "sgd", lr=0.5, momentum_coef=0.0)
    assert anchor.tolist() == [0.75, 2.5]


def test_average_gives_mean_of_worker_params():
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(64, generator=gen)
    workers = [anchor + torch.randn(64, generator=gen) for _ in range(4)]
    pseudo_grad = torch.stack([anchor - theta for theta in workers]).mean(dim=0)
    momentum_before = torch.full((64,), 3.0)
    outer_momentum = momentum_before.clone()
    outer_step(anchor, outer_momentum, pseudo_grad, "average", lr=0.8, momentum_coef=0.85)
    torch.testing.assert_close(anchor, torch.stack(workers).mean(dim=0), rtol=0, atol=1e-6)
    assert torch.equal(outer_momentum, momentum_before)  # average ignores the momentum


@pytest.mark.parametrize("method", ["nesterov", "sgd", "average"])
def test_skip_leaves_anchor_and_momentum_bitwise_unchanged(method):
    gen = torch.Generator().manual_seed(2)
    anchor0 = torch.randn(2, 50, generator=gen)
    m0 = torch.randn(2, 50, generator=gen)
    g = torch.randn(2, 50, generator=gen)
    g[0, 3] = float("nan")  # garbage in a skipped layer must not leak
    skip = torch.tensor([[True], [False]])  # layer 0 skipped, layer 1 updated

    anchor, m = anchor0.clone(), m0.clone()
    outer_step(anchor, m, g, method, lr=0.8, momentum_coef=0.85, skip=skip)

    ref_anchor, ref_m = anchor0[1].clone(), m0[1].clone()
    outer_step(ref_anchor, ref_m, g[1].clone(), method, lr=0.8, momentum_coef=0.85)
    assert torch.equal(anchor[0], anchor0[0])
    assert torch.equal(m[0], m0[0])
    assert torch.equal(anchor[1], ref_anchor)  # non-skipped: bit-identical to the unmasked path
    assert torch.equal(m[1], ref_m)
    assert not torch.equal(anchor[1], anchor0[1])


def test_skip_without_momentum_buffer():
    anchor = torch.tensor([1.0, 2.0])
    outer_step(anchor, None, torch.tensor([1.0, 1.0]), "sgd", 0.5, 0.0, skip=torch.tensor([True, False]))
    assert anchor.tolist() == [1.0, 1.5]


def test_rejects_bad_arguments():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="--outer-optimizer adam"):
        outer_step(a, torch.zeros(3), torch.zeros(3), "adam", 0.8, 0.85)
    with pytest.raises(ValueError, match="needs outer_momentum"):
        outer_step(a, None, torch.zeros(3), "nesterov", 0.8, 0.85)
    with pytest.raises(ValueError, match="float32"):
        outer_step(a, torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16), "nesterov", 0.8, 0.85)
    with pytest.raises(ValueError, match="shape"):
        outer_step(a, torch.zeros(3), torch.zeros(4), "nesterov", 0.8, 0.85)
    with pytest.raises(ValueError, match="bool"):
        outer_step(a, torch.zeros(3), torch.zeros(3), "nesterov", 0.8, 0.85, skip=torch.zeros(3))
    with pytest.raises(ValueError, match="--outer-momentum 1.0"):
        outer_step(a, torch.zeros(3), torch.zeros(3), "sgd", 0.8, 1.0)


def test_needs_outer_momentum():
    assert needs_outer_momentum("nesterov", 0.85) is True
    assert needs_outer_momentum("sgd", 0.0) is False
    assert needs_outer_momentum("average", 0.9) is False
