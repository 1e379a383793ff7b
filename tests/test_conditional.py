"""The conditional VAE (`model.conditional=true`): samples of each label look like that label to a
classifier, the real train / sample / evaluate / report commands, one-sentence refusals, and
labels that follow their images through every batching path (training batches on both data
paths, validation, the importance pass, posterior means, shards)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, compose_train, run_vaekit
from PIL import Image
from torch import Tensor, nn

from vaekit.build import build, class_count
from vaekit.data import RawSplits
from vaekit.data.stream import StreamedData
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import importance_estimates
from vaekit.evaluation.metrics import nelbo_terms
from vaekit.latents import posterior_means
from vaekit.loggers.base import model_grids
from vaekit.objectives import ELBO
from vaekit.shards import Shard

CLASSIFIER_EPOCHS = 60  # measured: 95-98% of the samples classified as their label (seeds 0, 1, 2)


def one_sentence_refusal(done, message: str) -> None:
    """A refused `vaekit` command: exit 1, one `vaekit: error:` line holding `message`, no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in done.stderr.splitlines() if line.startswith("vaekit: error: ")]
    assert len(errors) == 1, output
    assert message in errors[0]
    assert errors[0].count(". ") == 0 and errors[0].endswith(".")  # one sentence


# ------------------------------------------------------------------ the acceptance test
def test_samples_of_each_label_are_classified_as_that_label(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    import vaekit

    monkeypatch.chdir(tmp_path)
    settings = [
        "model.conditional=true",
        "model.latent_dim=8",
        f"trainer.max_epochs={CLASSIFIER_EPOCHS}",
        "trainer.num_threads=1",
        "trainer.log_images=false",
        *FAST[1:],
    ]
    metrics = vaekit.train(settings, run_dir=tmp_path / "cvae")
    assert metrics["conditional"] is True
    run = vaekit.load_run(tmp_path / "cvae", device="cpu")
    raw = run.raw
    assert run.model.conditional and run.model.num_classes == 10

    def flat(images: Tensor) -> np.ndarray:
        return images.reshape(images.shape[0], -1).float().numpy()

    classifier = LogisticRegression(max_iter=2000).fit(flat(raw.train) / 16, raw.train_labels.numpy())
    assert classifier.score(flat(raw.test) / 16, raw.test_labels.numpy()) > 0.85  # it can read digits
    torch.manual_seed(0)
    y = torch.arange(10).repeat_interleave(50)  # 50 samples of each label
    predicted = classifier.predict(flat(run.model.sample(500, y=y)))  # means of p(x|z, y), in [0, 1]
    hits = predicted == y.numpy()
    per_label = [hits[y.numpy() == label].mean() for label in range(10)]
    print(f"CVAE samples classified as their label: {hits.mean():.3f}; per label {np.round(per_label, 2)}")
    assert hits.mean() >= 0.8
    assert min(per_label) >= 0.5  # every label is conditioned on, not just most of them
    # the label decides the digit: the same z decoded as another label is classified as that one
    torch.manual_seed(0)
    shifted = classifier.predict(flat(run.model.sample(500, y=(y + 1) % 10)))
    assert (shifted == ((y + 1) % 10).numpy()).mean() >= 0.8


# ------------------------------------------------------------------ the real commands
@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional digits VAE trained by the real command for 2 epochs."""
    tmp = tmp_path_factory.mktemp("cvae")
    run = tmp / "run"
    settings = ["model.conditional=true", "trainer.max_epochs=2", "trainer.num_threads=1", *FAST[1:]]
    done = run_vaekit("train", *settings, f"hydra.run.dir={run}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return run


def test_vaekit_train_records_a_conditional_run(cvae_run: Path):
    metrics = json.loads((cvae_run / "metrics.json").read_text())
    assert metrics["conditional"] is True
    assert metrics["status"] == "finished" and metrics["epochs"] == 2
    assert math.isfinite(metrics["test_nelbo"]) and metrics["test_iw_nll"] <= metrics["test_nelbo"] + 1.0
    config = torch.load(cvae_run / "best.pt", weights_only=True)["config"]
    assert config["model"]["conditional"] is True
    weights = torch.load(cvae_run / "best.pt", weights_only=True)["model"]
    assert weights["label_embedding.weight"].shape == (256, 10)  # one-hot of 10 digits -> hidden


def test_vaekit_sample_draws_one_label_and_refuses_a_label_outside_the_classes(cvae_run: Path, tmp_path):
    out = tmp_path / "three.png"
    done = run_vaekit("sample", str(cvae_run), "--label", "3", "--n", "16", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert np.asarray(Image.open(out)).shape[:2] == (2 * 34 + 2, 8 * 34 + 2)  # 16 samples, 8 per row
    refused = run_vaekit("sample", str(cvae_run), "--label", "12", cwd=tmp_path)
    one_sentence_refusal(refused, "--label 12 is not a class of this run: its labels are 0..9.")


def test_every_sample_figure_of_a_conditional_run_decodes_with_labels(cvae_run: Path, tmp_path):
    from vaekit.commands.sample import sample_figure

    every_class = sample_figure(cvae_run, out=tmp_path / "all.png", device="cpu")
    assert np.asarray(Image.open(every_class)).shape[:2] == (8 * 34 + 2, 10 * 34 + 2)  # a class per column
    rec = sample_figure(cvae_run, "reconstruct", n=8, out=tmp_path / "rec.png", device="cpu")
    assert np.asarray(Image.open(rec)).shape[:2] == (2 * 34 + 2, 8 * 34 + 2)
    out = tmp_path / "interpolate.png"
    path = sample_figure(cvae_run, "interpolate", n=2, steps=4, labels=[5], out=out, device="cpu")
    assert np.asarray(Image.open(path)).shape[:2] == (2 * 34 + 2, 6 * 34 + 2)
    with pytest.raises(VaekitError, match="--reconstruct uses each test image's own label"):
        sample_figure(cvae_run, "reconstruct", labels=[1], device="cpu")


def test_label_on_an_unconditional_run_is_refused(trained_run: Path, tmp_path):
    refused = run_vaekit("sample", str(trained_run), "--label", "3", cwd=tmp_path)
    one_sentence_refusal(refused, "--label applies to conditional runs (trained with model.conditional=true)")


def test_vaekit_evaluate_and_report_mark_a_conditional_run(cvae_run: Path):
    from vaekit.commands.evaluate import evaluate_run, format_table
    from vaekit.commands.report import report

    result = evaluate_run(cvae_run, k=4, device="cpu", progress=False)
    metrics = json.loads((cvae_run / "metrics.json").read_text())
    assert result["conditional"] is True
    assert "log p(x|y)" in format_table(result).splitlines()[0]
    # same seed, same labels: `vaekit evaluate` with the run's k repeats the test numbers
    again = evaluate_run(cvae_run, k=metrics["iw_samples"], nelbo_samples=2, device="cpu", progress=False)
    assert again["iw_nll"] == pytest.approx(metrics["test_iw_nll"], abs=1e-9)
    text, csv_path, _ = report(cvae_run.parent, None, [], None, "markdown")
    assert "(conditional: log p(x\\|y))" in text  # the run's row; "|" escaped in a markdown cell
    assert "(conditional: log p(x|y))" in Path(csv_path).read_text()


def test_objective_iwae_trains_a_conditional_vae(tmp_path):
    settings = ["model.conditional=true", "objective=iwae", "objective.k=4", "trainer.max_epochs=1"]
    settings += [*FAST[1:], "trainer.num_threads=1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_vaekit("train", *settings, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["conditional"] is True and metrics["stopped_on"] == "iwae"
    assert math.isfinite(metrics["val_iwae"]) and math.isfinite(metrics["test_iw_nll"])


# ------------------------------------------------------------------ refusals
def write_unlabelled_folder(root: Path, count: int = 12) -> None:
    """`count` small PNGs straight in `root`: no class folders, so every image has label 0."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"image_{i}.png")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=twolevel"], "model.conditional=true is built for model=vae (the one-level VAE)"),
        (["prior=vampprior"], "prior=vampprior mixes the posteriors of unlabelled pseudo-inputs"),
        (["dataset=image_folder"], "needs labelled data, but image_folder has no labels (every training"),
    ],
    ids=["twolevel", "vampprior", "unlabelled"],
)
def test_settings_a_conditional_vae_cannot_serve_are_refused_in_one_sentence(tmp_path, overrides, message):
    folder = tmp_path / "pictures"
    write_unlabelled_folder(folder)
    if overrides == ["dataset=image_folder"]:
        overrides = [*overrides, f"dataset.root={folder}", "dataset.image_size=8", "dataset.channels=1"]
        overrides.append(f"dataset.cache_dir={tmp_path / 'cache'}")
    run = tmp_path / "run"
    done = run_vaekit("train", "model.conditional=true", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    one_sentence_refusal(done, message)
    assert not (run / "best.pt").exists()  # nothing trained


def splits(train_labels: Tensor, eval_labels: Tensor, name: str = "mine") -> RawSplits:
    images = torch.zeros(len(train_labels), 1, 2, 2, dtype=torch.uint8)
    evals = torch.zeros(len(eval_labels), 1, 2, 2, dtype=torch.uint8)
    return RawSplits(images, evals, evals, train_labels, eval_labels, eval_labels, num_levels=2, name=name)


def test_the_classes_come_from_the_labels_and_data_without_labels_is_refused():
    labelled = splits(torch.tensor([0, 1, 2, 1]), torch.tensor([4, 0]))
    assert class_count(labelled) == 5  # the largest label of any split, plus one
    with pytest.raises(VaekitError, match=r"^model.conditional=true needs labelled data, but mine has no"):
        class_count(splits(torch.zeros(4, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(VaekitError, match=r"some images of mine have none \(label -1"):
        class_count(splits(torch.tensor([0, 1, -1, 1]), torch.tensor([0, 1])))


def test_a_conditional_vae_needs_labels_and_an_unconditional_one_is_unchanged():
    cfg = compose_train("model.conditional=true", "model.latent_dim=4")
    model = build(cfg, torch.device("cpu")).model
    assert model.decoder[0][0].in_features == 4 + 10  # concat(z, one-hot(y))
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(VaekitError, match=r"needs the labels y of its examples"):
        model(x)
    plain = build(compose_train("model.latent_dim=4"), torch.device("cpu")).model
    assert not plain.conditional and "label_embedding.weight" not in plain.state_dict()  # old runs load
    assert plain.decoder[0][0].in_features == 4
    # the label changes p(x|z, y) for the same z, and one-hot(y) enters the decoder as given
    z = torch.zeros(2, 4)
    model.eval()
    means = model.p_x(z, torch.tensor([0, 1])).mean
    assert not torch.allclose(means[0], means[1])
    manual = model.likelihood(model.decoder(torch.cat([z, torch.eye(10)[:2]], dim=1))).mean
    torch.testing.assert_close(means, manual)
    # the logged grids: one row of 8 samples per class, and x reconstructed given its labels
    grids = model_grids(model, x, num=6, y=torch.tensor([1, 2, 3]))
    assert grids["samples"].shape == (3, 10 * 34 + 2, 8 * 34 + 2)  # 8x8 digits shown 4x, 2 pixels apart
    assert grids["reconstructions"].shape == (3, 34 + 2, 6 * 34 + 2)
    with pytest.raises(VaekitError, match=r"needs the labels y of its examples"):
        model_grids(model, x, num=6)


# ------------------------------------------------------------------ labels follow their images
def label_lookup(raw: RawSplits) -> dict[bytes, set[int]]:
    """Each training image's bytes (as the float [0, 1] floats the batches hold) -> its labels."""
    images = raw.train.float() / (raw.num_levels - 1)
    found: dict[bytes, set[int]] = {}
    for image, label in zip(images, raw.train_labels.tolist(), strict=True):
        found.setdefault(image.numpy().tobytes(), set()).add(label)
    return found


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("shard", [None, Shard(1, 3, reduce=lambda t: t)], ids=["whole", "shard"])
def test_train_labels_batch_gives_the_labels_of_the_rows_of_train_batch(in_memory, shard):
    cfg = compose_train(f"data.in_memory={str(in_memory).lower()}", "data.num_workers=0")
    built = build(cfg, torch.device("cpu"))
    data = built.data
    assert isinstance(data, StreamedData) != in_memory
    lookup = label_lookup(built.raw)
    generator = torch.Generator().manual_seed(1)
    perm = data.permutation(generator)
    checked = 0
    for step in range(data.num_train_batches(96)):
        x = data.train_batch(perm, step, 96, generator, shard)
        y = data.train_labels_batch(perm, step, 96, shard)
        assert y.dtype == torch.long and y.shape == (x.shape[0],)
        for image, label in zip(x, y.tolist(), strict=True):
            assert label in lookup[image.numpy().tobytes()]
        index = perm[step * 96 : (step + 1) * 96]
        index = index if shard is None else index[shard.rows(index.shape[0])]
        assert torch.equal(y, built.raw.train_labels[index])  # by index, too
        checked += x.shape[0]
    assert checked == (1000 if shard is None else 10 * 32 + 13)  # rank 1's: 32 of each 96, 13 of the last 40


class LabelEcho(nn.Module):
    """A stand-in conditional model whose x carries its label in pixel 0: every call checks
    that the labels it gets are those of its rows, and scores example i with y_i nats."""

    conditional = True
    data_shape = (1, 2, 2)

    class likelihood:  # noqa: N801 - what decoder_outputs reads
        num_params = 1

    def check(self, x: Tensor, y: Tensor) -> Tensor:
        assert torch.equal(x[:, 0, 0, 0].long(), y), (x[:, 0, 0, 0], y)
        return y.double()

    def forward(self, x: Tensor, y: Tensor) -> ELBO:
        rec = self.check(x, y)
        return ELBO(loss=rec, rec=rec, kl=torch.zeros_like(rec), kl_per_level={"z": torch.zeros_like(rec)})

    def weight_terms(self, x: Tensor, k: int, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        log_p_x = -self.check(x, y).expand(k, -1)
        return log_p_x, {"z": torch.zeros_like(log_p_x)}

    def posterior_means(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"z": self.check(x, y)[:, None]}


def test_labels_are_batched_chunked_and_sharded_with_their_examples():
    y = torch.randint(0, 10, (23,))
    x = y.double().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    model = LabelEcho()
    mean = y.double().mean().item()
    assert nelbo_terms(model, x, 5, y=y)["rec"] == pytest.approx(mean)
    assert torch.equal(posterior_means(model, x, 4, y)["z"][:, 0], y.double())
    # 3 examples per decoder call: chunk_elements = 3 examples x 2 draws x 4 outputs
    estimates = importance_estimates(model, x, 2, chunk_elements=24, progress=False, y=y)
    assert estimates["iw_nll"] == pytest.approx(mean) and estimates["rec"] == pytest.approx(mean)
    # three processes: each scores its rows (of every batch; of the split), the sums add up
    shards = [Shard(rank, 3, reduce=lambda t: t) for rank in range(3)]
    assert sum(nelbo_terms(model, x, 5, s, y=y)["rec"] for s in shards) == pytest.approx(mean)
    total = sum(importance_estimates(model, x, 2, None, 24, False, s, y)["iw_nll"] for s in shards)
    assert total == pytest.approx(mean)
