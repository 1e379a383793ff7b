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
