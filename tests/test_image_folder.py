"""Image folders: decoding and preprocessing against PIL, labels from class folders, splits,
the decode-once cache (hits, rebuilds, atomic writes, where it lives), corrupt files, CelebA's
partition file, one-sentence errors, and the real CLI end to end."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_vaekit
from PIL import Image

import vaekit.data.cache as cache
from vaekit.data import load_celeba64, load_image_folder
from vaekit.data.cache import Preprocess, decode_image
from vaekit.errors import VaekitError
from vaekit.trust import check_trusted

SIZE = 8


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_folder(root: Path, per_class: int = 8, corrupt: int = 1) -> dict[str, np.ndarray]:
    """Class folders bird/ cat/ dog/ (nested subfolders too), mixed sizes, gray and RGB,
    PNG/JPEG/BMP/WebP with upper-case extensions, plus `corrupt` undecodable files in dog/.
    Returns the exact pixels of the images that need no resizing (RGB PNGs of SIZE x SIZE)."""
    rng = np.random.default_rng(0)
    known = {}
    for c, name in enumerate(("bird", "cat", "dog")):
        for i in range(per_class):
            kind = (c + i) % 4
            if kind == 0:  # an exact-size RGB PNG: its pixels survive unchanged
                array = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
                known[f"{name}/exact_{i}.png"] = array
                save(root / name / f"exact_{i}.png", array)
            elif kind == 1:  # a larger grayscale PNG, in a nested folder
                save(root / name / "deep" / "er" / f"gray_{i}.PNG", rng.integers(0, 256, (20, 12), np.uint8))
            elif kind == 2:  # an RGB JPEG of another shape
                save(root / name / f"photo_{i}.JPG", rng.integers(0, 256, (15, 30, 3), np.uint8), quality=90)
            else:
                ext = ".bmp" if i % 2 else ".webp"
                save(root / name / f"other_{i}{ext}", rng.integers(0, 256, (16, 16, 3), np.uint8))
    for i in range(corrupt):
        (root / "dog" / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64)))
    (root / "notes.txt").write_text("not an image")
    return known


def all_images(raw) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([raw.train, raw.val, raw.test]), torch.cat(
        [raw.train_labels, raw.val_labels, raw.test_labels]
    )


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "images"
    return root, make_folder(root)


@pytest.fixture
def decode_calls(monkeypatch) -> list[str]:
    """Records every file the cache module decodes."""
    calls: list[str] = []
    real = cache.decode_image

    def counting(path: str, preprocess: Preprocess) -> np.ndarray:
        calls.append(path)
        return real(path, preprocess)

    monkeypatch.setattr(cache, "decode_image", counting)
    return calls


def test_preprocessing_matches_pil_step_by_step(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)  # H 20, W 40
    path = save(tmp_path / "wide.png", rgb)
    # short side 20 -> 8: 16 x 8, then the central 8 x 8
    reference = Image.fromarray(rgb).resize((16, 8), Image.Resampling.BILINEAR, reducing_gap=None)
    expected = np.asarray(reference.crop((4, 0, 12, 8))).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(str(path), Preprocess(8, 3)), expected)
    # center_crop first (12 x 12 of the middle), then resize to 8
    cropped = (
        Image.fromarray(rgb)
        .crop((14, 4, 26, 16))
        .resize((8, 8), Image.Resampling.BILINEAR, reducing_gap=None)
    )
    got = decode_image(str(path), Preprocess(8, 3, center_crop=12))
    np.testing.assert_array_equal(got, np.asarray(cropped).transpose(2, 0, 1))
    # channels: RGB -> L is PIL's luma; gray -> RGB repeats the channel
    gray = decode_image(str(path), Preprocess(20, 1, center_crop=20))
    np.testing.assert_array_equal(
        gray[0], np.asarray(Image.fromarray(rgb).crop((10, 0, 30, 20)).convert("L"))
    )
    gray_path = save(tmp_path / "gray.png", rgb[:, :20, 0])
    repeated = decode_image(str(gray_path), Preprocess(20, 3))
    assert repeated.shape == (3, 20, 20) and (repeated == rgb[None, :, :20, 0]).all()
    # 16-bit grayscale is scaled to 8 bits
    deep = rng.integers(0, 256, size=(8, 8)).astype(np.uint16) * 257
    deep_path = tmp_path / "deep.png"
    Image.fromarray(deep).save(deep_path)
    np.testing.assert_array_equal(decode_image(str(deep_path), Preprocess(8, 1))[0], deep // 257)


def test_a_folder_loads_with_labels_splits_and_exact_pixels(folder, tmp_path, caplog):
    root, known = folder
    with caplog.at_level(logging.WARNING, logger="vaekit"):
        raw = load_image_folder(
            str(root), image_size=SIZE, channels=3, val_fraction=0.1, test_fraction=0.2,
            cache_dir=str(tmp_path / "cache"), workers=1, shape=[3, SIZE, SIZE], num_levels=256,
        )  # fmt: skip
    images, labels = all_images(raw)
    assert images.shape == (24, 3, SIZE, SIZE) and images.dtype == torch.uint8  # 25 files, 1 corrupt
    assert (raw.val.shape[0], raw.test.shape[0], raw.train.shape[0]) == (2, 5, 17)  # round(2.4), round(4.8)
    # labels: sorted class folder names, any depth below the class folder
    assert torch.bincount(labels).tolist() == [8, 8, 8] and labels.dtype == torch.int64
    for relpath, array in known.items():  # exact-size PNGs survive the round trip unchanged
        matches = (images == torch.from_numpy(array.transpose(2, 0, 1))).flatten(1).all(1)
        assert matches.sum() == 1, relpath
        assert labels[matches].item() == ("bird", "cat", "dog").index(relpath.split("/")[0])
    # the corrupt file is named, skipped and counted
    assert any("broken_0.png: not a decodable image" in r.getMessage() for r in caplog.records)
    assert any("skipped 1 of 25 files" in r.getMessage() for r in caplog.records)


def test_the_fixed_seed_split_is_deterministic(folder, tmp_path):
    root, _ = folder
    settings = dict(image_size=SIZE, val_fraction=0.1, test_fraction=0.2, workers=1)
    a = load_image_folder(str(root), cache_dir=str(tmp_path / "a"), **settings)
    b = load_image_folder(str(root), cache_dir=str(tmp_path / "b"), **settings)  # decoded afresh
    c = load_image_folder(str(root), cache_dir=str(tmp_path / "a"), split_seed=15, **settings)
    for split in ("train", "val", "test"):
        assert torch.equal(a.images(split), b.images(split)) and torch.equal(a.labels(split), b.labels(split))
    assert not torch.equal(a.test, c.test)


def test_threads_decode_the_same_arrays(folder, tmp_path, monkeypatch):
    root, _ = folder
    one = load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "1"), workers=1)
    three = load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "3"), workers=3)
    assert torch.equal(all_images(one)[0], all_images(three)[0])
    # workers=None picks threads for slow files on 4+ CPUs (here: every file counts as slow)
    monkeypatch.setattr(cache, "usable_cpus", lambda: 4)
    monkeypatch.setattr(cache, "THREADS_FROM_SECONDS_PER_FILE", 0.0)
    monkeypatch.setattr(cache, "PROBE_FILES", 3)
    auto = load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "auto"))
    assert torch.equal(all_images(one)[0], all_images(auto)[0])


def test_the_second_load_comes_from_the_cache_and_changes_rebuild_it(folder, tmp_path, decode_calls):
    root, _ = folder
    settings = dict(image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1)
    first = load_image_folder(str(root), **settings)
    assert len(decode_calls) == 25
    start = time.perf_counter()
    second = load_image_folder(str(root), **settings)
    assert time.perf_counter() - start < 0.5 and len(decode_calls) == 25  # nothing decoded
    for split in ("train", "val", "test"):
        assert torch.equal(first.images(split), second.images(split))
        assert torch.equal(first.labels(split), second.labels(split))
    keys = [p for p in (tmp_path / "cache").iterdir()]
    assert len(keys) == 1 and sorted(p.name for p in keys[0].iterdir()) == [
        "images.npy", "labels.npy", "meta.json", "split.npy",
    ]  # fmt: skip
    # a new mtime rebuilds
    target = root / "cat" / "exact_3.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_image_folder(str(root), **settings)
    assert len(decode_calls) == 50
    # new content (another size, same mtime) rebuilds and shows the new pixels
    save(target, np.full((SIZE, SIZE, 3), 7, np.uint8))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_image_folder(str(root), **settings)
    assert len(decode_calls) == 75
    assert (all_images(changed)[0] == 7).flatten(1).all(1).sum() == 1
    # another option rebuilds; the earlier options still hit their own cache
    load_image_folder(str(root), **{**settings, "image_size": 4})
    assert len(decode_calls) == 100
    load_image_folder(str(root), **settings)
    assert len(decode_calls) == 100
    assert len(list((tmp_path / "cache").iterdir())) == 4
    assert not list(root.rglob("*.npy"))  # nothing written into the image folder


def test_the_default_cache_lives_under_xdg_cache_home(folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_image_folder(str(root), image_size=SIZE, workers=1)
    (key,) = (tmp_path / "xdg" / "vaekit" / "image_folder").iterdir()
    assert (key / "images.npy").is_file()
    meta = json.loads((key / "meta.json").read_text())
    assert meta["images"] == 24 and meta["options"]["image_size"] == SIZE


def test_a_crash_while_writing_leaves_no_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    real_save = np.save
    saved = []

    def failing_save(path, array, **kwargs):
        saved.append(path)
        if len(saved) == 2:
            raise OSError(28, "No space left on device", str(path))
        real_save(path, array, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(VaekitError, match="The image cache could not use .*: No space left on device"):
        load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1)
    assert list((tmp_path / "cache").iterdir()) == []  # neither a key nor a temporary folder
    monkeypatch.setattr(np, "save", real_save)
    raw = load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1)
    assert all_images(raw)[0].shape[0] == 24


def test_split_folders_are_the_splits(tmp_path):
    rng = np.random.default_rng(2)
    counts = {"train": {"a": 5, "b": 4}, "val": {"a": 2}, "test": {"b": 3, "c": 1}}
    for split, classes in counts.items():
        for name, n in classes.items():
            for i in range(n):
                save(
                    tmp_path / "data" / split / name / f"{i}.png",
                    rng.integers(0, 256, (SIZE, SIZE), np.uint8),
                )
    save(tmp_path / "data" / "stray.png", rng.integers(0, 256, (SIZE, SIZE), np.uint8))  # ignored
    raw = load_image_folder(
        str(tmp_path / "data"), image_size=SIZE, channels=1, cache_dir=str(tmp_path / "c")
    )
    assert (raw.train.shape[0], raw.val.shape[0], raw.test.shape[0]) == (9, 2, 4)
    assert raw.shape == (1, SIZE, SIZE)
    # one label per class name across the splits: a=0, b=1, c=2
    assert raw.train_labels.tolist() == [0] * 5 + [1] * 4
    assert raw.val_labels.tolist() == [0, 0] and raw.test_labels.tolist() == [1, 1, 1, 2]
    # only train/ and test/: val is carved from train with the fixed seed
    (tmp_path / "data" / "val").rename(tmp_path / "held_out")
    carved = load_image_folder(
        str(tmp_path / "data"), image_size=SIZE, channels=1, val_fraction=0.2, cache_dir=str(tmp_path / "c")
    )
    assert (carved.train.shape[0], carved.val.shape[0], carved.test.shape[0]) == (7, 2, 4)


def test_loose_files_are_label_0_without_class_folders_and_minus_1_beside_them(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(20):
        save(tmp_path / "flat" / f"{i}.png", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    flat = load_image_folder(str(tmp_path / "flat"), image_size=SIZE, cache_dir=str(tmp_path / "c"))
    assert set(all_images(flat)[1].tolist()) == {0}
    save(tmp_path / "flat" / "cls" / "x.png", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    mixed = load_image_folder(str(tmp_path / "flat"), image_size=SIZE, cache_dir=str(tmp_path / "c"))
    assert sorted(all_images(mixed)[1].tolist()) == [-1] * 20 + [0]


def test_celeba_reads_the_official_partition(tmp_path):
    rng = np.random.default_rng(4)
    images = tmp_path / "data" / "celeba" / "img_align_celeba"
    lines = []
    for i in range(1, 13):
        save(images / f"{i:06d}.jpg", rng.integers(0, 256, (24, 20, 3), np.uint8), quality=95)
        lines.append(f"{i:06d}.jpg {0 if i <= 8 else 1 if i <= 10 else 2}")
    save(images / "999999.jpg", rng.integers(0, 256, (24, 20, 3), np.uint8))  # not listed: skipped
    (images.parent / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    raw = load_celeba64(
        str(tmp_path / "data"), image_size=SIZE, center_crop=16, cache_dir=str(tmp_path / "c"),
        shape=[3, SIZE, SIZE], num_levels=256,
    )  # fmt: skip
    assert (raw.train.shape[0], raw.val.shape[0], raw.test.shape[0]) == (8, 2, 2)
    assert raw.name == "celeba64" and raw.shape == (3, SIZE, SIZE)
    (images.parent / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(VaekitError, match=r"list_eval_partition.txt line 1 reads '000001.jpg 7', not"):
        load_celeba64(str(tmp_path / "data"), image_size=SIZE, cache_dir=str(tmp_path / "c"))
    with pytest.raises(
        VaekitError, match="CelebA not found: put img_align_celeba/ and list_eval_partition.txt"
    ):
        load_celeba64(str(tmp_path / "nowhere"))


def test_missing_root_empty_folder_and_bad_options_are_one_sentence(tmp_path):
    with pytest.raises(
        VaekitError, match=r"The image folder .*nowhere does not exist: set dataset.root to a"
    ):
        load_image_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(VaekitError, match=r"No PNG, JPEG, WebP or BMP images found under .*empty \(searched"):
        load_image_folder(str(tmp_path / "empty"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(VaekitError, match="is a file, but dataset.root must be a folder"):
        load_image_folder(str(tmp_path / "file.png"))
    with pytest.raises(VaekitError, match="dataset.channels must be 1 .* or 3 .*, not 2"):
        load_image_folder(str(tmp_path / "empty"), channels=2)
    with pytest.raises(VaekitError, match="dataset.val_fraction and dataset.test_fraction must be above 0"):
        load_image_folder(str(tmp_path / "empty"), val_fraction=0.6, test_fraction=0.5)


def test_more_than_ten_percent_corrupt_files_stop_before_anything_is_written(tmp_path):
    root = tmp_path / "images"
    make_folder(root, per_class=4, corrupt=1)
    jpeg = next(root.rglob("*.JPG"))
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    make_folder(root / "more", per_class=1, corrupt=1)  # 11 + 3 good, 3 bad files: 3/17 > 10%
    with pytest.raises(
        VaekitError, match=r"3 of the 17 image files under .* could not be decoded \(more than 10%"
    ):
        load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1)
    assert not (tmp_path / "cache").exists()
    for path in root.rglob("*.*"):
        path.write_bytes(b"junk")
    with pytest.raises(VaekitError, match=r"None of the 17 image files under .* could be decoded"):
        load_image_folder(str(root), image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1)


@pytest.mark.parametrize(
    "model", [["model=vae", "model.latent_dim=4"], ["model=topdown", "model.latent_dims=[4,2]"]]
)
def test_vaekit_train_on_an_image_folder_end_to_end(folder, tmp_path, monkeypatch, model):
    root, _ = folder
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    done = run_vaekit(
        "train",
        "dataset=image_folder",
        f"dataset.root={root}",
        f"dataset.image_size={SIZE}",
        "dataset.val_fraction=0.1",
        "dataset.test_fraction=0.2",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.batch_size=8",
        "eval.iw_samples=2",
        "eval.nelbo_samples=1",
        "trainer.progress=false",
        "net=conv",
        "net.channels=8",
        "net.hidden_dim=32",
        *model,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "broken_0.png" in done.stdout + done.stderr + (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nelbo"]) and metrics["test_bpd"] > 0
    config = torch.load(run_dir / "best.pt", weights_only=True)["config"]
    assert config["dataset"]["shape"] == [3, SIZE, SIZE]  # interpolated from image_size and channels
    assert config["likelihood"]["num_levels"] == 256
    check_trusted(config, run_dir / "best.pt")
