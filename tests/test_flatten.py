"""The flat parameter buffer must not change what the optimizer computes."""

import torch
from torch import nn

from vaekit.training.flatten import FlatParameters


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_flat_training_matches_per_parameter_training_exactly():
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    plain, flat_model = _net(), _net()
    opt_plain = torch.optim.Adamax(plain.parameters(), lr=1e-2)
    flat = FlatParameters(flat_model)
    opt_flat = torch.optim.Adamax([flat.param], lr=1e-2)
    for _ in range(5):
        opt_plain.zero_grad()
        nn.functional.mse_loss(plain(x), y).backward()
        opt_plain.step()
        flat.zero_grad()
        nn.functional.mse_loss(flat_model(x), y).backward()
        opt_flat.step()
    for a, b in zip(plain.parameters(), flat_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # parameters are views into the flat buffer, gradients into its gradient
    assert all(p.data_ptr() >= flat.param.data_ptr() for p in flat_model.parameters())
    grads = torch.cat([p.grad.reshape(-1) for p in flat_model.parameters()])
    assert torch.equal(grads, flat.param.grad)
    torch.testing.assert_close(flat.grad_norm(), grads.norm())


def test_loading_a_state_dict_writes_through_to_the_flat_buffer():
    source, target = _net(), _net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    flat = FlatParameters(target)
    target.load_state_dict(source.state_dict())
    expected = torch.cat([p.detach().reshape(-1) for p in source.parameters()])
    assert torch.equal(flat.param.detach(), expected)
