"""Fréchet and kernel distances between two sets of image features (FID and KID).

* **FID** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): fit a Gaussian to each feature set and take the Fréchet distance
  ``||mu_a - mu_b||² + Tr(Σa + Σb - 2 (Σa Σb)^½)``.
* **KID** (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² with the cubic polynomial
  kernel ``k(x, y) = (xᵀy / d + 1)³``, averaged over random subsets. Unlike FID it is unbiased, so it is
  the number to trust for small sample sizes.

**Features: CLIP, not Inception.** The default extractor is CLIP's image embedding (:class:`ClipFeatures`),
so the FID computed here is "FID_CLIP" (Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in
Fréchet Inception Distance"). Its scale is entirely different from Inception-v3 FID: **FID_CLIP numbers
are NOT comparable with the Inception FIDs printed in Make-A-Story (e.g. 36.64 on PororoSV) or any other
paper's Inception FID.** Only compare FID_CLIP with FID_CLIP from the same CLIP model and resize protocol.

An Inception extractor is not provided: every package with the TF-ported FID Inception-v3 (pytorch-fid,
torch-fidelity, clean-fid, piq) requires torchvision, which this project cannot install without a CUDA
torch, and all of them download the weights at run time, which this project cannot do either.

**Sample size.** The covariance of D-dimensional features is singular below D+1 samples, and FID is
strongly biased at small N; the convention is at least 2,048 samples (:func:`fid_warning`). Report KID
alongside.

**Resizing.** How images are resized before feature extraction changes the numbers (:data:`RESIZE_PROTOCOLS`,
:func:`prepare_for_features`); AR-LDM's FIDs use a 64×64 bottleneck and are comparable only with each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from eval.image_metrics import ClipSimilarity

FID_MIN_SAMPLES = 2048  # the usual minimum (Inception's pool3 has 2,048 dimensions)
FID_EPS = 1e-6  # pytorch-fid's default offset for a singular covariance product
KID_SUBSETS = 100  # torch-fidelity's and clean-fid's defaults
KID_SUBSET_SIZE = 1000
ARLDM_SIZE = 64

RESIZE_PROTOCOLS: Mapping[str, str] = MappingProxyType(
    {
        "full": "each image is resized straight to the feature extractor's input resolution (bicubic)",
        "arldm64": (
            "AR-LDM's protocol: each image is first resized to 64x64, then upsampled to the extractor's "
            "input (bicubic); its numbers are NOT comparable with full-resolution ones"
        ),
    }
)


# ----------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------


def _as_array(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Features as a float64 ``(N, D)`` array."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array of features, got shape {array.shape}")
    return array


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and sample covariance ``(D, D)`` (N-1 normalisation, as pytorch-fid) of ``(N, D)``."""
    array = _as_array(features, "features")
    if array.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False)  # (D,), (D, D)


def frechet_distance_from_statistics(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps: float = FID_EPS
) -> float:
    """``||mu_a - mu_b||² + Tr(Σa + Σb - 2 (Σa Σb)^½)`` for two Gaussians.

    Follows pytorch-fid's ``calculate_frechet_distance`` (mseitzer/pytorch-fid, ``src/pytorch_fid/fid_score.py``):
    the matrix square root is ``scipy.linalg.sqrtm``; if it is not finite (a singular product), ``eps·I`` is
    added to both covariances and it is recomputed; numerical error can leave a tiny imaginary part,
    and only the real part is kept.
    """
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)  # (D,)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)  # (D, D)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    diff = mu_a - mu_b  # (D,)
    covmean = linalg.sqrtm(sigma_a @ sigma_b)  # (D, D)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps  # (D, D)
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FID between two ``(N, D)`` feature sets (Heusel et al. 2017); see :func:`fid_warning` for small N."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b)


def kernel_inception_distance(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and standard deviation of the unbiased MMD² over random subsets.

    Each subset draws ``m = min(subset_size, N_a, N_b)`` rows from each set without replacement, and
    computes, with ``k(x, y) = (xᵀy / d + 1)³``::

        MMD²_u = Σ_{i≠j} k(a_i, a_j) / (m(m-1)) + Σ_{i≠j} k(b_i, b_j) / (m(m-1)) - 2 Σ_{i,j} k(a_i, b_j) / m²

    as torch-fidelity's ``metric_kid`` and clean-fid's ``kernel_distance`` do. It is unbiased, so it can be
    slightly negative when the sets match.
    """
    a, b = _as_array(features_a, "features_a"), _as_array(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for index in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]  # (m, D)
        y = b[rng.choice(b.shape[0], m, replace=False)]  # (m, D)
        k_xx = (x @ x.T / dim + 1) ** 3  # (m, m)
        k_yy = (y @ y.T / dim + 1) ** 3  # (m, m)
        k_xy = (x @ y.T / dim + 1) ** 3  # (m, m)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[index] = within - 2 * k_xy.sum() / m**2
    return float(values.mean()), float(values.std())


def fid_warning(n: int) -> str | None:
    """A warning for FID on ``n`` samples (per set) below 2,048, else None."""
    if n >= FID_MIN_SAMPLES:
        return None
    return (
        f"FID on {n} samples (< {FID_MIN_SAMPLES}): the feature covariance is singular or poorly estimated "
        "and FID is biased upwards at small N, so compare only runs with the same N and report KID too"
    )


# ----------------------------------------------------------------------------------------------------
# Feature extractors and resizing
# ----------------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images to one feature vector each: ``features(images) -> (N, D)`` float64."""

    name: str
    input_size: int  # the square resolution the extractor's network sees

    def features(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass
class ClipFeatures:
    """CLIP image features for FID_CLIP/KID_CLIP: the projected image embedding, NOT L2-normalised.

    This is ``CLIPModel.get_image_features`` (the pooled class token after the visual projection, 512-d
    for ViT-B/32), the feature clean-fid (``CLIP_fx``: ``encode_image``) and torch-fidelity
    (``FeatureExtractorCLIP``: ``model.visual``) use. Numbers are not comparable with Inception FID.
    """

    clip: ClipSimilarity
    name: str = "clip"

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> ClipFeatures:
        return cls(ClipSimilarity.load(name_or_path, device=device), name=f"clip:{name_or_path}")

    @property
    def input_size(self) -> int:
        return self.clip.image_size

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.clip.image_features(images).double().numpy()  # (N, D)


def prepare_for_features(
    images: Sequence[Image.Image], protocol: str, input_size: int | None = None
) -> list[Image.Image]:
    """Resize images as ``protocol`` says (:data:`RESIZE_PROTOCOLS`), all bicubic, in RGB.

    ``"full"``: resized to ``input_size``² (unchanged when ``input_size`` is None: the extractor's own
    processor then resizes). ``"arldm64"``: resized to 64×64 first, then upsampled to ``input_size``²
    (left at 64×64 when None, for the extractor's processor to upsample).
    """
    if protocol not in RESIZE_PROTOCOLS:
        raise ValueError(f"unknown resize protocol {protocol!r}; choose from {sorted(RESIZE_PROTOCOLS)}")
    bicubic = Image.Resampling.BICUBIC
    prepared = []
    for image in images:
        image = image.convert("RGB")
        if protocol == "arldm64":
            image = image.resize((ARLDM_SIZE, ARLDM_SIZE), bicubic)
        if input_size is not None:
            image = image.resize((input_size, input_size), bicubic)
        prepared.append(image)
    return prepared
