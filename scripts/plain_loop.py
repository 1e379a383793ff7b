"""Baseline for the benchmarks: the default vaekit model trained by a plain PyTorch loop.

The same model and settings as `vaekit train` with defaults (digits, MLP 2x256 LeakyReLU,
latent 16, categorical likelihood with 17 values, analytic KL, Adamax lr 1e-3, batch 64,
validation every epoch, early stopping with patience 20, best weights kept), written the
way a tutorial would: Dataset + DataLoader, no logging, no checkpoints on disk beyond the
best state. At the end: test NELBO and importance-weighted NLL with k = 1000.

    python scripts/plain_loop.py            # prints one JSON line with times and metrics
"""

from __future__ import annotations

import io
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Digits(Dataset):
    """sklearn digits, values 0..16 scaled to [0, 1]; the book's 1000/350/447 split."""

    def __init__(self, part: slice) -> None:
        self.data = torch.from_numpy(load_digits().data[part]).float() / 16.0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def mlp(n_in: int, n_out: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, n_out),
    )


class PlainVAE(nn.Module):
    def __init__(self, dims: int = 64, latent: int = 16, levels: int = 17) -> None:
        super().__init__()
        self.dims, self.latent, self.levels = dims, latent, levels
        self.encoder = mlp(dims, 2 * latent)
        self.decoder = mlp(latent, dims * levels)

    def log_px(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(z).view(-1, self.dims, self.levels)
        target = (x * (self.levels - 1)).round().long()
        return -F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        kl = 0.5 * (mu**2 + log_var.exp() - log_var - 1).sum(-1)
        return -self.log_px(x, z) + kl  # per-example NELBO

    @torch.no_grad()
    def iw_log_likelihood(self, x: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * log_var)
        weights = []
        for _ in range(0, k, chunk):
            eps = torch.randn(chunk, *mu.shape)
            z = mu + std * eps  # (chunk, B, L)
            log_q = (-0.5 * eps**2 - 0.5 * log_var - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_px = self.log_px(x.repeat(chunk, 1), z.reshape(-1, self.latent)).view(chunk, -1)
            weights.append(log_px + log_p - log_q)
        return torch.logsumexp(torch.cat(weights), 0) - math.log(k)


def main(seed: int = 0, patience: int = 20, max_epochs: int = 1000) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    train = DataLoader(Digits(slice(0, 1000)), batch_size=64, shuffle=True)
    val = DataLoader(Digits(slice(1000, 1350)), batch_size=64)
    test = DataLoader(Digits(slice(1350, None)), batch_size=64)
    model = PlainVAE()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    best, best_state, since_best, epochs = math.inf, None, 0, 0
    train_start = time.perf_counter()
    for _ in range(max_epochs):
        model.train()
        for x in train:
            loss = model(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_nelbo = sum(model(x).sum().item() for x in val) / 350
        epochs += 1
        if val_nelbo < best:
            best, since_best = val_nelbo, 0
            best_state = io.BytesIO()
            torch.save(model.state_dict(), best_state)  # what a tutorial writes to disk
        else:
            since_best += 1
            if since_best >= patience:
                break
    train_seconds = time.perf_counter() - train_start
    best_state.seek(0)
    model.load_state_dict(torch.load(best_state, weights_only=True))
    model.eval()
    with torch.no_grad():
        test_nelbo = sum(model(x).sum().item() for x in test) / 447
        test_iw_nll = -sum(model.iw_log_likelihood(x, 1000).sum().item() for x in test) / 447
    return {
        "epochs": epochs,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / epochs,
        "test_nelbo": test_nelbo,
        "test_iw_nll": test_iw_nll,
        "in_process_seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    print(json.dumps(main(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0)))
