"""Hostile files and faults: configs that would run code, resumes that fail, two writers,
damaged weights. Each case asserts one sentence, a non-zero exit, and unchanged run files."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import cli_error, run_vaekit

from vaekit.errors import VaekitError
from vaekit.runs import load_run
from vaekit.training.checkpoint import load_checkpoint, save_atomic
from vaekit.training.lock import RunLock

RUN_FILES = ("metrics.json", "best.pt", "last.pt")


def fingerprints(run_dir: Path) -> dict[str, str]:
    """sha256 of the files a finished run must keep byte for byte."""
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in RUN_FILES}


def assert_one_sentence(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("vaekit: error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr


@pytest.fixture
def finished_run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's finished run."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


class WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def crafted_config(config: dict, marker: Path) -> dict:
    """The saved config with a dataset node that, instantiated, unpickles code: a chain that
    passes torch.load(weights_only=True) of the checkpoint itself."""
    payload = pickle.dumps(WritesMarker(marker)).decode("latin-1")
    bytes_node = {"_target_": "builtins.bytes", "_args_": [payload, "latin-1"]}
    stream = {"_target_": "io.BytesIO", "_args_": [bytes_node]}
    return {**config, "dataset": {"_target_": "torch.load", "weights_only": False, "f": stream}}


def rewrite_config(path: Path, change) -> None:
    """Rewrite a checkpoint's config (with a valid digest, as an attacker could)."""
    checkpoint = load_checkpoint(path)
    save_atomic({**checkpoint, "config": change(checkpoint["config"])}, path)


@pytest.mark.parametrize("command", ["evaluate", "sample", "resume"])
def test_a_crafted_config_in_a_checkpoint_runs_no_code(finished_run: Path, tmp_path: Path, command: str):
    marker = tmp_path / "MARKER"
    for name in ("best.pt", "last.pt"):
        rewrite_config(finished_run / name, lambda config: crafted_config(config, marker))
    before = fingerprints(finished_run)
    argv = ["train", f"resume={finished_run}"] if command == "resume" else [command, str(finished_run)]
    done = run_vaekit(*argv, cwd=tmp_path)
    assert_one_sentence(done, "asks to build its dataset from torch.load, which is not vaekit's")
    assert not marker.exists()
    assert fingerprints(finished_run) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {**c, "model": {**c["model"], "latent_dim": {"_target_": "vaekit.data.load_digits"}}},
         "holds model.latent_dim._target_, which would make Hydra call code"),
        (lambda c: {**c, "net": {**c["net"], "_args_": [{"_target_": "os.getcwd"}]}},
         "holds net._args_, which would make Hydra call code"),
        (lambda c: {**c, "prior": {**c["prior"], "_partial_": True}}, "holds prior._partial_"),
        (lambda c: {**c, "optimizer": {**c["optimizer"], "_target_": "torch.load"}},
         "build its optimizer from torch.load"),
        (lambda c: {**c, "dataset": {**c["dataset"], "name": "${oc.env:HOME}"}}, "holds an interpolation"),
        (lambda c: {**c, "dataset": 5}, "has no dataset settings"),
        (lambda c: {**c, "likelihood": {"num_vals": 17}}, "names no class for its likelihood"),
    ],
    ids=["nested_target", "args", "partial", "optimizer", "interpolation", "not_a_mapping", "no_target"],
)  # fmt: skip
def test_configs_that_are_not_plain_data_are_refused(finished_run: Path, change, message: str):
    rewrite_config(finished_run / "best.pt", change)
    with pytest.raises(
        VaekitError, match=message.replace("(", r"\(").replace("$", r"\$").replace("{", r"\{")
    ):
        load_run(finished_run, "cpu")


def test_own_code_runs_only_under_a_trusted_prefix(finished_run: Path, capsys):
    rewrite_config(
        finished_run / "best.pt", lambda c: {**c, "prior": {**c["prior"], "_target_": "mylab.priors.Fancy"}}
    )
    line = cli_error(capsys, "evaluate", str(finished_run), "--k", "2")
    assert "build its prior from mylab.priors.Fancy" in line and "pass --trust mylab" in line
    assert "--trust mylabx" not in line
    # trusted, the config is built: here the module does not exist, which is one sentence too
    line = cli_error(capsys, "evaluate", str(finished_run), "--k", "2", "--trust", "mylab")
    assert "Could not build the prior from its config" in line


BAD_RESUMES = [
    (["eval.iw_samples=0"], "eval.iw_samples must be at least 1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be at least 1"),
    (["trainer.device=cuda:7" if not torch.cuda.is_available() else "trainer.device=tpu"], "trainer.device="),
    (["model.latent_dim=3"], "so model.latent_dim cannot change"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_RESUMES, ids=[o[0] for o, _ in BAD_RESUMES])
def test_a_refused_resume_leaves_the_finished_run_as_it_was(finished_run: Path, tmp_path, overrides, message):
    before = fingerprints(finished_run)
    done = run_vaekit("train", f"resume={finished_run}", *overrides, cwd=tmp_path)
    assert_one_sentence(done, message)
    assert fingerprints(finished_run) == before
    assert not (finished_run / "resume_failed.json").exists()


def test_a_malformed_last_pt_is_one_sentence_and_changes_nothing(finished_run: Path, tmp_path: Path):
    last = finished_run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = fingerprints(finished_run)
    done = run_vaekit("train", f"resume={finished_run}", cwd=tmp_path)
    assert_one_sentence(done, "is not a readable vaekit checkpoint")
    assert fingerprints(finished_run) == before


def test_a_fresh_run_into_a_finished_run_directory_is_refused(finished_run: Path, tmp_path: Path):
    before = fingerprints(finished_run)
    done = run_vaekit("train", "trainer.max_epochs=1", f"hydra.run.dir={finished_run}", cwd=tmp_path)
    assert_one_sentence(done, f"{finished_run} already holds a run: continue it with `vaekit train resume=")
    assert fingerprints(finished_run) == before


def test_a_second_writer_is_told_which_process_holds_the_run(finished_run: Path, tmp_path: Path):
    before = fingerprints(finished_run)
    with RunLock(finished_run):
        done = run_vaekit("train", f"resume={finished_run}", "trainer.max_epochs=50", cwd=tmp_path)
    assert_one_sentence(done, f"is in use by another vaekit process (pid {os.getpid()})")
    assert fingerprints(finished_run) == before


def test_the_lock_dies_with_its_process(tmp_path: Path):
    script = (
        "import time\nfrom pathlib import Path\nfrom vaekit.training.lock import RunLock\n"
        f"with RunLock(Path({str(tmp_path)!r})):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(VaekitError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):  # no stale lock after SIGKILL
        pass


def largest_member_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the data of the largest file inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda member: member.file_size)
    raw = path.read_bytes()
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_flipped_bits_inside_a_tensor_are_caught_by_the_digest(finished_run: Path, capsys):
    path = finished_run / "best.pt"
    offset, size = largest_member_offset(path)
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    line = cli_error(capsys, "evaluate", str(finished_run), "--k", "2")
    assert f"{path} is damaged: its contents do not match the digest written with them" in line
