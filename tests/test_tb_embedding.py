"""RunLogger.embedding: latent means, labels and thumbnails in TensorBoard's Projector files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit.loggers.tensorboard import RunLogger


def test_embedding_writes_projector_files_that_read_back(tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(10, 3, generator=generator)
    labels = torch.arange(10) % 4
    images = torch.rand(10, 1, 8, 8, generator=generator)
    logger = RunLogger(tmp_path)
    logger.embedding(means, labels, images, step=7)
    logger.close()

    tb = tmp_path / "tb"
    config = (tb / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "latent_means:00007"' in config
    assert "sprite" in config and "single_image_dim: 8" in config
    folder = tb / "00007" / "latent_means"
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(tensors, means.numpy(), rtol=1e-6)
    assert (folder / "metadata.tsv").read_text().split() == [str(int(v)) for v in labels]
    sprite = np.asarray(Image.open(folder / "sprite.png"))
    assert sprite.shape[0] == sprite.shape[1] >= 4 * 8 and sprite.std() > 0  # 4 x 4 tiles, square


def test_embedding_rejects_mismatched_shapes(tmp_path: Path):
    logger = RunLogger(tmp_path)
    with pytest.raises(ValueError, match="embedding needs means"):
        logger.embedding(torch.zeros(4, 2), torch.zeros(3), torch.zeros(4, 1, 8, 8), step=0)
    logger.close()


def test_every_run_holds_the_custom_scalars_layout(trained_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    accumulator = EventAccumulator(str(trained_run / "tb"), size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert charts["NELBO, train and validation"] == ["train/nelbo", "val/nelbo"]
    assert charts["KL per level"] == ["train/kl/.*", "val/kl/.*"]


def test_projector_config_parses_and_the_sprite_holds_each_thumbnail_in_its_tile(tmp_path: Path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(7, 3, 5, 4, generator=generator)  # RGB, not square: 3 x 3 tiles of 5 x 4
    logger = RunLogger(tmp_path)
    for tag in ("latent_means_z1", "latent_means_z2"):  # a two-level model's two embeddings
        logger.embedding(torch.randn(7, 2, generator=generator), torch.arange(7), images, 3, tag=tag)
    logger.close()
    config = text_format.Parse((tmp_path / "tb" / "projector_config.pbtxt").read_text(), ProjectorConfig())
    assert [e.tensor_name for e in config.embeddings] == ["latent_means_z1:00003", "latent_means_z2:00003"]
    info = config.embeddings[1]
    assert list(info.sprite.single_image_dim) == [4, 5]  # width, height
    assert info.tensor_path == "00003/latent_means_z2/tensors.tsv"
    sprite = np.asarray(Image.open(tmp_path / "tb" / info.sprite.image_path))
    assert sprite.shape == (15, 12, 3)
    expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(7):
        row, col = divmod(i, 3)
        np.testing.assert_array_equal(sprite[row * 5 : row * 5 + 5, col * 4 : col * 4 + 4], expected[i])
    assert not sprite[10:, 4:].any()  # the two tiles past N are black
