"""Statistics of image sets from their embeddings (rows of [N, D] tensors): distribution shift from the base set,
diversity, and win rates. Pure functions, float64, no model inside, so each can be checked against a direct
computation."""

import numpy as np
import torch
from torch import Tensor


def cmmd(x: Tensor, y: Tensor, sigma: float = 10.0) -> float:
    """CMMD (Jayasumana et al. 2024): MMD² between the sets with the RBF kernel exp(−‖a−b‖²/(2σ²)), the biased
    (V-statistic) estimator of the reference implementation, × 1000. Identical sets give exactly 0."""
    x, y = x.double(), y.double()
    gamma = 1 / (2 * sigma**2)
    k = lambda a, b: torch.exp(-gamma * torch.cdist(a, b).square()).mean()  # noqa: E731
    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y)).item()


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1)


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean cosine distance 1 − cos over distinct pairs (needs N ≥ 2)."""
    n = len(x)
    similarity = _unit(x) @ _unit(x).T
    return (1 - similarity[~torch.eye(n, dtype=torch.bool)]).mean().item()


def vendi_score(x: Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023) with the cosine kernel: exp of the Shannon entropy of the eigenvalues of
    K/N. N identical items score 1, N mutually orthogonal items score N."""
    kernel = _unit(x) @ _unit(x).T / len(x)
    eigenvalues = torch.linalg.eigvalsh(kernel).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return torch.exp(-(eigenvalues * eigenvalues.log()).sum()).item()


def _covariance_spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the feature covariance, largest first."""
    return torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0).clamp_min(0)


def spectral_distance(reference: Tensor, generated: Tensor) -> float:
    """‖λ(Σ_ref) − λ(Σ_gen)‖₂ with both spectra sorted (AIG paper): 0 for identical sets, symmetric."""
    return (_covariance_spectrum(reference) - _covariance_spectrum(generated)).norm().item()


def log_spectral_distance(reference: Tensor, generated: Tensor, floor: float = 1e-8) -> float:
    """‖log λ(Σ_ref) − log λ(Σ_gen)‖₂ over the top min(N_ref, N_gen) − 1 eigenvalues (the rest vanish for sets
    smaller than the feature width), each floored at `floor`."""
    rank = min(len(reference), len(generated)) - 1
    spectra = [_covariance_spectrum(x)[:rank].clamp_min(floor).log() for x in (reference, generated)]
    return (spectra[0] - spectra[1]).norm().item()


def win_rate(a, b, groups, num_bootstrap: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Share of pairs where score a beats score b (ties count ½), with a bootstrap 95 % interval that resamples
    groups (prompts) with replacement, since seeds of one prompt are not independent."""
    a, b, groups = np.asarray(a, float), np.asarray(b, float), np.asarray(groups)
    wins = (a > b) + 0.5 * (a == b)
    labels, index = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(index, wins), np.bincount(index)
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(num_bootstrap, len(labels)))
    rates = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(wins.mean()), float(low), float(high)
