"""Mixed precision: bf16 networks with float32 nats on the CPU, and fp16's loss scale composed
with the non-finite guard (fp16 autocast on the CPU stands in for CUDA's, which is not here)."""

import contextlib

import pytest
import torch
from conftest import cli_error
from test_trainer import make_trainer, poisoned

from vaekit.net_precision import lower_precision_nets
from vaekit.syncs import SyncCounter
from vaekit.training.precision import Precision

CPU = torch.device("cpu")
# long enough for digits to get close to its final NELBO, short enough for the suite
RUN = ["trainer.max_epochs=30", "eval.iw_samples=100", "trainer.progress=false", "trainer.log_images=false"]


def test_bf16_runs_the_networks_in_bf16_and_adds_up_nats_in_float32(tmp_path):
    trainer = make_trainer(tmp_path)
    model, x = trainer.model, trainer.data.val[:64]
    seen = []
    hook = model.decoder.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    with lower_precision_nets("cpu", torch.bfloat16):
        mixed = model(x)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the decoder's own output, before the cast back
    assert mixed.rec.dtype == mixed.kl.dtype == mixed.loss.dtype == torch.float32
    # same noise, so only the networks' rounding differs (bf16 keeps 8 bits of mantissa)
    relative = ((mixed.nelbo - plain.nelbo).abs() / plain.nelbo).max().item()
    assert 0 < relative < 2e-2


@pytest.mark.parametrize("path", ["eager", "sync_free"])
def test_fp16_overflows_are_skipped_by_the_scaler_and_not_counted_as_divergence(tmp_path, path):
    trainer = make_trainer(tmp_path, "trainer.max_epochs=1", "trainer.log_images=false")
    trainer.precision = Precision("16-mixed", CPU)
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**26)  # the first steps overflow
    with SyncCounter() if path == "sync_free" else contextlib.nullcontext():
        state = trainer.fit()
    steps = trainer.data.num_train_batches(trainer.settings.batch_size)
    taken = int(trainer.optimizer.state[trainer.flat.param]["step"])
    skipped = steps - taken
    assert 5 <= skipped <= steps - 4  # 2**26 halves until the gradients fit fp16, then steps are taken
    assert trainer.precision.scaler.get_scale() == 2.0 ** (26 - skipped)
    assert state.status == "finished" and state.nonfinite_total == 0 and state.rollbacks == 0
    assert torch.isfinite(trainer.flat.param).all() and state.best_val < 200


def test_fp16_nan_losses_still_count_and_roll_back_with_the_scaler(tmp_path):
    trainer = make_trainer(tmp_path, "trainer.max_epochs=2", "trainer.log_images=false")
    trainer.precision = Precision("16-mixed", CPU)
    scale = trainer.precision.scaler.get_scale()
    poisoned(trainer, set(range(20, 25)))  # five in a row in epoch 2: roll back to epoch 1
    state = trainer.fit()
    assert state.rollbacks == 1 and state.nonfinite_total == 5 and state.status == "finished"
    assert trainer.precision.scaler.get_scale() <= scale  # restored, then halved by any overflow since


def test_precision_not_offered_or_not_on_this_device_is_refused(capsys, tmp_path):
    fp16 = ["trainer.precision=16-mixed", "trainer.device=cpu"]
    line = cli_error(capsys, "train", *fp16, f"hydra.run.dir={tmp_path}/a")
    assert "16-mixed needs a CUDA GPU" in line and "bf16-mixed" in line
    line = cli_error(capsys, "train", "trainer.precision=fp8", f"hydra.run.dir={tmp_path}/b")
    assert "trainer.precision must be 32, bf16-mixed or 16-mixed, not fp8" in line


@pytest.fixture(scope="module")
def fp32_and_bf16(tmp_path_factory):
    """Test metrics of the same digits run in float32 and with bf16-mixed networks."""
    from vaekit import train

    root = tmp_path_factory.mktemp("precision")
    return {
        precision: train([*RUN, f"trainer.precision={precision}"], root / precision)
        for precision in ("32", "bf16-mixed")
    }


def test_bf16_on_the_cpu_trains_digits_as_well_as_float32(fp32_and_bf16):
    fp32, bf16 = fp32_and_bf16["32"], fp32_and_bf16["bf16-mixed"]
    assert fp32["epochs"] == bf16["epochs"] == 30
    assert abs(bf16["test_nelbo"] - fp32["test_nelbo"]) < 0.5, (bf16["test_nelbo"], fp32["test_nelbo"])
    assert bf16["test_iw_nll"] <= bf16["test_nelbo"]
