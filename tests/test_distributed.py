"""Data-parallel training: the batch's rows and noise shared out, sums added up over processes,
and real 2-process runs (torchrun, gloo on the CPU, one thread each) against one process."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_error, compose_train, read_events, run_vaekit
from test_resume import assert_same_run, wait_for_epoch

from vaekit.build import build_dataset, build_model
from vaekit.data import DeviceData
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import importance_estimates
from vaekit.evaluation.metrics import nelbo_terms
from vaekit.shards import Shard, shard_rows, split_noise, standard_normal
from vaekit.training import distributed
from vaekit.training.distributed import World

# the run every multi-process test shares: 1000 digits, batches of 64 (32 per process)
RUN = ["trainer.patience=100", "eval.iw_samples=16", "trainer.progress=false", "model.latent_dim=4"]
EPOCHS = 12  # long enough to be killed mid-run


def test_shard_rows_cover_a_batch_once_with_sizes_within_one():
    for world in (1, 2, 3, 4):
        for count in range(world, 40):
            parts = [shard_rows(count, rank, world) for rank in range(world)]
            assert [i for part in parts for i in range(part.start, part.stop)] == list(range(count))
            sizes = [part.stop - part.start for part in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_split_noise_keeps_each_process_rows_of_the_whole_batch_draw(batch_dim):
    shape = (6, 10, 4) if batch_dim == 1 else (10, 6, 4)
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    whole = torch.randn(shape)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(standard_normal(torch.Size(shape), batch_dim, torch.float32, cpu), whole)  # torch's
    for rank in range(3):
        rows = shard_rows(10, rank, 3)
        local = list(shape)
        local[batch_dim] = rows.stop - rows.start
        torch.manual_seed(5)
        with split_noise(10, rows):
            part = standard_normal(torch.Size(local), batch_dim, torch.float32, cpu)
        assert torch.equal(part, whole.narrow(batch_dim, rows.start, rows.stop - rows.start))
        assert torch.equal(torch.get_rng_state(), after)  # every process's stream advances alike


@pytest.fixture(scope="module")
def digits_parts():
    cfg = compose_train("model.latent_dim=4")
    raw = build_dataset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, raw).eval()
    return raw, model


def test_each_process_gets_its_rows_of_the_binarized_batch_and_the_stream_advances_alike(digits_parts):
    raw, _ = digits_parts
    data = DeviceData(raw, torch.device("cpu"), binarize=True)
    perm = data.permutation(torch.Generator().manual_seed(0))
    whole_generator = torch.Generator().manual_seed(1)
    whole = data.train_batch(perm, 15, 64, whole_generator)  # the last batch: 40 examples
    for rank in range(2):
        generator = torch.Generator().manual_seed(1)
        part = data.train_batch(perm, 15, 64, generator, Shard(rank, 2, reduce=lambda t: t))
        assert torch.equal(part, whole[shard_rows(40, rank, 2)])
        assert torch.equal(generator.get_state(), whole_generator.get_state())


def two_processes(score):
    """score(shard) in process 1 then process 0 of two, each seeded alike; process 0's
    reduction adds what process 1 contributed (a stand-in for the all-reduce)."""
    sent = []

    def keep(tensor):
        sent.append(tensor.clone())
        return tensor

    torch.manual_seed(7)
    score(Shard(1, 2, keep))
    torch.manual_seed(7)
    return score(Shard(0, 2, lambda tensor: tensor.add_(sent[0])))


def test_validation_over_two_processes_gives_the_one_process_numbers(digits_parts):
    raw, model = digits_parts
    x = raw.val.float() / 16
    torch.manual_seed(7)
    alone = nelbo_terms(model, x, 128)  # batches of 128: the last one has 94 rows
    shared = two_processes(lambda shard: nelbo_terms(model, x, 128, shard))
    assert shared.keys() == alone.keys()
    for name, value in alone.items():
        assert shared[name] == pytest.approx(value, rel=1e-6), name


def test_the_test_pass_over_two_processes_adds_up_each_process_block(digits_parts):
    raw, model = digits_parts
    x = raw.test.float() / 16
    shared = two_processes(lambda shard: importance_estimates(model, x, 5, progress=False, shard=shard))
    parts = []
    for rank in (1, 0):
        block = x[shard_rows(447, rank, 2)]
        torch.manual_seed(7)
        parts.append((block.shape[0], importance_estimates(model, block, 5, progress=False)))
    for name in ("iw_nll", "nelbo", "rec", "kl/z"):
        expected = sum(n * result[name] for n, result in parts) / 447
        assert shared[name] == pytest.approx(expected, rel=1e-9), name


def test_what_processes_cannot_share_is_refused_in_one_sentence(monkeypatch, digits_parts):
    _, model = digits_parts
    monkeypatch.setattr(distributed, "current", lambda: World(0, 3))
    cfg = compose_train()
    sizes = {"train": 1000, "val": 350, "test": 447}
    with pytest.raises(VaekitError, match="batch_size=64 cannot be split evenly over 3 processes"):
        distributed.check_world(cfg, model, sizes)
    with pytest.raises(VaekitError, match="holds 1 example"):
        distributed.check_world(compose_train("trainer.batch_size=111"), model, sizes)
    spherical = build_model(compose_train("posterior=vmf", "prior=uniform_sphere"), build_dataset(cfg))
    with pytest.raises(VaekitError, match="cannot share out"):
        distributed.check_world(compose_train("trainer.batch_size=66"), spherical, {**sizes, "train": 990})


def test_more_devices_than_this_machine_has_are_refused(capsys, tmp_path):
    devices = ["trainer.devices=999", "trainer.device=cpu"]
    line = cli_error(capsys, "train", *devices, f"hydra.run.dir={tmp_path}")
    assert f"has {os.cpu_count()} cores" in line


# ------------------------------------------------------------------ real processes
def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def torchrun(*args: str, cwd: Path) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m vaekit train ARGS`."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "vaekit", "train", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same digits run in one process and in two (`trainer.devices=2`, which runs torchrun)."""
    root = tmp_path_factory.mktemp("ddp")
    one = run_vaekit("train", *RUN, "trainer.max_epochs=3", f"hydra.run.dir={root / 'one'}", cwd=root)
    assert one.returncode == 0, one.stderr
    two_root = root / "two"
    two_root.mkdir()
    devices = [f"trainer.max_epochs={EPOCHS}", "trainer.devices=2", f"hydra.run.dir={two_root / 'run'}"]
    two = run_vaekit("train", *RUN, *devices, cwd=two_root)
    assert two.returncode == 0, two.stderr
    return root / "one", two_root / "run", two


def test_two_processes_with_half_batches_train_like_one_epoch_by_epoch(runs):
    one, two, _ = runs
    alone, _ = read_events(one)
    shared, _ = read_events(two)
    for tag in ("train/nelbo", "val/nelbo", "train/kl", "val/rec"):
        expected = dict(alone[tag])
        assert sorted(expected) == [1, 2, 3]
        for epoch, value in expected.items():
            assert dict(shared[tag])[epoch] == pytest.approx(value, rel=1e-4), (tag, epoch)


def test_only_rank_0_writes_and_prints(runs):
    one, two, done = runs

    def files(run: Path) -> list[str]:  # event files and the projector's step folder by kind
        names = [str(p.relative_to(run)).split("events.out")[0] for p in run.rglob("*") if p.is_file()]
        return sorted(re.sub(r"\d+", "N", name) for name in names)

    assert files(two) == files(one)  # the same files as one process's run, no more
    assert sorted(p.name for p in two.parent.iterdir()) == ["run"]  # no run directory of rank 1's
    log = (two / "train.log").read_text()
    assert log.count(f"epoch 1/{EPOCHS} ") == 1 and "starting 2 training processes" in log
    assert done.stdout.count("test NELBO") == 1
    assert json.loads((two / "metrics.json").read_text())["processes"] == 2
    assert json.loads((one / "metrics.json").read_text())["processes"] == 1


def test_sigkill_of_two_processes_then_resume_with_two_ends_like_the_uninterrupted_run(runs, tmp_path):
    _, reference, _ = runs
    run_dir = tmp_path / "run"
    proc = torchrun(*RUN, f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_epoch(run_dir, 3, proc)
    time.sleep(0.05 * float(torch.rand((), generator=torch.Generator().manual_seed(13))))
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both processes, at once
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed_at = torch.load(run_dir / "last.pt", weights_only=True)["fit_state"]["epoch"]
    assert 3 <= killed_at < EPOCHS and not (run_dir / "metrics.json").exists()
    resumed = torchrun(f"resume={run_dir}", cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming at epoch {killed_at}" in out + err
    assert_same_run(reference, run_dir)
