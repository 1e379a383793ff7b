"""Objectives (vaekit/objectives.py): beta, the IWAE bound and its DReG gradient, checked
against the ELBO and against each other with many draws."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, compose_train, run_vaekit

from vaekit.build import build_dataset, build_model, device_data
from vaekit.errors import VaekitError
from vaekit.objectives import IWAE, Objective, build_objective, make_elbo


def digits_vae(*overrides: str, seed: int = 0):
    """A small digits VAE (latent 4, hidden 32) and a batch of 16 test images."""
    cfg = compose_train("model.latent_dim=4", "net.hidden_dim=32", *overrides)
    raw = build_dataset(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, raw)
    data = device_data(raw, model, torch.device("cpu"))
    return model, data


def briefly_trained(steps: int = 150):
    """The small digits VAE after `steps` Adam steps on the ELBO (posterior no longer the prior)."""
    model, data = digits_vae()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    perm = data.permutation(generator)
    for step in range(steps):
        x = data.train_batch(perm, step % data.num_train_batches(64), 64, generator)
        optimizer.zero_grad()
        model(x).loss.mean().backward()
        optimizer.step()
    return model, data


def test_make_elbo_weights_the_kl_by_beta_in_the_loss_only():
    rec, kl = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])
    elbo = make_elbo(rec, {"z": kl}, beta=4.0)
    assert torch.equal(elbo.loss, rec + 4 * kl) and torch.equal(elbo.nelbo, rec + kl)


def test_trainer_beta_composes_with_the_warm_up(tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, "trainer.beta=4", "trainer.kl_warmup_epochs=4")
    factors = []
    for epoch in range(6):
        trainer.state.epoch = epoch
        factors.append(trainer.beta())
    assert factors == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]


def test_iwae_with_one_sample_is_the_elbo_with_a_monte_carlo_kl():
    model, data = briefly_trained(50)
    x = data.test[:16]
    torch.manual_seed(3)
    loss = IWAE(k=1)(model, x, 1.0, 0.0).loss
    torch.manual_seed(3)
    log_p_x, levels = model.weight_terms(x, 1)
    assert torch.allclose(loss, -(log_p_x - levels["z"])[0], atol=1e-5)
    # in expectation it is the ELBO objective (analytic KL): many draws of both
    draws = 4000
    with torch.no_grad():
        x_rep = x.repeat(draws, 1, 1, 1)
        elbo_mean = model(x_rep).loss.view(draws, -1)
        iwae_mean = IWAE(k=1)(model, x_rep, 1.0, 0.0).loss.view(draws, -1)
    diff = (iwae_mean - elbo_mean).mean(0)
    stderr = ((iwae_mean.var(0) + elbo_mean.var(0)) / draws).sqrt()
    assert (diff.abs() < 4 * stderr + 1e-3).all(), (diff, stderr)


def test_the_iwae_bound_is_tighter_than_the_elbo_on_a_trained_model():
    model, data = briefly_trained()
    x = data.test[:64]
    torch.manual_seed(0)
    with torch.no_grad():
        nelbo = torch.stack([model(x).nelbo for _ in range(64)]).mean(0)  # (B,) E[-ELBO]
        bound = {k: torch.stack([IWAE(k)(model, x, 1, 0).loss for _ in range(8)]).mean(0) for k in (8, 64)}
    gap = nelbo - bound[8]  # (B,) per example: Jensen's gap, positive wherever q is not the posterior
    assert gap.mean() > 4 * gap.std() / math.sqrt(gap.numel()), gap
    assert bound[64].mean() < bound[8].mean()  # L_k rises with k (Burda et al., 2016)


def encoder_and_decoder_gradients(model, x, objective, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(draws, P_enc) and (draws, P_dec) gradients of the batch loss, one fresh draw each."""
    encoder = [*model.encoder.parameters(), *model.posterior.parameters()]
    decoder = list(model.decoder.parameters())
    enc, dec = [], []
    for _ in range(draws):
        loss = objective(model, x, 1.0, 0.0).loss.mean()
        grads = torch.autograd.grad(loss, encoder + decoder)
        enc.append(torch.cat([g.reshape(-1) for g in grads[: len(encoder)]]))
        dec.append(torch.cat([g.reshape(-1) for g in grads[len(encoder) :]]))
    return torch.stack(enc), torch.stack(dec)


def test_dreg_encoder_gradient_matches_iwae_in_expectation_with_lower_variance():
    model, data = briefly_trained()
    x = data.test[:8]
    draws, k = 400, 16
    torch.manual_seed(5)
    standard, dec_standard = encoder_and_decoder_gradients(model, x, IWAE(k, "standard"), draws)
    torch.manual_seed(5)
    dreg, dec_dreg = encoder_and_decoder_gradients(model, x, IWAE(k, "dreg"), draws)
    # the same draws: the decoder's gradient is the standard one under both
    assert torch.allclose(dec_standard, dec_dreg, rtol=1e-4, atol=1e-5)
    torch.manual_seed(6)  # independent draws for the comparison of means
    dreg, _ = encoder_and_decoder_gradients(model, x, IWAE(k, "dreg"), draws)
    # unbiased: per coordinate, the difference of the means in units of its standard error is
    # about N(0, 1), so its mean square is about 1 (a bias would grow it with the draws)
    stderr = ((standard.var(0) + dreg.var(0)) / draws).sqrt()
    kept = stderr > 0
    z = (standard.mean(0) - dreg.mean(0))[kept] / stderr[kept]
    assert z.pow(2).mean() < 1.3 and (z.abs() > 4).float().mean() < 0.005, (z.pow(2).mean(), z.abs().max())
    ratio = float(standard.var(0).sum() / dreg.var(0).sum())
    print(f"encoder gradient variance, standard / DReG at k={k}: {ratio:.2f}")
    assert ratio > 1.5


def test_dreg_is_refused_where_it_does_not_apply():
    model, _ = digits_vae("posterior=iaf")
    with pytest.raises(VaekitError, match="posterior=gaussian"):
        IWAE(4, "dreg").check(model)
    IWAE(4, "standard").check(model)  # every VAE offers importance weights
    cfg = compose_train("model=twolevel")
    hierarchical = build_model(cfg, build_dataset(cfg))
    with pytest.raises(VaekitError, match="objective.gradient=standard"):
        IWAE(4, "dreg").check(hierarchical)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "iwae", "k": 0}, "objective.k must be a whole number of samples, at least 1, not 0."),
        ({"name": "iwae", "k": 4, "gradient": "rws"}, "objective.gradient must be standard or dreg"),
        ({"name": "elbo", "k": 4}, "objective.k applies to objective=iwae"),
        ({"name": "wake_sleep"}, "objective must be elbo or iwae"),
    ],
)
def test_bad_objective_settings_are_refused_in_one_sentence(settings, message):
    with pytest.raises(VaekitError, match=message):
        build_objective(settings)


def test_no_settings_is_the_elbo():
    assert type(build_objective(None)) is Objective and build_objective(None).stopping_key == "nelbo"


def test_iwae_trains_from_the_command_line_and_stops_on_its_validation_bound(tmp_path):
    run = tmp_path / "run"
    done = run_vaekit("train", *FAST, "objective=iwae", "objective.k=4", "objective.gradient=dreg",
                      f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped_on"] == "iwae" and "val_nelbo" not in metrics
    assert math.isfinite(metrics["val_iwae"]) and metrics["test_iw_nll"] <= metrics["test_nelbo"]
    assert "val IWAE bound" in (run / "train.log").read_text()
    bad_dir = f"hydra.run.dir={tmp_path / 'bad'}"
    refused = run_vaekit("train", *FAST, "objective=iwae", "objective.k=0", bad_dir, cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "vaekit: error: objective.k must be a whole number of samples, at least 1, not 0."
    )
    free_bits = run_vaekit("train", *FAST, "objective=iwae", "trainer.free_bits=0.5",
                           f"hydra.run.dir={tmp_path / 'fb'}", cwd=tmp_path)  # fmt: skip
    assert free_bits.returncode == 1 and "objective=iwae does not have" in free_bits.stderr
