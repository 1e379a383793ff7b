"""The streaming data path: the same batches as the in-memory path for the same seed, a
restart in the middle of an epoch that continues it exactly, and the real command on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_train, run_vaekit

from vaekit.build import build
from vaekit.data.stream import StreamedData


def batches_of(in_memory: bool, workers: int = 0, epochs: int = 2) -> list[torch.Tensor]:
    cfg = compose_train("likelihood=bernoulli", f"data.in_memory={str(in_memory).lower()}",
                        f"data.num_workers={workers}")  # fmt: skip
    torch.manual_seed(0)
    data = build(cfg, torch.device("cpu")).data
    assert isinstance(data, StreamedData) != in_memory
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(epochs):
        perm = data.permutation(generator)
        out += [data.train_batch(perm, step, 100, generator) for step in range(data.num_train_batches(100))]
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_equal_the_in_memory_ones_bit_for_bit(workers: int):
    resident, streamed = batches_of(True), batches_of(False, workers)
    assert len(resident) == len(streamed) == 20
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed, strict=True))
    assert set(torch.cat(streamed).unique().tolist()) == {0.0, 1.0}  # binarized afresh


def test_a_restart_mid_epoch_continues_the_epoch_exactly():
    cfg = compose_train("likelihood=bernoulli", "data.in_memory=false")
    data = build(cfg, torch.device("cpu")).data
    perm = data.permutation(torch.Generator().manual_seed(3))
    state = torch.Generator().manual_seed(4)
    straight = [data.train_batch(perm, step, 64, state) for step in range(6)]
    resumed_generator = torch.Generator().manual_seed(4)
    for step in range(3):
        data.train_batch(perm, step, 64, resumed_generator)
    fresh = build(cfg, torch.device("cpu")).data  # a new process after last.pt: a new loader
    again = [fresh.train_batch(perm.clone(), step, 64, resumed_generator) for step in range(3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], again, strict=True))


def test_the_vampprior_initializes_from_streamed_rows():
    cfg = compose_train("prior=vampprior", "data.in_memory=false")
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"))
    built.model.prior.initialize_from_data(built.data.train)
    reference = compose_train("prior=vampprior")
    torch.manual_seed(0)
    resident = build(reference, torch.device("cpu"))
    resident.model.prior.initialize_from_data(resident.data.train)
    assert torch.equal(built.model.prior.pseudo_logits, resident.model.prior.pseudo_logits)


def test_the_command_trains_on_the_streaming_path(tmp_path: Path):
    run = tmp_path / "run"
    done = run_vaekit("train", *FAST, "data.in_memory=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "streaming the training split from host memory" in done.stdout + done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 3
