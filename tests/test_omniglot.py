"""Omniglot in torchvision's layout, written here: inversion and resizing against PIL, labels
per character, background = train + val and evaluation = test, the cache, errors, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_vaekit
from PIL import Image

import vaekit.data.cache as cache
from vaekit.data import load_omniglot
from vaekit.errors import VaekitError

ALPHABETS = {
    "images_background": {"Greek": ["character01", "character02"], "Latin": ["character01", "character02"]},
    "images_evaluation": {"Mongolian": ["character01", "character02"]},
}
PER_CHARACTER = 5


def make_omniglot(root: Path) -> dict[str, np.ndarray]:
    """105x105 binary PNGs (mode '1', black strokes on white): a filled square whose place
    depends on the character and drawer. Returns the drawings by relative path."""
    drawings = {}
    for set_name, alphabets in ALPHABETS.items():
        for a, (alphabet, characters) in enumerate(alphabets.items()):
            for c, character in enumerate(characters):
                for drawer in range(PER_CHARACTER):
                    white = np.ones((105, 105), dtype=bool)
                    top, left = 10 + 7 * c + 3 * drawer, 10 + 11 * a + 5 * drawer
                    white[top : top + 30, left : left + 20] = False  # the stroke
                    relpath = f"{set_name}/{alphabet}/{character}/{c:04d}_{drawer + 1:02d}.png"
                    path = root / relpath
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(white).save(path)
                    drawings[relpath] = white
    return drawings


def expected_pixels(white: np.ndarray, size: int) -> np.ndarray:
    """Strokes bright: invert, then PIL's antialiased bilinear resize."""
    inverted = Image.fromarray(np.where(white, 0, 255).astype(np.uint8), "L")
    return np.asarray(inverted.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


@pytest.fixture
def omniglot(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    drawings = make_omniglot(tmp_path / "data" / "omniglot-py")
    return tmp_path / "data", drawings


def test_omniglot_loads_inverted_resized_with_character_labels(omniglot, tmp_path):
    root, drawings = omniglot
    raw = load_omniglot(
        str(root), val_size=4, split_seed=3, cache_dir=str(tmp_path / "cache"), workers=1,
        shape=[1, 28, 28], num_levels=256,
    )  # fmt: skip
    assert (raw.train.shape[0], raw.val.shape[0], raw.test.shape[0]) == (16, 4, 10)
    assert raw.shape == (1, 28, 28) and raw.train.dtype == torch.uint8 and raw.num_levels == 256
    # background characters are 0..3 (sorted alphabet/character), evaluation ones 4..5
    assert sorted(torch.cat([raw.train_labels, raw.val_labels]).tolist()) == sorted(
        [0, 1, 2, 3] * PER_CHARACTER
    )
    assert raw.test_labels.tolist() == [4] * PER_CHARACTER + [5] * PER_CHARACTER
    # test is the evaluation set in file order: pixels exactly PIL's inverted, resized drawing
    evaluation = sorted(path for path in drawings if path.startswith("images_evaluation"))
    for i, relpath in enumerate(evaluation):
        np.testing.assert_array_equal(raw.test[i, 0].numpy(), expected_pixels(drawings[relpath], 28))
    assert raw.test[0, 0].max() == 255 and raw.test[0, 0, 0, 0] == 0  # strokes bright, background black
    # the val images are background drawings, drawn by the fixed seed
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    background = sorted(path for path in drawings if path.startswith("images_background"))
    for i, index in enumerate(sorted(perm[-4:].tolist())):
        np.testing.assert_array_equal(raw.val[i, 0].numpy(), expected_pixels(drawings[background[index]], 28))


def test_the_split_is_deterministic_the_cache_hits_and_options_rebuild(omniglot, tmp_path, monkeypatch):
    root, _ = omniglot
    calls = []
    real = cache.decode_image

    def counting(path: str, preprocess: cache.Preprocess) -> np.ndarray:
        calls.append(path)
        return real(path, preprocess)

    monkeypatch.setattr(cache, "decode_image", counting)
    settings = dict(val_size=4, cache_dir=str(tmp_path / "cache"), workers=1)
    a = load_omniglot(str(root), **settings)
    b = load_omniglot(str(root), **settings)
    assert len(calls) == 30  # the second load decoded nothing
    assert torch.equal(a.val, b.val) and torch.equal(a.train_labels, b.train_labels)
    small = load_omniglot(str(root), image_size=16, **settings)
    assert len(calls) == 60 and small.shape == (1, 16, 16)
    other = load_omniglot(str(root), split_seed=99, **settings)
    assert len(calls) == 90 and not torch.equal(a.val, other.val)


def test_a_root_holding_the_two_folders_itself_works(omniglot, tmp_path):
    root, _ = omniglot
    raw = load_omniglot(str(root / "omniglot-py"), val_size=4, cache_dir=str(tmp_path / "cache"))
    assert raw.test.shape[0] == 10


def test_missing_folders_and_bad_val_size_are_one_sentence(omniglot, tmp_path):
    root, _ = omniglot
    with pytest.raises(
        VaekitError, match=r"Omniglot not found: put the folders images_background and images_ev"
    ):
        load_omniglot(str(tmp_path / "nowhere"))
    with pytest.raises(VaekitError, match=r"dataset.val_size must be between 1 and 19 .* not 1280"):
        load_omniglot(str(root), cache_dir=str(tmp_path / "cache"))
    for path in (root / "omniglot-py" / "images_evaluation").rglob("*.png"):
        path.unlink()
    with pytest.raises(VaekitError, match=r"images_evaluation holds no PNG images"):
        load_omniglot(str(root), val_size=4, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "model", [["model=vae", "model.latent_dim=4"], ["model=topdown", "model.latent_dims=[4,2]"]]
)
def test_vaekit_train_on_omniglot_end_to_end(omniglot, tmp_path, monkeypatch, model):
    root, _ = omniglot
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train",
        "dataset=omniglot",
        f"dataset.root={root}",
        "dataset.val_size=4",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.batch_size=8",
        "eval.iw_samples=2",
        "eval.nelbo_samples=1",
        "trainer.progress=false",
        *model,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nelbo"]) and 0 < metrics["test_nelbo"] < 784 * math.log(2) * 1.5
    config = torch.load(run_dir / "best.pt", weights_only=True)["config"]
    assert config["likelihood"]["_target_"].endswith("BernoulliLikelihood")
    assert config["dataset"]["shape"] == [1, 28, 28]
