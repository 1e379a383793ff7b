"""The flat Adam and Adamax: torch's arithmetic bit for bit, masked steps, torch's state layout,
and no torch._dynamo import in a whole `vaekit train`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.training.optimizers import FlatAdam, FlatAdamax

PAIRS = [(FlatAdam, torch.optim.Adam), (FlatAdamax, torch.optim.Adamax)]


def gradients(steps: int, size: int = 500) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_same_updates_as_torch_bit_for_bit(ours, theirs, weight_decay: float):
    start = torch.randn(500, generator=torch.Generator().manual_seed(1))
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_a = ours([a], lr=3e-3, weight_decay=weight_decay)
    opt_b = theirs([b], lr=3e-3, weight_decay=weight_decay)
    for grad in gradients(25):
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    for name, value in opt_b.state_dict()["state"][0].items():
        assert torch.equal(opt_a.state_dict()["state"][0][name], value), name


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_a_masked_step_is_kept_or_dropped_whole(ours, theirs):
    """ok=False (a non-finite step) leaves parameter, moments and count as they were, bit for
    bit, without the host reading the flag; ok=True is the plain step up to float rounding."""
    start = torch.randn(500, generator=torch.Generator().manual_seed(2))
    masked, plain = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_masked, opt_plain = ours([masked], lr=1e-2), ours([plain], lr=1e-2)
    for i, grad in enumerate(gradients(12)):
        skipped = i % 4 == 2
        masked.grad = torch.full_like(grad, float("nan")) if skipped else grad.clone()
        saved = opt_masked.state_dict()["state"].get(0, {})
        before = (masked.detach().clone(), {name: value.clone() for name, value in saved.items()})
        opt_masked.step(ok=torch.tensor(not skipped))
        if skipped:
            assert torch.equal(masked, before[0])
            for name, value in opt_masked.state_dict()["state"][0].items():
                assert torch.equal(value, before[1][name]), name
            continue
        plain.grad = grad.clone()
        opt_plain.step()
        torch.testing.assert_close(masked, plain, rtol=1e-6, atol=1e-7)
    assert int(opt_masked.state_dict()["state"][0]["step"]) == 9  # 12 steps, 3 dropped


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_states_load_across_torch_and_ours(ours, theirs):
    start = torch.randn(50, generator=torch.Generator().manual_seed(3))
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_theirs = theirs([b], lr=2e-3)
    for grad in gradients(3, 50):
        b.grad = grad.clone()
        opt_theirs.step()
    opt_ours = ours([a], lr=1e-3)
    opt_ours.load_state_dict(opt_theirs.state_dict())  # a run resumed after the switch
    assert opt_ours.param_groups[0]["lr"] == 2e-3
    a.data.copy_(b.data)
    for grad in gradients(2, 50):
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.equal(a, b)
    back = theirs([b.detach().clone().requires_grad_()], lr=1e-3)
    back.load_state_dict(opt_ours.state_dict())  # and the other way
    assert int(back.state_dict()["state"][0]["step"]) == 5
    with pytest.raises(ValueError, match="shape"):
        ours([torch.zeros(7, requires_grad=True)]).load_state_dict(opt_ours.state_dict())


def test_bad_settings_and_several_tensors_are_refused():
    with pytest.raises(VaekitError, match="lr > 0"):
        FlatAdam([torch.zeros(3, requires_grad=True)], lr=-1.0)
    with pytest.raises(VaekitError, match="one flat parameter"):
        FlatAdamax([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)])


def test_a_default_training_run_never_imports_dynamo_or_sympy(tmp_path):
    """torch.optim's optimizers import torch._dynamo and torch.broadcast_shapes imports sympy,
    about 2 s of start-up together: the default `vaekit train` must do without both."""
    script = (
        "import sys\n"
        "from vaekit.cli import main\n"
        f"main(['train', 'trainer.max_epochs=1', 'eval.iw_samples=2', 'trainer.progress=false',\n"
        f"      'hydra.run.dir={tmp_path / 'run'}', 'trainer.num_threads=1'])\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
