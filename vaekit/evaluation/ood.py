"""Out-of-distribution scores of a trained model and how well they separate two datasets.

A score is higher for inputs that look more out of distribution. Three scores per example:

    nll(x)        = -log p(x)                           (the model's negative log-likelihood)
    typicality(x) = |nll(x) - mean_{x' ~ train} nll(x')|  (Nalisnick et al., 2019b)
    complexity(x) = nll(x) / log 2 - L(x)                (Serra et al., 2020; bits)

The likelihood alone famously fails for some pairs of datasets (Nalisnick et al., 2019, "Do
deep generative models know what they don't know?": a model of CIFAR-10 gives SVHN higher
likelihood than its own test set): simple images get high likelihood whatever the model
learnt. Typicality ("Detecting out-of-distribution inputs to deep generative models using
typicality", here its single-example version) flags an input whose NLL is far from the
typical set's, on either side; the input-complexity score ("Input complexity and
out-of-distribution detection with likelihood-based generative models") subtracts L(x), the
length in bits of x's PNG encoding, so what is left is how much better the model codes x than
a generic compressor does.

Separation, with the in-distribution scores as negatives and the out-of-distribution ones as
positives: AUROC (the probability that an OOD score beats an in-distribution one, ties
counting half), AUPRC (average precision) and FPR at 95% TPR.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from vaekit.data import batches
from vaekit.errors import VaekitError
from vaekit.evaluation.importance import chunk_shape, default_chunk_elements
from vaekit.models import decoder_outputs, log_weights_of

SCORES = ("nll", "typicality", "complexity")


def _scores_and_labels(
    in_scores: Sequence[float], ood_scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Both score arrays as one float64 array (in-distribution first) and 0/1 labels (1 = OOD)."""
    negatives = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
    if negatives.size == 0 or positives.size == 0:
        raise ValueError("OOD metrics need at least one in-distribution and one out-of-distribution score.")
    scores = np.concatenate([negatives, positives])
    if np.isnan(scores).any():
        raise ValueError("OOD metrics need scores that are not NaN.")
    labels = np.concatenate([np.zeros(negatives.size), np.ones(positives.size)])
    return scores, labels


def _cumulative_counts(in_scores: Sequence[float], ood_scores: Sequence[float]) -> tuple[np.ndarray, ...]:
    """True and false positives (G,) at each distinct score taken as the threshold (score >= t
    is called OOD), thresholds descending; and the numbers of positives and negatives."""
    scores, labels = _scores_and_labels(in_scores, ood_scores)
    _, group = np.unique(-scores, return_inverse=True)  # group 0: the highest score; ties share one
    size = int(group.max()) + 1
    positives = np.bincount(group, weights=labels, minlength=size)
    negatives = np.bincount(group, weights=1 - labels, minlength=size)
    return np.cumsum(positives), np.cumsum(negatives), labels.sum(), (1 - labels).sum()


def auroc(in_scores: Sequence[float], ood_scores: Sequence[float]) -> float:
    """Area under the ROC curve of OOD (positive) against in-distribution (negative) scores.

    AUROC = P(s_ood > s_in) + P(s_ood = s_in) / 2, the Mann-Whitney U statistic over n_in n_ood:
    (sum of the OOD scores' ranks - n_ood (n_ood + 1) / 2) / (n_in n_ood), tied scores sharing
    their average rank. in_scores (N,), ood_scores (M,); 1 is perfect separation, 0.5 chance.
    """
    scores, labels = _scores_and_labels(in_scores, ood_scores)
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # ranks 1..N+M, a tie's average
    ranks = average_rank[group.reshape(-1)]
    n_ood, n_in = labels.sum(), (1 - labels).sum()
    u = ranks[labels == 1].sum() - n_ood * (n_ood + 1) / 2
    return float(u / (n_in * n_ood))


def auprc(in_scores: Sequence[float], ood_scores: Sequence[float]) -> float:
    """Area under the precision-recall curve with OOD as positives, as average precision:
    AP = sum_t (R_t - R_{t-1}) P_t over the distinct scores t taken as thresholds (descending),
    R_t = TP_t / n_ood and P_t = TP_t / (TP_t + FP_t) (tied scores enter together; what
    sklearn.metrics.average_precision_score computes). Chance level is n_ood / (n_in + n_ood)."""
    tp, fp, n_ood, _ = _cumulative_counts(in_scores, ood_scores)
    recall = tp / n_ood
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def fpr_at_tpr(in_scores: Sequence[float], ood_scores: Sequence[float], tpr: float = 0.95) -> float:
    """The false positive rate (share of in-distribution scores called OOD) at the highest
    threshold t whose true positive rate, the share of OOD scores >= t, is at least `tpr`
    (tied scores fall on the same side). 0 is perfect; 0.95 what chance gives at tpr 0.95."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], not {tpr}.")
    tp, fp, n_ood, n_in = _cumulative_counts(in_scores, ood_scores)
    reached = np.flatnonzero(tp >= tpr * n_ood - 1e-9 * n_ood)[0]  # the last group reaches tp = n_ood
    return float(fp[reached] / n_in)


def separation(in_scores: Sequence[float], ood_scores: Sequence[float]) -> dict[str, float]:
    """{"auroc", "auprc", "fpr95"} of one score (higher = more out of distribution)."""
    return {
        "auroc": auroc(in_scores, ood_scores),
        "auprc": auprc(in_scores, ood_scores),
        "fpr95": fpr_at_tpr(in_scores, ood_scores, 0.95),
    }


def nll_kind(model: nn.Module) -> str:
    """What `per_example_nll` computes for `model`: "iw_nll" (a latent-variable model's
    weight_terms), "free_energy" (model=rbm: F(v) + nll_offset, the NLL up to log Z) or
    "nll_per_example" (the model's own method, e.g. an energy-based model's energy)."""
    if hasattr(model, "weight_terms"):
        return "iw_nll"
    if hasattr(model, "nll_per_example"):
        return "free_energy" if getattr(model, "trained_by", None) == "cd" else "nll_per_example"
    raise VaekitError(
        f"{type(model).__name__} has neither weight_terms nor nll_per_example, so it gives no "
        f"per-example score to detect out-of-distribution inputs with."
    )


@torch.inference_mode()
def per_example_nll(
    model: nn.Module,
    x: Tensor,
    k: int,
    batch_size: int,
    progress: bool = False,
    chunk_elements: int | None = None,
    desc: str = "NLL",
) -> Tensor:
    """Per-example negative log-likelihood of x (N, *shape) in nats, (N,) float64 on the CPU.

    Latent-variable models (every VAE: `weight_terms`): the importance-weighted estimate with
    k draws z_j ~ q(z|x) (Burda et al., 2016), -[logsumexp_j log w_j - log k]; the (x, z) pairs
    go to the decoder in calls of about `chunk_elements` outputs and at most `batch_size`
    examples, draws combined exactly by a running logsumexp, so memory stays bounded. Other
    models: their `nll_per_example(x)` (B,) over batches of `batch_size` (model=rbm: the free
    energy plus its dequantization offset, the NLL up to log Z). Random draws follow the global
    RNG (seed it first). The progress bar shows on a terminal only.
    """
    model.eval()
    kind = nll_kind(model)
    if kind != "iw_nll":
        with tqdm(total=x.shape[0], desc=desc, unit="image", disable=None if progress else True,
                  leave=False) as bar:  # fmt: skip
            parts = []
            for xb in batches(x, batch_size):
                parts.append(model.nll_per_example(xb).double().cpu())
                bar.update(xb.shape[0])
        return torch.cat(parts)
    shape = chunk_shape(k, decoder_outputs(model), chunk_elements or default_chunk_elements(x.device))
    examples = min(shape.examples, batch_size)
    parts = []
    with tqdm(total=x.shape[0] * k, desc=f"{desc} (k={k})", unit="sample", unit_scale=True,
              disable=None if progress else True, leave=False) as bar:  # fmt: skip
        for xb in x.split(examples):
            log_sum: Tensor | None = None  # running logsumexp over the draws, (B,) float64
            for start in range(0, k, shape.draws):
                size = min(shape.draws, k - start)
                log_w = log_weights_of(*model.weight_terms(xb, size))  # (size, B)
                part = torch.logsumexp(log_w.double(), dim=0)
                log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
                bar.update(xb.shape[0] * size)
            parts.append((math.log(k) - log_sum).cpu())
    return torch.cat(parts)


def typicality(nll: Tensor, typical_nll: float) -> Tensor:
    """|nll(x) - typical_nll| (N,): the distance of each example's NLL from the mean NLL of
    the training data, an estimate of the model's entropy (Nalisnick et al., 2019b,
    "Detecting out-of-distribution inputs to deep generative models using typicality"; the
    single-example test, without its bootstrap threshold)."""
    return (nll - typical_nll).abs()


def compressed_bits(x_int: Tensor) -> tuple[Tensor, str]:
    """L(x): the length in bits of each image's lossless encoding, (N,) float64, and the codec.

    x_int (N, C, H, W) uint8 holds the integer values the model codes (0..levels-1). One- and
    three-channel images are encoded as PNG at compression level 9 with PIL, as Serra et al.
    (2020) do; other channel counts (or no PIL) as zlib (deflate, PNG's compressor) of the
    raw bytes. Returns (bits, "png" or "zlib")."""
    array = x_int.to(torch.uint8).cpu().numpy()
    channels = array.shape[1]
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - torchvision depends on Pillow
        Image = None
    if Image is None or channels not in (1, 3):
        lengths = [len(zlib.compress(image.tobytes(), 9)) for image in array]
        return torch.tensor(lengths, dtype=torch.float64) * 8, "zlib"
    lengths = []
    for image in array:
        pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=9)
        lengths.append(buffer.tell())
    return torch.tensor(lengths, dtype=torch.float64) * 8, "png"


def complexity(nll: Tensor, bits: Tensor) -> Tensor:
    """S(x) = nll(x) / log 2 - L(x) in bits (N,): the model's code length of x minus a generic
    compressor's (Serra et al., 2020, "Input complexity and out-of-distribution detection with
    likelihood-based generative models"). In-distribution data is coded much better by the
    model than by the compressor (S very negative); simple OOD images no longer pass as typical."""
    return nll / math.log(2) - bits
