"""Image metrics offline: CLIP cosines, story similarities, FID/KID and object counts on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    AutoProcessor,
    CLIPModel,
    CLIPProcessor,
    YolosForObjectDetection,
)

from eval.detector import ObjectCounter
from eval.fid import (
    FID_MIN_SAMPLES,
    ClipFeatures,
    FeatureExtractor,
    feature_statistics,
    fid_warning,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    prepare_for_features,
)
from eval.image_metrics import (
    ClipSimilarity,
    ground_truth_similarity,
    pooled_features,
    previous_image_similarity,
    total_story_similarity,
)
from toy.builders import build_tiny_clip, build_tiny_detector


def _noise_images(count: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)
    ]


IMAGES = _noise_images(5) + [
    Image.new("RGB", (32, 32), (200, 20, 20)),
    Image.new("RGB", (64, 48), (20, 20, 200)),
]
TEXTS = [
    "A red circle jumps.",
    "A blue square runs in the meadow.",
    "Rosa waved hello.",
    "",
    "A green triangle sits. " * 40,  # longer than 77 tokens: must be truncated
    "The sun sets.",
    "A yellow star sleeps.",
]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    return build_tiny_detector(tmp_path_factory.mktemp("models") / "tiny-detector")


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return ClipSimilarity.load(tiny_clip, batch_size=3)  # a batch smaller than the inputs: batching runs


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------


def test_builders_make_folders_that_load_with_from_pretrained(tiny_clip, tiny_detector):
    model = CLIPModel.from_pretrained(tiny_clip)
    processor = AutoProcessor.from_pretrained(tiny_clip)
    assert isinstance(processor, CLIPProcessor)
    eos = processor.tokenizer.eos_token_id
    assert model.config.text_config.eos_token_id == eos != 2  # the non-legacy EOS pooling
    ids = processor.tokenizer(["a red ball"]).input_ids[0]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == eos
    detector = AutoModelForObjectDetection.from_pretrained(tiny_detector)
    assert isinstance(detector, YolosForObjectDetection)
    assert AutoImageProcessor.from_pretrained(tiny_detector) is not None


def test_builders_are_seeded(tmp_path):
    first = CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "a", seed=3)).state_dict()
    again = CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "b", seed=3)).state_dict()
    other = CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "c", seed=4)).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# ----------------------------------------------------------------------------------------------------
# CLIP similarities
# ----------------------------------------------------------------------------------------------------


def test_text_image_cosine_equals_a_direct_computation(clip, tiny_clip):
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip)
    scores = clip.text_image(TEXTS, IMAGES)
    with torch.no_grad():
        expected = []
        for text, image in zip(TEXTS, IMAGES, strict=True):  # one at a time: no padding, no batching
            ids = processor.tokenizer([text], truncation=True, max_length=77, return_tensors="pt").input_ids
            pixels = processor.image_processor(
                images=[image.convert("RGB")], return_tensors="pt"
            ).pixel_values
            text_vector = F.normalize(pooled_features(model.get_text_features(input_ids=ids)), dim=-1)
            image_vector = F.normalize(pooled_features(model.get_image_features(pixel_values=pixels)), dim=-1)
            expected.append(float((text_vector * image_vector).sum()))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= score <= 1.0 for score in scores)
    assert len(set(np.round(scores, 6))) > 1  # the texts and images actually differ


def test_embeddings_are_normalised_and_long_texts_truncated(clip):
    texts = clip.text_embeddings(TEXTS)  # (7, D)
    images = clip.image_embeddings(IMAGES)  # (7, D)
    assert texts.shape == images.shape == (len(TEXTS), clip.model.config.projection_dim)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(images.norm(dim=-1), torch.ones(len(IMAGES)), atol=1e-5)
    assert clip.text_max_length == 77


def test_identical_images_have_similarity_one(clip):
    copies = [image.copy() for image in IMAGES]
    assert clip.image_image(IMAGES, copies) == pytest.approx([1.0] * len(IMAGES), abs=1e-5)
    different = clip.image_image(IMAGES[:-1], IMAGES[1:])
    assert all(-1.0 <= value < 1.0 - 1e-4 for value in different)


def test_pairing_requires_equal_lengths(clip):
    with pytest.raises(ValueError, match="pair up"):
        clip.text_image(TEXTS[:2], IMAGES[:3])


# ----------------------------------------------------------------------------------------------------
# Story-level similarities on hand-made embeddings
# ----------------------------------------------------------------------------------------------------


def _unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle), 0.0]


def test_story_similarities_on_known_angles():
    # Frames at 0°, 60°, 90° and 180° in a plane (scaled: the helpers must normalise).
    frames = torch.tensor([_unit(0), _unit(60), _unit(90), _unit(180)]) * torch.tensor(
        [[1.0], [2.0], [0.5], [3.0]]
    )
    cos = math.cos
    # Consecutive pairs: 60°, 30°, 90°.
    assert previous_image_similarity(frames) == pytest.approx((0.5 + cos(math.pi / 6) + 0.0) / 3, abs=1e-6)
    # All 6 pairs i < j, the seed included: 60°, 90°, 180°, 30°, 120°, 90°.
    pairs = [0.5, 0.0, -1.0, cos(math.pi / 6), -0.5, 0.0]
    assert total_story_similarity(frames) == pytest.approx(sum(pairs) / 6, abs=1e-6)
    # Ground truth: the same seed (ignored) and frames rotated by 0°, 90°, 180° respectively.
    truth = torch.tensor([_unit(0), _unit(60), _unit(180), _unit(0)])
    assert ground_truth_similarity(frames, truth) == pytest.approx((1.0 + 0.0 - 1.0) / 3, abs=1e-6)
    # The seed is left out of the GT similarity: changing it changes nothing.
    truth[0] = torch.tensor(_unit(135))
    assert ground_truth_similarity(frames, truth) == pytest.approx(0.0, abs=1e-6)


def test_story_similarities_need_two_frames():
    with pytest.raises(ValueError):
        previous_image_similarity(torch.ones(1, 3))
    with pytest.raises(ValueError):
        total_story_similarity(torch.ones(1, 3))
    with pytest.raises(ValueError):
        ground_truth_similarity(torch.ones(3, 3), torch.ones(4, 3))


# ----------------------------------------------------------------------------------------------------
# FID and KID
# ----------------------------------------------------------------------------------------------------


def _eigh_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root by eigendecomposition (independent of scipy's sqrtm)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(features), features) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_the_closed_form_on_sample_statistics():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(1.0, 2.0, size=(300, 6))
    mu_a, sigma_a = a.mean(0), np.cov(a, rowvar=False)
    mu_b, sigma_b = b.mean(0), np.cov(b, rowvar=False)
    # Tr((Σa Σb)^½) = Tr((Σa^½ Σb Σa^½)^½), computed with symmetric eigendecompositions only.
    root_a = _eigh_sqrt(sigma_a)
    trace_covmean = np.trace(_eigh_sqrt(root_a @ sigma_b @ root_a))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_covmean
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fid_matches_the_population_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu_1, mu_2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 0.0, -1.0, 0.0])
    var_1, var_2 = np.array([1.0, 4.0, 0.25, 1.0]), np.array([2.0, 1.0, 1.0, 9.0])
    a = rng.normal(mu_1, np.sqrt(var_1), size=(200_000, 4))
    b = rng.normal(mu_2, np.sqrt(var_2), size=(200_000, 4))
    # N(μ1, diag σ1²) vs N(μ2, diag σ2²): ||μ1-μ2||² + Σ (σ1² + σ2² - 2 σ1 σ2).
    expected = np.sum((mu_1 - mu_2) ** 2) + np.sum(var_1 + var_2 - 2 * np.sqrt(var_1 * var_2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # The helper on the exact population statistics gives the closed form exactly.
    exact = frechet_distance_from_statistics(mu_1, np.diag(var_1), mu_2, np.diag(var_2))
    assert exact == pytest.approx(expected, rel=1e-10)


def test_fid_survives_a_singular_covariance():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))  # 5 samples in 16-D: rank 4 covariances
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0
    assert feature_statistics(a)[1].shape == (16, 16)


def test_kid_is_near_zero_for_the_same_set_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(300, 8))
    same_mean, same_std = kernel_inception_distance(a, a, subsets=20, subset_size=100)
    shifted_mean, _ = kernel_inception_distance(a, a + 1.0, subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05 * shifted_mean
    assert same_std >= 0 and shifted_mean > 0
    # Deterministic for a seed; the subsets (and so the value) change with it.
    assert kernel_inception_distance(
        a, a + 1.0, subsets=5, subset_size=50, seed=7
    ) == kernel_inception_distance(a, a + 1.0, subsets=5, subset_size=50, seed=7)


def test_kid_matches_the_unbiased_mmd_formula_on_one_full_subset():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(6, 3))

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3

    m = 6
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    # With subset_size = N every subset is the whole set (in some order), so the value is exact.
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=100)
    assert mean == pytest.approx(within - 2 * across, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_fid_warning_below_2048_samples():
    assert FID_MIN_SAMPLES == 2048
    assert fid_warning(2047) is not None and "KID" in fid_warning(2047)
    assert fid_warning(10) is not None
    assert fid_warning(2048) is None


def test_clip_features_and_resize_protocols(clip):
    extractor = ClipFeatures(clip)
    assert isinstance(extractor, FeatureExtractor)
    features = extractor.features(IMAGES)  # (7, D)
    assert features.shape == (len(IMAGES), clip.model.config.projection_dim) and features.dtype == np.float64
    norms = np.linalg.norm(features, axis=1)
    assert not np.allclose(norms, 1.0)  # un-normalised projected embeddings
    assert torch.allclose(
        F.normalize(torch.from_numpy(features).float(), dim=-1), clip.image_embeddings(IMAGES), atol=1e-5
    )

    full = prepare_for_features(IMAGES, "full", extractor.input_size)
    assert {image.size for image in full} == {(extractor.input_size, extractor.input_size)}
    assert prepare_for_features(IMAGES, "full")[0].size == IMAGES[0].size
    big = _noise_images(1, size=(128, 128), seed=9)
    low = prepare_for_features(big, "arldm64", 128)[0]
    direct = prepare_for_features(big, "full", 128)[0]
    assert low.size == (128, 128)
    assert not np.array_equal(np.asarray(low), np.asarray(direct))  # the 64x64 bottleneck loses detail
    assert prepare_for_features(big, "arldm64")[0].size == (64, 64)
    with pytest.raises(ValueError, match="unknown resize protocol"):
        prepare_for_features(big, "inception")


# ----------------------------------------------------------------------------------------------------
# Object counts
# ----------------------------------------------------------------------------------------------------


def _direct_scores(folder, images: list[Image.Image]) -> list[torch.Tensor]:
    """Each query's best real-class probability, from the raw logits, one image at a time."""
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    scores = []
    with torch.no_grad():
        for image in images:
            logits = model(
                **processor(images=[image.convert("RGB")], return_tensors="pt")
            ).logits  # (1, Q, C+1)
            scores.append(logits.softmax(-1)[0, :, :-1].max(-1).values)  # (Q,)
    return scores


def test_object_counts_equal_detections_above_the_threshold(tiny_detector):
    scores = _direct_scores(tiny_detector, IMAGES)
    threshold = float(torch.cat(scores).median())  # splits the queries, so counts vary
    expected = [int((image_scores >= threshold).sum()) for image_scores in scores]
    assert 0 < sum(expected) < sum(len(image_scores) for image_scores in scores)
    counter = ObjectCounter.load(tiny_detector, threshold=threshold, batch_size=2)
    counts = counter.count(IMAGES)
    assert counts == expected
    found = counter.detections(IMAGES)
    assert all(bool((item["scores"] >= threshold).all()) for item in found)
    assert all(item["boxes"].shape == (count, 4) for item, count in zip(found, counts, strict=True))


def test_object_counts_do_not_depend_on_batching(tiny_detector):
    one_by_one = ObjectCounter.load(tiny_detector, threshold=0.5, batch_size=1).count(IMAGES)
    batched = ObjectCounter.load(tiny_detector, threshold=0.5, batch_size=8).count(IMAGES)
    assert one_by_one == batched


def test_a_threshold_above_one_counts_nothing(tiny_detector):
    assert ObjectCounter.load(tiny_detector, threshold=1.01).count(IMAGES) == [0] * len(IMAGES)


def test_histogram():
    assert ObjectCounter.histogram([3, 1, 3, 0, 5]) == {0: 1, 1: 1, 2: 0, 3: 2, 4: 0, 5: 1}
    assert ObjectCounter.histogram([]) == {}
    with pytest.raises(ValueError):
        ObjectCounter.histogram([-1])


def test_loading_a_missing_model_names_it(tmp_path):
    from pipeline.errors import StorypipeError

    with pytest.raises(StorypipeError, match="eval.clip_model"):
        ClipSimilarity.load(tmp_path / "missing")
    with pytest.raises(StorypipeError, match="eval.detector_model"):
        ObjectCounter.load(tmp_path / "missing")
