"""The same run on any device: data randomness from CPU generators, test-set checksums,
RNG states that resume across device types, portable checkpoints, deterministic mode, and
training steps that wait on no host sync."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_vaekit

from vaekit.build import build, build_dataset
from vaekit.data import BINARIZE_SEED, DeviceData
from vaekit.data.memory import changed_splits, split_checksum
from vaekit.spherical import SYNC_FREE_MAX_DRAWS, VonMisesFisher
from vaekit.syncs import SyncCounter
from vaekit.training import rng_state
from vaekit.training.checkpoint import load_checkpoint, save_atomic

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def digits():
    return build_dataset(compose_train())


# ------------------------------------------------------------------- data randomness
@pytest.mark.parametrize("device", DEVICES)
def test_val_and_test_are_binarized_from_a_cpu_generator_on_every_device(digits, device):
    data = DeviceData(digits, torch.device(device), binarize=True)
    generator = torch.Generator().manual_seed(BINARIZE_SEED)
    val = torch.bernoulli(digits.val.float() / 16, generator=generator)
    test = torch.bernoulli(digits.test.float() / 16, generator=generator)
    assert torch.equal(data.val.cpu(), val) and torch.equal(data.test.cpu(), test)
    assert data.checksums["test"] == split_checksum(test)
    assert data.checksums == DeviceData(digits, torch.device("cpu"), binarize=True).checksums


@pytest.mark.parametrize("device", DEVICES)
def test_permutations_and_batch_binarization_come_from_the_cpu_generator(digits, device):
    data = DeviceData(digits, torch.device(device), binarize=True)
    perm = data.permutation(torch.Generator().manual_seed(5))
    assert perm.device.type == device
    assert torch.equal(perm.cpu(), torch.randperm(1000, generator=torch.Generator().manual_seed(5)))
    batch = data.train_batch(perm, 1, 64, torch.Generator().manual_seed(6))
    u = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    expected = (u < digits.train[perm[64:128].cpu()].float() / 16).float()
    assert torch.equal(batch.cpu(), expected)


def test_checksums_name_the_split_that_changed(digits):
    now = DeviceData(digits, torch.device("cpu"), binarize=False).checksums
    assert now["test"] == split_checksum(digits.test) and len(set(now.values())) == 3
    assert changed_splits(now, now) == [] and changed_splits(None, now) == []
    edited = digits.test.clone()
    edited[0, 0, 0, 0] += 1
    assert changed_splits({**now, "test": split_checksum(edited)}, now) == ["test"]


# ----------------------------------------------------------------------- RNG states
def test_rng_states_are_cpu_tensors_and_name_their_device():
    rng = rng_state.capture(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert rng["device_type"] == "cpu" and "cuda" not in rng
    assert rng_state.check_rng(rng) is None
    assert "does not know" in rng_state.check_rng({**rng, "device_type": "xpu9"})
    assert "not byte tensors" in rng_state.check_rng({**rng, "data": 5})


def test_a_cuda_shaped_data_state_is_reseeded_from_the_seed_and_position():
    zeros = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    cuda_shaped = {"torch": torch.get_rng_state(), "data": zeros, "device_type": "cuda", "cuda": [zeros] * 4}
    assert rng_state.check_rng(cuda_shaped) is None
    states = []
    for position in ((2, 5), (2, 5), (2, 6)):
        generator = torch.Generator()
        rng_state.restore(cuda_shaped, generator, torch.device("cpu"), seed=0, position=position)
        states.append(generator.get_state())
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_state_saved_with_several_gpus_restores_on_one():
    device = torch.device("cuda")
    torch.cuda.manual_seed(11)
    expected = torch.cuda.get_rng_state(device)
    rng = {**rng_state.capture(torch.Generator(), device), "cuda": [expected] * 4}
    torch.cuda.manual_seed(12)
    rng_state.restore(rng, torch.Generator(), device, seed=0, position=(0, 0))
    assert torch.equal(torch.cuda.get_rng_state(device), expected)


def gpu_shaped(checkpoint: dict) -> dict:
    """The checkpoint as an older vaekit wrote it on a 4-GPU machine: CUDA generator states."""
    zeros = torch.zeros(16, dtype=torch.uint8)
    rng = {"torch": checkpoint["rng"]["torch"], "data": zeros, "cuda": [zeros] * 4}
    return {**checkpoint, "rng": rng}


def test_a_run_with_cuda_generator_states_resumes_on_the_cpu_and_scores_the_same_test_set(
    trained_run: Path, tmp_path: Path
):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    save_atomic(gpu_shaped(load_checkpoint(run / "last.pt")), run / "last.pt")
    done = run_vaekit("train", f"resume={run}", "trainer.max_epochs=4", "trainer.device=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "re-seeded it from the run's seed" in done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 4
    from vaekit.commands.evaluate import evaluate_run

    result = evaluate_run(run, k=2, nelbo_samples=1, device="cpu", progress=False)
    assert result["checksum"] == metrics["data_checksums"]["test"]


def test_checkpoints_hold_only_cpu_tensors_and_load_with_plain_torch_load(trained_run: Path):
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(trained_run / name, weights_only=True)  # no map_location
        tensors = [t for part in ("model", "optimizer", "rng") for t in _tensors(checkpoint[part])]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
        assert checkpoint["data_checksums"] == json.loads((trained_run / "metrics.json").read_text())[
            "data_checksums"
        ]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


# --------------------------------------------------------------------- host syncs
def test_the_sync_counter_counts_value_reads_and_data_dependent_shapes():
    x = torch.randn(10)
    with SyncCounter() as syncs:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0].sum()
        torch.nonzero(x)
        (x * 2).exp()
        x[:3].tolist()
    assert syncs.total == 5, syncs.by_op
    assert x.tolist() == x.tolist()  # the method is itself again outside the counter
    assert syncs.by_op["Tensor.tolist"] == 1


SPHERICAL = ("vmf", "power_spherical")
COMBINATIONS = [
    *[(p, "uniform_sphere") for p in SPHERICAL],
    *[(p, prior) for p in ("gaussian", "planar", "sylvester", "iaf") for prior in ("standard", "vampprior")],
]


@pytest.mark.parametrize(("posterior", "prior"), COMBINATIONS)
def test_a_training_step_waits_on_no_host_sync(posterior: str, prior: str):
    cfg = compose_train(f"posterior={posterior}", f"prior={prior}", "net.hidden_dim=32", "model.latent_dim=4")
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    model, data = built.model, built.data
    model.prior.initialize_from_data(data.train)
    optimizer = torch.optim.Adam(model.parameters())
    generator = torch.Generator().manual_seed(1)
    perm = data.permutation(generator)
    for step in range(2):  # the second step is counted: the first may fill caches
        with SyncCounter() as syncs:
            x = data.train_batch(perm, step, 64, generator)
            loss = model(x, beta=1.0, free_bits=0.0).loss.mean()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()  # torch's Adam reads its step counters: CPU tensors on a GPU too
    assert syncs.total == 0, syncs.by_op


@pytest.mark.parametrize(("m", "kappa"), [(3, 1.0), (10, 50.0)])
def test_vmf_sampling_without_syncs_and_with_checks_give_the_same_distribution(m: int, kappa: float):
    from test_spherical import reference_mean_cosine, unit

    mu = unit(m, seed=1)
    q = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64))
    expected = reference_mean_cosine(VonMisesFisher, m, kappa)
    torch.manual_seed(0)
    for n in (SYNC_FREE_MAX_DRAWS // 4, 2 * SYNC_FREE_MAX_DRAWS):  # the sync-free and the checked path
        with SyncCounter() as syncs:
            cosine = q.sample((n,)) @ mu
        assert (syncs.total == 0) == (n <= SYNC_FREE_MAX_DRAWS)
        error = cosine.std().item() / math.sqrt(n)
        assert abs(cosine.mean().item() - expected) < 4.5 * error


# ------------------------------------------------------------------ deterministic mode
def test_deterministic_mode_sets_what_repeatable_gpu_runs_need(monkeypatch: pytest.MonkeyPatch):
    from vaekit.training.determinism import make_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        make_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_on_a_gpu_never_wait_for_the_host(tmp_path: Path):
    """torch.cuda.set_sync_debug_mode("error") raises at any host sync: the steps of an epoch
    run inside it; only the guard's read and the epoch's means at its end may sync."""
    from vaekit.build import instantiate_group
    from vaekit.loggers.tensorboard import RunLogger
    from vaekit.training.flatten import FlatParameters
    from vaekit.training.signals import StopRequest
    from vaekit.training.trainer import EpochProgress, Trainer

    cfg = compose_train("trainer.log_images=false")
    torch.manual_seed(0)
    built = build(cfg, torch.device("cuda"))
    flat = FlatParameters(built.model)
    optimizer = instantiate_group(cfg.optimizer, "optimizer", params=[flat.param])
    trainer = Trainer(
        built.model, flat, optimizer, built.data, cfg.trainer, tmp_path, RunLogger(tmp_path), {},
        StopRequest(), 1000,
    )  # fmt: skip
    trainer.progress = EpochProgress(perm=built.data.permutation(trainer.generator))  # made before
    reads = []
    read_guard, epoch_means = trainer._read_guard, trainer._epoch_means

    def allowed(read):
        def call(*args):
            torch.cuda.set_sync_debug_mode("default")
            reads.append(read.__name__)
            return read(*args)

        return call

    trainer._read_guard, trainer._epoch_means = allowed(read_guard), allowed(epoch_means)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = trainer._train_epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.guard.sync_free and reads == ["_read_guard", "_epoch_means"]
    assert math.isfinite(terms["nelbo"])
