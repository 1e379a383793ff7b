"""Learning-rate schedules, EMA weights, the per-epoch lines of train.log and +debug=profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli_error, compose_train, read_events, run_vaekit
from test_trainer import make_trainer as trainer_of

from vaekit.errors import VaekitError
from vaekit.evaluation.metrics import nelbo_terms
from vaekit.rng import own_rng
from vaekit.training.checkpoint import load_checkpoint
from vaekit.training.epoch_log import INTERVAL_S, EpochLog
from vaekit.training.flatten import FlatParameters
from vaekit.training.schedule import build_schedule
from vaekit.training.trainer import VALIDATION_SEED, Trainer


def lr_curve(settings: dict, epochs: int, val: list[float] | None = None) -> list[float]:
    """The lr of each epoch of `settings`' schedule on an optimizer with lr 1 (val: the
    validation NELBO seen after each epoch)."""
    schedule = build_schedule(settings)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule.attach(optimizer)
    lrs = []
    for epoch in range(epochs):
        lrs.append(schedule.apply(optimizer, epoch))
        schedule.observe(epoch + 1, val[epoch] if val else 0.0)
    return lrs


def test_warmup_then_cosine_step_and_constant_give_the_lr_of_each_epoch():
    half = (1 + math.cos(math.pi / 4)) / 2  # 0.8536: a quarter of the way down the cosine
    cosine = lr_curve({"name": "cosine", "epochs": 6, "warmup_epochs": 2}, 8)
    # warm-up 1/3, 2/3; then the cosine over T = 6 - 2 epochs; then it stays at the bottom
    assert cosine == pytest.approx([1 / 3, 2 / 3, 1.0, half, 0.5, 1 - half, 0.0, 0.0])
    floor = lr_curve({"name": "cosine", "epochs": 3, "min_lr_factor": 0.1}, 4)
    assert floor == pytest.approx([1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25, 0.1])
    step = lr_curve({"name": "step", "step_epochs": 2, "gamma": 0.5, "warmup_epochs": 1}, 7)
    assert step == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    stepped_floor = lr_curve({"name": "step", "step_epochs": 1, "gamma": 0.1, "min_lr_factor": 0.05}, 4)
    assert stepped_floor == pytest.approx([1.0, 0.1, 0.05, 0.05])
    assert lr_curve({"name": "none", "warmup_epochs": 3}, 5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_curve({"name": "none", "warmup_epochs": 0}, 2) == [1.0, 1.0]


def test_plateau_halves_the_lr_when_the_validation_nelbo_stalls():
    settings = {"name": "plateau", "factor": 0.5, "patience": 1, "threshold": 0.0}
    val = [10.0, 9.0, 9.0, 9.0, 9.0, 8.0, 8.0, 8.0, 8.0]
    # two epochs without a new best (more than patience=1) halve the lr, and the count restarts
    assert lr_curve(settings, 9, val) == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]
    # improvements smaller than the threshold (nats) do not count; warm-up epochs are not counted
    slow = [10.0 - 0.1 * i for i in range(6)]
    assert lr_curve({**settings, "threshold": 0.5, "warmup_epochs": 1}, 6, slow) == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 0.5, 0.5]
    )
    assert lr_curve({**settings, "min_lr_factor": 0.3}, 9, [5.0] * 9)[-1] == 0.3


class Recorder:
    """A logger that keeps the scalars it is given: {tag: [(step, value)]}."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.values.setdefault(f"{prefix}/{name}", []).append((step, value))

    def images(self, *args, **kwargs) -> None:
        pass


def make_trainer(run_dir: Path, *overrides: str) -> Trainer:
    """test_trainer's Trainer, quiet, recording its scalars in memory."""
    quiet = ("trainer.log_images=false",)
    return trainer_of(run_dir, *quiet, *overrides, logger=Recorder())


def test_the_trainer_steps_plateau_on_a_stalled_validation_nelbo(tmp_path):
    trainer = make_trainer(
        tmp_path, "scheduler=plateau", "scheduler.patience=1", "trainer.max_epochs=5", "trainer.patience=100"
    )
    stalled = iter([100.0, 90.0, 90.0, 90.0, 90.0])
    trainer._validate = lambda: {"nelbo": next(stalled), "rec": 0.0, "kl": 0.0}
    trainer.fit()
    lrs = [value for _, value in trainer.logger.values["train/lr"]]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4])
    assert load_checkpoint(tmp_path / "last.pt")["schedule"]["reductions"] == 1


def test_ema_is_the_hand_computed_average_and_validation_uses_it(tmp_path):
    decay = 0.6
    settings = ("trainer.max_epochs=2", "trainer.batch_size=250", "trainer.patience=100")
    trainer = make_trainer(tmp_path, f"trainer.ema={decay}", *settings)
    flat = trainer.flat
    expected = flat.param.detach().clone()
    steps = []

    def after_step(optimizer, args, kwargs):
        steps.append(flat.param.detach().clone())

    trainer.optimizer.register_step_post_hook(after_step)
    state = trainer.fit()
    assert len(steps) == 8  # 1000 examples / 250 per step, 2 epochs
    for weights in steps:
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(trainer.ema.average, expected)
    assert not torch.equal(trainer.ema.average, flat.param)  # the average lags the weights
    # checkpoints: "model" is the average, "raw_model" the optimizer's weights
    last = load_checkpoint(tmp_path / "last.pt")
    model, raw = last["model"], last["raw_model"]
    names = dict(trainer.model.named_parameters())
    vector = torch.cat([t.reshape(-1) for name, t in raw.items() if name in names])
    assert torch.equal(vector, flat.param.detach())
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["fit_state"]["epoch"] == state.best_epoch

    # validation (hence early stopping and best.pt) saw the EMA weights, not the raw ones
    def validation_nelbo(weights: dict) -> float:
        trainer.model.load_state_dict(weights)
        with own_rng(torch.device("cpu")):
            torch.manual_seed(VALIDATION_SEED)
            return nelbo_terms(trainer.model.eval(), trainer.data.val, 1000)["nelbo"]

    assert validation_nelbo(model) == trainer.logger.values["val/nelbo"][-1][1]
    assert validation_nelbo(raw) != pytest.approx(validation_nelbo(model), abs=1e-3)
    assert validation_nelbo(best["model"]) == state.best_val


def test_bad_schedule_and_ema_settings_are_one_sentence_and_train_nothing(capsys, tmp_path):
    run = f"hydra.run.dir={tmp_path / 'run'}"
    cases = {
        ("trainer.ema=1.5",): "trainer.ema must be a decay in (0, 1), e.g. 0.999 (or null: off), not 1.5.",
        ("trainer.ema=0",): "trainer.ema must be a decay in (0, 1)",
        ("scheduler=cosine", "scheduler.warmup_epochs=-1"): (
            "scheduler.warmup_epochs must be a whole number, 0 or more, not -1."
        ),
        ("scheduler=step", "scheduler.gamma=fast"): "scheduler.gamma must be a number in (0, 1], not 'fast'.",
        ("scheduler=plateau", "scheduler.patience=2.5"): "scheduler.patience must be a whole number",
        ("+scheduler.decay=1",): (
            "scheduler.decay is not a setting of scheduler=none (it takes warmup_epochs)."
        ),
        ("scheduler.name=linear",): (
            "scheduler.name must be one of none, plateau, cosine, step, not 'linear'."
        ),
        ("scheduler=cosine", "scheduler.warmup_epochs=3", "trainer.max_epochs=3"): (
            "scheduler.epochs=3 (the cosine's length, trainer.max_epochs by default) must be more than"
        ),
        ("trainer.profile_steps=-2",): "trainer.profile_steps must be 0 or more, not -2.",
    }
    for overrides, message in cases.items():
        assert message in cli_error(capsys, "train", *overrides, run), overrides
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(VaekitError, match="scheduler.min_lr_factor must be a number in"):
        build_schedule(compose_train("scheduler=cosine", "scheduler.min_lr_factor=2").scheduler)


def test_epoch_lines_come_at_a_readable_rate():
    log = EpochLog()
    log.last_written = 100.0
    assert log.due(5, improved=False, last=False, now=100.0)  # the first epochs, always
    assert not log.due(6, improved=False, last=False, now=100.0 + INTERVAL_S / 2)
    assert log.due(6, improved=False, last=False, now=100.0 + INTERVAL_S)
    assert log.due(7, improved=True, last=False, now=100.5)  # best.pt written
    assert log.due(8, improved=False, last=True, now=100.5)


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> Path:
    """+debug=profile with a step schedule and a warm-up, through the real command."""
    cwd = tmp_path_factory.mktemp("profiled")
    schedule = ["scheduler=step", "scheduler.step_epochs=1", "scheduler.warmup_epochs=1"]
    overrides = [*schedule, "trainer.max_epochs=4"]
    done = run_vaekit("train", "+debug=profile", *overrides, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


def test_debug_profile_writes_a_trace_for_tensorboard_and_finishes(profiled_run):
    traces = list((profiled_run / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 5  # trainer.profile_steps of the preset
    assert json.loads((profiled_run / "metrics.json").read_text())["status"] == "finished"


def test_train_lr_and_the_train_log_show_every_epoch(profiled_run):
    scalars, _ = read_events(profiled_run)
    # warm-up at 1/2 of adamax's 1e-3, then halved every epoch
    assert [step for step, _ in scalars["train/lr"]] == [1, 2, 3, 4]
    assert [lr for _, lr in scalars["train/lr"]] == pytest.approx([5e-4, 1e-3, 5e-4, 2.5e-4])
    log = (profiled_run / "train.log").read_text()
    lines = [line for line in log.splitlines() if "] epoch " in line]
    assert [line.split("] ")[1].split(" |")[0] for line in lines] == [f"epoch {e}/4" for e in (1, 2, 3, 4)]
    val = [v for _, v in scalars["val/nelbo"]]
    for line, nelbo, lr in zip(lines, val, ("0.0005", "0.001", "0.0005", "0.00025"), strict=True):
        assert f"val NELBO {nelbo:.2f}" in line and f"| lr {lr} |" in line and "val KL z " in line
        assert "train NELBO " in line and line.endswith(" s")
    assert "profiler trace of 5 training step(s) written to" in log


def test_a_step_masked_on_the_device_moves_the_average_only_when_taken():
    from vaekit.training.ema import EMA

    flat = FlatParameters(torch.nn.Linear(2, 1))
    start = flat.param.detach().clone()
    ema = EMA(flat, 0.75)
    with torch.no_grad():
        flat.param.add_(4.0)
    ema.update(taken=torch.tensor(False))
    assert torch.equal(ema.average, start)
    ema.update(taken=torch.tensor(True))
    torch.testing.assert_close(ema.average, start + 1.0)  # 0.75 * start + 0.25 * (start + 4)
    with ema.applied():
        torch.testing.assert_close(flat.param.detach(), start + 1.0)
    assert torch.equal(flat.param.detach(), start + 4.0)  # the raw weights are back, bit for bit
