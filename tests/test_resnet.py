"""net=resnet: shapes on real image sizes, the residual block, the decoder's layout, the shape
check, and every model built from config with it learning on a tiny fixed batch."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from torch import nn

from vaekit.build import build_model
from vaekit.data import RawSplits
from vaekit.errors import VaekitError
from vaekit.resnet import ResidualBlock, ResNets
from vaekit.trust import is_trusted

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_encoder_and_decoder_shapes(shape: tuple[int, int, int], norm: str):
    torch.manual_seed(0)
    net = ResNets(channels=4, stages=2, blocks_per_stage=1, norm=norm, hidden_dim=16)
    x = torch.randn(2, *shape)
    z = torch.randn(2, 5)
    for encoder in (net.encoder(shape), net.bn_encoder(shape)):
        assert encoder(x).shape == (2, 16)
    for decoder in (net.decoder(5, shape, 3), net.bn_decoder(5, shape, 3)):
        assert decoder(z).shape == (2, *shape, 3)


def test_three_stages_on_64x64_end_at_8x8_with_doubling_widths():
    net = ResNets(channels=4, stages=3, blocks_per_stage=1, hidden_dim=8)
    convs = [m for m in net.encoder((3, 64, 64)).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs if c.stride == (2, 2)] == [4, 8, 16]
    assert net.encoder((3, 64, 64))[1][0].in_features == 16 * 8 * 8


def test_the_residual_block_is_identity_plus_residual():
    torch.manual_seed(1)
    block = ResidualBlock(8, "group")
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(block(x), x + block.residual(x), rtol=0, atol=0)
    last_conv = block.residual[-1]
    assert isinstance(last_conv, nn.Conv2d)
    with torch.no_grad():
        last_conv.weight.zero_()
        last_conv.bias.zero_()
    assert torch.equal(block(x), x)


def test_decoder_output_channel_c_times_p_plus_p_lands_at_channel_c_param_p():
    net = ResNets(channels=4, stages=2, blocks_per_stage=1, hidden_dim=8)
    channels, num_params = 3, 5
    decoder = net.decoder(2, (channels, 8, 8), num_params)
    head = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.arange(channels * num_params, dtype=torch.float32))
    out = decoder(torch.randn(2, 2))  # (B, C, H, W, P)
    expected = torch.arange(channels * num_params, dtype=torch.float32).view(channels, 1, 1, num_params)
    torch.testing.assert_close(out, expected.expand_as(out))


def test_group_norm_makes_the_encoder_independent_of_the_batch():
    torch.manual_seed(2)
    encoder = ResNets(channels=4, stages=2, blocks_per_stage=1, hidden_dim=8).encoder((3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(encoder(x)[:1], encoder(x[:1]))


def test_a_shape_not_divisible_by_two_to_the_stages_is_one_sentence():
    with pytest.raises(VaekitError, match=r"net\.stages=2 .*dataset\.shape=\[1, 30, 30\]") as error:
        ResNets(stages=2).encoder((1, 30, 30))
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")
    with pytest.raises(VaekitError, match=r"net\.stages=3"):
        ResNets(stages=3).decoder(4, (3, 28, 28), 1)


def test_bad_options_are_one_sentence():
    with pytest.raises(VaekitError, match=r"net\.norm must be one of batch, group, none, not 'layer'\."):
        ResNets(norm="layer")
    with pytest.raises(VaekitError, match=r"at least 1\.$"):
        ResNets(blocks_per_stage=0)


def test_the_config_names_a_trusted_target():
    cfg = compose_train("net=resnet")
    assert cfg.net._target_ == "vaekit.resnet.ResNets" and is_trusted(cfg.net._target_)
    assert cfg.net.norm == "group"


def tiny_rgb(levels: int = 4, shape: tuple[int, int, int] = (3, 16, 16)) -> RawSplits:
    """16 training images of bright squares (uint8, values < levels); 4 each for val and test."""
    generator = torch.Generator().manual_seed(3)

    def images(n: int) -> torch.Tensor:
        x = torch.zeros(n, *shape, dtype=torch.uint8)
        for i in range(n):
            r, c = torch.randint(0, shape[1] - 6, (2,), generator=generator).tolist()
            colour = torch.randint(1, levels, (shape[0], 1, 1), generator=generator, dtype=torch.uint8)
            x[i, :, r : r + 6, c : c + 6] = colour
        return x

    splits = {"train": images(16), "val": images(4), "test": images(4)}
    labels = {f"{name}_labels": torch.zeros(len(x), dtype=torch.long) for name, x in splits.items()}
    return RawSplits(**splits, **labels, num_levels=levels, name="tiny_rgb")


@pytest.mark.parametrize("model", ["vae", "twolevel", "topdown"])
def test_every_model_with_net_resnet_overfits_a_tiny_batch(model: str):
    torch.manual_seed(4)
    raw = tiny_rgb()
    cfg = compose_train(
        f"model={model}",
        "net=resnet",
        "net.channels=8",
        "net.blocks_per_stage=1",
        "net.hidden_dim=32",
        "dataset.shape=[3,16,16]",
        "dataset.num_levels=4",
        "likelihood=categorical",
    )
    vae = build_model(cfg, raw)
    x = raw.train.float() / 3.0
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    nelbos = []
    for _ in range(30):
        elbo = vae(x)
        optimizer.zero_grad()
        elbo.loss.mean().backward()
        optimizer.step()
        nelbos.append(elbo.nelbo.mean().item())
    first, last = sum(nelbos[:3]) / 3, sum(nelbos[-3:]) / 3
    # from about 1,100 nats per example to about 300 in 30 steps (seeds 4, 5, 6)
    assert last < 0.4 * first, (first, last)
    assert vae.sample(2).shape == (2, 3, 16, 16)
    assert vae.reconstruct(x[:2]).shape == (2, 3, 16, 16)
