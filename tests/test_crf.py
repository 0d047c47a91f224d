"""kseg.crf: the dense CRF sharpens blurred predictions at object boundaries; settings, grid, errors."""

import sys

import numpy as np
import pytest
from PIL import Image

from kseg.crf import PAPER_SEARCH, CRFParams, crf_labels, dense_crf, search_grid
from kseg.data.synth import SYNTH_CLASSES, _boundary, render

C = len(SYNTH_CLASSES)


def coarse_probabilities(label, factor=8, floor=0.2):
    """What an output-stride-8 network gives: one-hot truth averaged over 8x8 cells, upsampled bilinearly."""
    h, w = label.shape
    one_hot = np.eye(C, dtype=np.float32)[label]
    channels = []
    for c in range(C):
        small = Image.fromarray(one_hot[..., c], mode="F").resize((w // factor, h // factor), Image.BOX)
        channels.append(np.asarray(small.resize((w, h), Image.BILINEAR)))
    p = (1 - floor) * np.stack(channels, -1) + floor / C
    return p / p.sum(-1, keepdims=True)


def test_crf_recovers_boundaries_of_a_blurred_prediction():
    band_before, band_after, all_before, all_after = [], [], [], []
    for i in range(6):
        image, label = render(0, i, (96, 96), band=0)
        probs = coarse_probabilities(label)
        band = _boundary(label, 3)  # pixels within 3 px of another class
        before = probs.argmax(-1)
        after = crf_labels(image, probs)  # the paper's defaults
        band_before.append((before == label)[band].mean())
        band_after.append((after == label)[band].mean())
        all_before.append((before == label).mean())
        all_after.append((after == label).mean())
    # Measured: boundary-band accuracy 0.83 -> 0.97 on average.
    assert np.mean(band_after) > np.mean(band_before) + 0.08, (band_before, band_after)
    assert np.sum(np.array(band_after) > np.array(band_before)) >= 5, (band_before, band_after)
    assert np.mean(all_after) > np.mean(all_before)


def test_crf_returns_marginals_and_reduces_to_the_unary_without_pairwise_terms(rng):
    image, label = render(0, 7, (40, 48), band=0)
    probs = coarse_probabilities(label)
    q = dense_crf(image, probs)
    assert q.shape == (40, 48, C) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-4)
    # With both kernel weights 0 mean field is the softmax of -unary: the input probabilities.
    np.testing.assert_allclose(dense_crf(image, probs, w1=0, w2=0), probs, atol=1e-5)
    logits = rng.normal(size=(40, 48, C)).astype(np.float32) * 3
    from kseg.crf import softmax

    np.testing.assert_allclose(dense_crf(image, logits, from_logits=True), dense_crf(image, softmax(logits)), atol=1e-6)


def test_params_parse_print_and_validate():
    assert CRFParams() == CRFParams(iterations=10, w1=4, sigma_alpha=121, sigma_beta=5, w2=3, sigma_gamma=3)
    assert CRFParams.parse(None) == CRFParams.parse("paper") == CRFParams()
    p = CRFParams.parse("w1=5, sigma_alpha=80,sigma-beta=3,iterations=5")
    assert (p.w1, p.sigma_alpha, p.sigma_beta, p.iterations, p.w2) == (5, 80, 3, 5, 3)
    assert CRFParams.parse(str(p)) == p
    with pytest.raises(ValueError, match="bad CRF setting 'sigma=3'.*sigma_alpha"):
        CRFParams.parse("sigma=3")
    with pytest.raises(ValueError, match="'x' is not a number"):
        CRFParams.parse("w1=x")
    with pytest.raises(ValueError, match="sigma_beta must be > 0"):
        CRFParams(sigma_beta=0)
    with pytest.raises(ValueError, match="iterations"):
        CRFParams(iterations=0)


def test_search_grid_spans_the_papers_ranges():
    grid = search_grid()
    assert len(grid) == 6 * 6 * 8 == len(set(grid))
    assert {g.w1 for g in grid} == set(range(5, 11)) and {g.sigma_alpha for g in grid} == set(range(50, 101, 10))
    assert {g.sigma_beta for g in grid} == set(range(3, 11))
    assert {(g.w2, g.sigma_gamma, g.iterations) for g in grid} == {(3, 3, 10)}
    assert PAPER_SEARCH["sigma_alpha"] == (50, 60, 70, 80, 90, 100)
    small = search_grid(CRFParams(iterations=5), w1=[4], sigma_alpha=[121], sigma_beta=[5, 6])
    assert small == [CRFParams(iterations=5), CRFParams(iterations=5, sigma_beta=6)]
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        search_grid(gamma=[1])
    with pytest.raises(ValueError, match="empty"):
        search_grid(w1=[])


def test_bad_inputs_are_refused_with_the_reason():
    image, label = render(0, 1, (32, 32), band=0)
    probs = coarse_probabilities(label, factor=4)
    with pytest.raises(ValueError, match=r"image is \(32, 30\) but the probabilities are \(32, 32\)"):
        dense_crf(image[:, :30], probs)
    with pytest.raises(ValueError, match="raw image, not the preprocessed"):
        dense_crf(image.astype(np.float32) - 120.0, probs)
    with pytest.raises(ValueError, match="RGB"):
        dense_crf(image[..., 0], probs)
    with pytest.raises(ValueError, match="C >= 2"):
        dense_crf(image, probs[..., :1])
    with pytest.raises(ValueError, match="from_logits=True"):
        dense_crf(image, probs - 0.5)
    # Float images 0..255 are accepted (a kseg.data reader's raw output).
    assert dense_crf(image.astype(np.float32), probs).shape == probs.shape


def test_missing_pydensecrf_names_the_install_command(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("pydensecrf")] + ["pydensecrf", "pydensecrf.densecrf"]:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    import kseg.crf

    assert not kseg.crf.available()
    image, label = render(0, 1, (16, 16), band=0)
    with pytest.raises(ImportError, match=r"pip install pydensecrf2.*C\+\+ compiler"):
        dense_crf(image, coarse_probabilities(label, factor=4))
