"""The Trainer in-process: roll-back keeps the pre-divergence best model; warm-up schedule."""

import contextlib
import copy
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from vaekit.build import build_dataset, build_model, device_data, instantiate_group
from vaekit.commands.train import CONFIG_DIR
from vaekit.loggers.tensorboard import RunLogger
from vaekit.syncs import SyncCounter
from vaekit.training.checkpoint import load_checkpoint
from vaekit.training.flatten import FlatParameters
from vaekit.training.guard import POLL_EVERY
from vaekit.training.schedule import build_schedule
from vaekit.training.signals import StopRequest
from vaekit.training.trainer import Diverged, Trainer


def make_trainer(run_dir, *overrides, logger=None):
    """A digits Trainer (latent 4) of the composed config, its schedule included; TensorBoard
    into run_dir unless another `logger` is given."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.progress=false", "model.latent_dim=4", *overrides])
    raw = build_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, raw)
    data = device_data(raw, model, torch.device("cpu"))
    flat = FlatParameters(model)
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    settings = copy.deepcopy(cfg.trainer)
    logger = RunLogger(run_dir) if logger is None else logger
    schedule = build_schedule(cfg.scheduler)
    stop = StopRequest()
    return Trainer(model, flat, optimizer, data, settings, run_dir, logger, {}, stop, 1000, schedule=schedule)


@pytest.fixture(params=["eager", "sync_free"])
def guard_path(request):
    """Both paths of the non-finite guard: read at once (the CPU's) and sync-free (an
    accelerator's, taken on the CPU too inside a SyncCounter)."""
    with SyncCounter() if request.param == "sync_free" else contextlib.nullcontext():
        yield request.param


def test_divergence_rolls_back_and_keeps_the_best_model_from_before(tmp_path, guard_path):
    trainer = make_trainer(tmp_path, "trainer.max_epochs=3", "trainer.patience=100")
    assert trainer.fit().status == "finished"
    best_epoch = trainer.state.best_epoch
    best_before = load_checkpoint(tmp_path / "best.pt")["model"]
    trainer.settings.max_epochs = 10
    trainer.schedule.base_lrs = [1e8]  # the schedule sets each epoch's lr: every step from here on blows up
    with pytest.raises(Diverged, match="after 3 roll-back"):
        trainer.fit()
    assert trainer.state.status == "diverged" and trainer.state.rollbacks == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e8 * 0.5**3)
    best_after = load_checkpoint(tmp_path / "best.pt")
    assert best_after["fit_state"]["epoch"] == best_epoch <= 3
    for name, tensor in best_before.items():
        assert torch.equal(tensor, best_after["model"][name]), name
    # the model in memory was rolled back to the last good (finite) state, not left diverged
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_kl_warmup_weights_rise_linearly_to_one(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.kl_warmup_epochs=4")
    betas = []
    for epoch in range(6):
        trainer.state.epoch = epoch
        betas.append(trainer.beta())
    assert betas == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_free_bits_change_the_loss_not_the_nelbo(tmp_path):
    trainer = make_trainer(tmp_path)
    x = trainer.data.val[:32]
    torch.manual_seed(3)
    plain = trainer.model(x)
    torch.manual_seed(3)
    floored = trainer.model(x, free_bits=1e3)
    torch.testing.assert_close(plain.nelbo, floored.nelbo)
    torch.testing.assert_close(floored.loss, floored.rec + 1e3)  # the KL counts as the floor
    torch.manual_seed(3)
    warm = trainer.model(x, beta=0.25)
    torch.testing.assert_close(warm.loss, warm.rec + 0.25 * warm.kl)
    assert math.isfinite(plain.loss.mean().item())


def poisoned(trainer: Trainer, bad_calls: set[int]) -> None:
    """Make the forward pass's loss NaN on the given calls (0-based) of the training step."""
    forward, calls = trainer.forward, [0]

    def forward_with_nans(x, **kwargs):
        elbo = forward(x, **kwargs)
        calls[0] += 1
        if calls[0] - 1 in bad_calls:
            elbo = type(elbo)(elbo.loss * float("nan"), elbo.rec, elbo.kl, elbo.kl_per_level)
        return elbo

    trainer.forward = forward_with_nans


def test_the_sync_free_guard_skips_the_same_steps_without_reading_them(tmp_path):
    """Masked steps on the device give what skipped steps give on the CPU, and the epoch waits
    on its two reads (the guard's counters, the epoch's means) and one per POLL_EVERY steps."""
    results = {}
    for path in ("eager", "sync_free"):
        trainer = make_trainer(tmp_path / path, "trainer.max_epochs=2", "trainer.log_images=false")
        poisoned(trainer, {3, 4, 20})
        with SyncCounter() if path == "sync_free" else contextlib.nullcontext():
            trainer.fit()
        results[path] = (trainer.flat.param.detach().clone(), trainer.state)
    (eager, eager_state), (masked, masked_state) = results["eager"], results["sync_free"]
    assert eager_state.nonfinite_total == masked_state.nonfinite_total == 3
    assert masked_state.rollbacks == 0 and masked_state.nonfinite_in_a_row == 0
    torch.testing.assert_close(masked, eager, rtol=1e-4, atol=1e-5)  # the bias corrections' rounding
    assert abs(masked_state.best_val - eager_state.best_val) < 1e-3
    trainer = make_trainer(tmp_path / "count", "trainer.max_epochs=1")
    steps = trainer.data.num_train_batches(trainer.settings.batch_size)
    with SyncCounter() as syncs:
        trainer._train_epoch()
    assert syncs.total <= 2 + steps // POLL_EVERY, syncs.by_op
