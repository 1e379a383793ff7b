"""Hostile files and faults: configs that would run code, resumes that fail, two writers,
damaged weights. Each case asserts one sentence, a non-zero exit, and unchanged run files."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, compose_train, run_vaekit, vaekit_executable, write_fake_mnist, write_idx

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


# ---------------------------------------------------------------- the table of hostile inputs
# Each case prepares its own copy of a finished run (and whatever files it needs), then
# runs the real command once. The cases fail fast, so they run two at a time, one thread each.

SMALL = ["net.hidden_dim=32", "model.latent_dim=4", "trainer.max_epochs=2", "eval.iw_samples=4",
         "eval.nelbo_samples=2", "trainer.progress=false"]  # fmt: skip


@pytest.fixture
def small_run(trained_run: Path) -> Path:
    """The session's finished run, which each case copies."""
    return trained_run


def change_checkpoint(path: Path, change) -> None:
    """Rewrite a checkpoint through `change(dict) -> dict`, with a valid digest."""
    save_atomic(change(load_checkpoint(path)), path)


def flip_trailer(path: Path) -> None:
    """Damage the zip's end-of-directory record, as a bad copy or disk would."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 22, len(data) - 18):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def wrong_shape(checkpoint: dict) -> dict:
    """The same checkpoint with one weight of another shape (a last.pt of another latent size)."""
    model = dict(checkpoint["model"])
    name = next(key for key, value in model.items() if value.dim() == 2)
    model[name] = torch.zeros(model[name].shape[0] + 1, model[name].shape[1])
    return {**checkpoint, "model": model}


def mnist_files(root: Path, change=None) -> Path:
    """Small MNIST IDX files under root/MNIST/raw, then `change(raw_folder)`."""
    root = root / "data"
    write_fake_mnist(root, n_train=60, n_test=20)
    if change is not None:
        change(root / "MNIST" / "raw")
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def gzip_only(path: Path) -> None:
    with gzip.open(f"{path}.gz", "wb") as handle:
        handle.write(path.read_bytes())
    path.unlink()


@dataclass
class Case:
    """One hostile input: `argv(tmp, run)` prepares files and returns the command's arguments;
    the command must fail with `message` in its one error line (or pass, with `exit_code=0`)."""

    name: str
    argv: Callable[[Path, Path], list[str]]
    message: str
    exit_code: int = 1


def fresh(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["train", *overrides, "trainer.max_epochs=1", f"hydra.run.dir={tmp / 'new'}"]


def on_run(*argv: str, before=None) -> Callable[[Path, Path], list[str]]:
    """argv with {run} replaced by the run's copy, after `before(run)` damaged it."""

    def prepare(tmp: Path, run: Path) -> list[str]:
        if before is not None:
            before(run)
        return [part.format(run=run, tmp=tmp) for part in argv]

    return prepare


def damaged(name: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    """A `before` step that rewrites <run>/<name> through `change`."""
    return lambda run: change_checkpoint(run / name, change)


def file_at(tmp: Path) -> Path:
    """A plain file where a directory could be asked for."""
    (tmp / "afile").touch()
    return tmp / "afile"


def mnist_with(change: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """`vaekit train dataset=mnist` on small IDX files changed by `change(raw_folder)`."""
    return lambda tmp, run: [
        "train",
        "dataset=mnist",
        "dataset.val_size=10",
        f"dataset.root={mnist_files(tmp, change)}",
    ]


def without_fit_state(checkpoint: dict) -> dict:
    return {key: value for key, value in checkpoint.items() if key != "fit_state"}


def with_bad_rng(checkpoint: dict) -> dict:
    return {**checkpoint, "rng": {"torch": 5}}


def with_unknown_device(checkpoint: dict) -> dict:
    return {**checkpoint, "rng": {**checkpoint["rng"], "device_type": "xpu9"}}


def with_changed_split(split: str) -> Callable[[dict], dict]:
    """The checkpoint as if its run had been trained on other `split` files."""
    return lambda checkpoint: {
        **checkpoint,
        "data_checksums": {**checkpoint["data_checksums"], split: "0" * 16},
    }


def second_run_on_other_test_set(run: Path) -> None:
    """A copy of the run beside it whose metrics.json names another test-set checksum."""
    other = Path(shutil.copytree(run, run.parent / "other"))
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["data_checksums"]["test"] = "0" * 16
    (other / "metrics.json").write_text(json.dumps(metrics))


def with_dataset_5(checkpoint: dict) -> dict:
    return {**checkpoint, "config": {**checkpoint["config"], "dataset": 5}}


def wide_test_images(raw: Path) -> None:
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((20, 14, 56)))


def extra_test_labels(raw: Path) -> None:
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(60))


def crafted(tmp: Path, run: Path) -> None:
    """best.pt and last.pt whose saved config would unpickle code that writes tmp/MARKER."""
    for name in ("best.pt", "last.pt"):
        change_checkpoint(
            run / name,
            lambda config_holder: {
                **config_holder,
                "config": crafted_config(config_holder["config"], tmp / "MARKER"),
            },
        )


def crafted_run(*argv: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, run: Path) -> list[str]:
        crafted(tmp, run)
        return [part.format(run=run) for part in argv]

    return prepare


def empty_folder(tmp: Path) -> Path:
    """A folder that is not a run; run_case checks that it stays empty."""
    (tmp / "empty").mkdir()
    return tmp / "empty"


def truncated_last(run: Path) -> None:
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])


TOO_MANY = "100000000000"
NO_GPU_DEVICE = "trainer.device=cuda:7" if not torch.cuda.is_available() else "trainer.device=tpu"
CASES = [
    Case(
        "crafted config: evaluate",
        crafted_run("evaluate", "{run}"),
        "asks to build its dataset from torch.load",
    ),
    Case(
        "crafted config: sample", crafted_run("sample", "{run}"), "asks to build its dataset from torch.load"
    ),
    Case(
        "crafted config: resume",
        crafted_run("train", "resume={run}"),
        "asks to build its dataset from torch.load",
    ),
    Case(
        "resume eval.iw_samples=0",
        on_run("train", "resume={run}", "eval.iw_samples=0"),
        "iw_samples must be at least 1",
    ),
    Case(
        "resume max_epochs=0",
        on_run("train", "resume={run}", "trainer.max_epochs=0"),
        "max_epochs must be at least 1",
    ),
    Case("resume without the GPU", on_run("train", "resume={run}", NO_GPU_DEVICE), "trainer.device="),
    Case(
        "resume another latent",
        on_run("train", "resume={run}", "model.latent_dim=3"),
        "latent_dim cannot change",
    ),
    Case(
        "resume a malformed last.pt", on_run("train", "resume={run}", before=truncated_last), "not a readable"
    ),
    Case(
        "fresh run into a finished run",
        on_run("train", "hydra.run.dir={run}"),
        "already holds a run: continue it",
    ),
    Case("evaluate k 1e11", on_run("evaluate", "{run}", "--k", TOO_MANY), f"--k={TOO_MANY} would evaluate"),
    Case("evaluate nelbo 1e11", on_run("evaluate", "{run}", "--nelbo-samples", TOO_MANY), "would evaluate"),
    Case("evaluate device meta", on_run("evaluate", "{run}", "--device", "meta"), "is not a device"),
    Case("evaluate huge seed", on_run("evaluate", "{run}", "--seed", "9" * 23), "--seed must be between 0"),
    Case("sample n 1e8", on_run("sample", "{run}", "--n", "100000000"), "would hold 100000000 images"),
    Case(
        "sample manifold 1000", on_run("sample", "{run}", "--manifold", "--steps", "1000"), "1000000 images"
    ),
    Case(
        "sample out is a directory",
        on_run("sample", "{run}", "--out", "{run}/out.png", before=lambda run: (run / "out.png").mkdir()),
        "is a directory",
    ),
    Case("sample device cpu:5", on_run("sample", "{run}", "--device", "cpu:5"), "names a CPU index"),
    Case(
        "resume eval budget", on_run("train", "resume={run}", f"eval.iw_samples={TOO_MANY}"), "would evaluate"
    ),
    Case("resume changes the seed", on_run("train", "resume={run}", "trainer.seed=5"), "seed cannot change"),
    Case("resume patience -1", on_run("train", "resume={run}", "trainer.patience=-1"), "patience must be 0"),
    Case("train device meta", fresh("trainer.device=meta"), "trainer.device=meta is not a device"),
    Case("train device cpu:5", fresh("trainer.device=cpu:5"), "trainer.device=cpu:5 names a CPU index"),
    Case("train huge seed", fresh("trainer.seed=" + "9" * 23), "trainer.seed must be between 0"),
    Case("train min_delta inf", fresh("trainer.min_delta=inf"), "trainer.min_delta must be a finite number"),
    Case("train rollback -1", fresh("trainer.rollback_lr_factor=-1"), "rollback_lr_factor must be in (0, 1]"),
    Case(
        "train rollback nan", fresh("trainer.rollback_lr_factor=nan"), "rollback_lr_factor must be in (0, 1]"
    ),
    Case("train +foo=bar", fresh("+foo=bar"), "foo is not a vaekit setting"),
    Case("train images=both", fresh("trainer.images=both"), "trainer.images must be mean or sample"),
    Case("train +trainer.foo=1", fresh("+trainer.foo=1"), "trainer.foo is not a vaekit setting"),
    Case("build error has its cause", fresh("+prior.foo=1"), "unexpected keyword argument 'foo'"),
    Case("latent_dim 1e7", fresh("model.latent_dim=10000000"), "GiB free: make the model smaller"),
    Case("run dir is a file", lambda tmp, run: ["train", f"hydra.run.dir={file_at(tmp)}"], "is a file"),
    Case("run dir under a file", lambda tmp, run: ["train", f"hydra.run.dir={file_at(tmp)}/x"], "lies under"),
    Case("run dir too long", lambda tmp, run: ["train", f"hydra.run.dir={tmp / ('a' * 300)}"], "255 bytes"),
    Case(
        "sweep dir is a file",
        lambda tmp, run: ["train", "-m", "model.latent_dim=2,3", f"hydra.sweep.dir={file_at(tmp)}"],
        "is a file",
    ),
    Case("resume a file", lambda tmp, run: ["train", f"resume={file_at(tmp)}"], "holds no last.pt"),
    Case("resume a non-run", lambda tmp, run: ["train", f"resume={empty_folder(tmp)}"], "holds no last.pt"),
    Case(
        "fit_state missing",
        on_run("evaluate", "{run}", before=damaged("best.pt", without_fit_state)),
        "its fit_state has no epoch count",
    ),
    Case(
        "rng of the wrong type",
        on_run("train", "resume={run}", "trainer.max_epochs=5", before=damaged("last.pt", with_bad_rng)),
        "cannot be resumed: its RNG states",
    ),
    Case(
        "rng from an unknown device",
        on_run("train", "resume={run}", "trainer.max_epochs=5",
               before=damaged("last.pt", with_unknown_device)),
        "a device of type 'xpu9', which vaekit does not know",
    ),
    Case(
        "resume after the train files changed",
        on_run("train", "resume={run}", "trainer.max_epochs=5",
               before=damaged("last.pt", with_changed_split("train"))),
        "The train split is not the one",
    ),
    Case(
        "evaluate after the test files changed",
        on_run("evaluate", "{run}", before=damaged("best.pt", with_changed_split("test"))),
        "The test split of the data on disk differs",
    ),
    Case(
        "report over two test sets",
        on_run("report", "{tmp}", before=second_run_on_other_test_set),
        "were scored on different test sets",
    ),
    Case(
        "last.pt of another latent size",
        on_run("train", "resume={run}", "trainer.max_epochs=5", before=damaged("last.pt", wrong_shape)),
        "does not fit the model its config",
    ),
    Case(
        "damaged zip trailer",
        on_run("evaluate", "{run}", before=lambda run: flip_trailer(run / "best.pt")),
        "is not a readable vaekit checkpoint",
    ),
    Case(
        "dataset: 5",
        on_run("evaluate", "{run}", before=damaged("best.pt", with_dataset_5)),
        "no dataset settings",
    ),
    Case(
        "report.csv is a directory",
        on_run("report", "{run}", before=lambda run: (run / "report.csv").mkdir()),
        "Is a directory",
    ),
    Case(
        "truncated IDX",
        mnist_with(lambda raw: truncate(raw / "train-images-idx3-ubyte")),
        "train-images-idx3-ubyte is truncated or damaged",
    ),
    Case(
        "gzipped IDX only",
        mnist_with(lambda raw: gzip_only(raw / "t10k-labels-idx1-ubyte")),
        "t10k-labels-idx1-ubyte.gz is compressed",
    ),
    Case(
        "test split of another shape",
        mnist_with(wide_test_images),
        "test split holds images of shape (1, 14, 56), but the train split's are (1, 28, 28)",
    ),
    Case("more labels than images", mnist_with(extra_test_labels), "test split has 20 images but 60 labels"),
]


def run_case(case: Case, tmp: Path, run: Path) -> str | None:
    """None when the case behaves, else what went wrong."""
    argv = case.argv(tmp, run)  # prepares the damage first: what it leaves must then stay as it is
    before = fingerprints(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [vaekit_executable(), *argv]
    done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("vaekit: error: ")]
    problems = []
    if done.returncode != case.exit_code:
        problems.append(f"exit {done.returncode}")
    if "Traceback" in done.stderr or (case.exit_code and (len(errors) != 1 or case.message not in errors[0])):
        problems.append(f"stderr {done.stderr[-600:]!r}")
    if len(done.stderr.strip().splitlines()) > 5:
        problems.append("more than a few lines")
    if fingerprints(run) != before:
        problems.append("the run's files changed")
    if list(run.glob(".*.tmp")):
        problems.append("temporary files left")
    if (tmp / "empty").is_dir() and any((tmp / "empty").iterdir()):
        problems.append("files were created in a folder that is not a run")
    if (tmp / "MARKER").exists():
        problems.append("the crafted config ran code")
    if (run / "resume_failed.json").exists():
        problems.append("a refused resume wrote resume_failed.json")
    return f"{case.name}: {'; '.join(problems)}" if problems else None


def test_hostile_inputs_through_the_real_command(small_run: Path, tmp_path: Path):
    assert len(CASES) >= 40
    jobs = []
    for index, case in enumerate(CASES):
        tmp = tmp_path / f"case{index}"
        tmp.mkdir()
        jobs.append((case, tmp, Path(shutil.copytree(small_run, tmp / "run"))))
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(lambda job: run_case(*job), jobs) if f is not None]
    assert not failures, "\n".join(failures)


def test_a_report_survives_nan_metrics_and_a_run_named_like_math(small_run: Path, tmp_path: Path):
    odd = Path(shutil.copytree(small_run, tmp_path / "sweep" / "run_$\\foo{$"))
    metrics = json.loads((odd / "metrics.json").read_text())
    (odd / "metrics.json").write_text(json.dumps({**metrics, "epochs": float("nan")}))  # NaN, as JSON allows
    done = run_vaekit("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "run_$\\foo{$" in done.stdout and (tmp_path / "sweep" / "report_curves.png").stat().st_size > 0


def test_a_gaussian_likelihood_on_discrete_data_says_so(tmp_path: Path, caplog):
    from vaekit.commands.train import train

    cfg = compose_train(*SMALL, "likelihood=gaussian", "trainer.max_epochs=1", "trainer.log_images=false")
    with caplog.at_level(logging.WARNING, logger="vaekit"):
        metrics = train(cfg, tmp_path / "run")
    assert "is a density on discrete pixel values" in caplog.text
    assert metrics["status"] == "finished"


def test_two_resumes_at_once_one_proceeds_and_the_run_stays_consistent(small_run: Path, tmp_path: Path):
    for attempt in range(2):
        run = Path(shutil.copytree(small_run, tmp_path / f"run{attempt}"))
        argv = [vaekit_executable(), "train", f"resume={run}", "trainer.max_epochs=5"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
        outputs = [proc.communicate(timeout=300) for proc in procs]
        codes = sorted(proc.returncode for proc in procs)
        refused = [err for _, err in outputs if "is in use by another vaekit process" in err]
        assert codes == [0, 1] and len(refused) == 1, outputs  # exactly one proceeds
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs"] == 5 == load_checkpoint(run / "last.pt")["fit_state"]["epoch"]
        assert metrics["best_epoch"] == load_checkpoint(run / "best.pt")["fit_state"]["epoch"]
