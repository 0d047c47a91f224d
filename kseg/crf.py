"""Fully connected CRF post-processing, as DeepLab v1 applied it to its score maps.

Chen et al. (ICLR 2015, section 4) refine the network's class probabilities with the dense CRF
of Krähenbühl & Koltun (NIPS 2011): unary -log P(x_i) from the network, and Potts pairwise
terms from two Gaussian kernels over every pair of pixels,

    w1 exp(-|p_i - p_j|^2 / 2 sigma_alpha^2 - |I_i - I_j|^2 / 2 sigma_beta^2)   (appearance)
    w2 exp(-|p_i - p_j|^2 / 2 sigma_gamma^2)                                    (smoothness)

solved with 10 mean-field iterations. The defaults are the released LargeFOV setting (w1=4,
sigma_alpha=121, sigma_beta=5; w2=3, sigma_gamma=3); the paper cross-validated w1 in 5..10,
sigma_alpha in 50..100 (step 10) and sigma_beta in 3..10 (step 1) on 100 val images
(`kseg crf-search`). The inference is Krähenbühl's permutohedral-lattice C++ code through
pydensecrf2 (`pip install pydensecrf2`, built from source: needs g++ and the Python headers).

    import kseg.crf
    probs = kseg.crf.dense_crf(image, softmax)          # image uint8 [H, W, 3] RGB, softmax [H, W, C]
    labels = probs.argmax(-1)
    kseg.crf.dense_crf(image, logits, from_logits=True, w1=5, sigma_alpha=80)
    kseg.crf.CRFParams.parse("w1=5,sigma_alpha=80")     # CRFParams(iterations=10, w1=5.0, ...)
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

INSTALL_HINT = ("kseg.crf needs pydensecrf2 (Krähenbühl's dense CRF code): pip install pydensecrf2 "
                "(or pip install 'kseg[crf]'). It builds from source, so it needs a C++ compiler (g++) and "
                "the Python development headers (e.g. apt-get install g++ python3-dev).")


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings in the paper's notation; the defaults are DeepLab-LargeFOV's released ones."""

    iterations: int = 10
    w1: float = 4.0  # appearance (bilateral) kernel weight
    sigma_alpha: float = 121.0  # its spatial standard deviation, pixels
    sigma_beta: float = 5.0  # its colour standard deviation, RGB 0..255 units
    w2: float = 3.0  # smoothness (Gaussian) kernel weight
    sigma_gamma: float = 3.0  # its spatial standard deviation, pixels

    def __post_init__(self):
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise ValueError(f"CRF iterations must be a positive integer, got {self.iterations}")
        for name in ("w1", "w2"):
            if getattr(self, name) < 0:
                raise ValueError(f"CRF {name} must be >= 0, got {getattr(self, name)}")
        for name in ("sigma_alpha", "sigma_beta", "sigma_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRF {name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def parse(cls, text: str | None) -> "CRFParams":
        """"w1=5,sigma_alpha=80" -> CRFParams with those values and the defaults elsewhere.

        None, "" and "paper" give the defaults. Unknown names and bad numbers raise ValueError.
        """
        if text is None or text.strip() in ("", "paper", "default"):
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise ValueError(f"bad CRF setting {item.strip()!r} in {text!r}: expected NAME=VALUE with NAME in "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))}")
            try:
                values[key] = int(value) if key == "iterations" else float(value)
            except ValueError:
                raise ValueError(f"bad CRF setting {item.strip()!r}: {value.strip()!r} is not a number") from None
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's cross-validation ranges (section 4, "Fully Connected CRF"); w2 and sigma_gamma stay fixed.
PAPER_SEARCH = {
    "w1": tuple(range(5, 11)),
    "sigma_alpha": tuple(range(50, 101, 10)),
    "sigma_beta": tuple(range(3, 11)),
}


def search_grid(base: CRFParams | None = None, **ranges) -> list[CRFParams]:
    """Every combination of `ranges` (name -> values; default PAPER_SEARCH), other values from `base`.

    >>> len(search_grid())               # 6 w1 x 6 sigma_alpha x 8 sigma_beta
    288
    >>> search_grid(w1=[5], sigma_alpha=[50], sigma_beta=[3, 4])[1]
    CRFParams(iterations=10, w1=5, sigma_alpha=50, sigma_beta=4, w2=3.0, sigma_gamma=3.0)
    """
    base = base or CRFParams()
    axes = {**PAPER_SEARCH, **{k: v for k, v in ranges.items() if v is not None}}
    unknown = set(axes) - {f.name for f in dataclasses.fields(CRFParams)}
    if unknown:
        raise ValueError(f"unknown CRF parameter(s) {sorted(unknown)}")
    for name, values in axes.items():
        if not len(values):
            raise ValueError(f"the search range of {name} is empty")
    names = list(axes)
    return [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*axes.values())]


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return dcrf


def check_installed():
    """Raise ImportError with the pip command when pydensecrf2 is missing (before any long work)."""
    _densecrf()


def available() -> bool:
    """Whether pydensecrf2 can be imported."""
    try:
        _densecrf()
    except ImportError:
        return False
    return True


def _rgb_uint8(image, where) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{where}: the image must be RGB [H, W, 3], got shape {img.shape}")
    if img.dtype != np.uint8:
        if img.size and (np.nanmin(img) < 0 or np.nanmax(img) > 255):
            raise ValueError(f"{where}: the image must hold RGB values 0..255 (the raw image, not the "
                             f"preprocessed network input); got values {np.nanmin(img):g}..{np.nanmax(img):g}")
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    # pydensecrf takes a writable C-contiguous buffer (a PIL image's array is read-only).
    return np.require(img, np.uint8, ("C", "W"))


def as_params(crf) -> CRFParams | None:
    """None/False -> None, True -> the paper's CRFParams(), a 'w1=5,...' string parsed, a CRFParams as is."""
    if crf is None or crf is False:
        return None
    if crf is True:
        return CRFParams()
    if isinstance(crf, str):
        return CRFParams.parse(crf)
    if not isinstance(crf, CRFParams):
        raise TypeError(f"crf must be None, True, a CRFParams or a 'w1=...,sigma_alpha=...' string, got {crf!r}")
    return crf


def softmax(logits, axis=-1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def dense_crf(image, probs, params: CRFParams | None = None, *, from_logits=False, **overrides) -> np.ndarray:
    """Refine class probabilities with the fully connected CRF; returns float32 [H, W, C] marginals.

    image: the raw RGB image, uint8 (or floats 0..255) [H, W, 3], at the probabilities' size.
    probs: softmax probabilities [H, W, C] (or logits with from_logits=True).
    params / overrides: CRFParams fields (iterations, w1, sigma_alpha, sigma_beta, w2, sigma_gamma).
    """
    params = dataclasses.replace(params or CRFParams(), **overrides)
    dcrf = _densecrf()
    from pydensecrf.utils import unary_from_softmax

    p = softmax(probs) if from_logits else np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[-1] < 2:
        raise ValueError(f"dense_crf: probabilities must be [H, W, C] with C >= 2 classes, got shape {p.shape}")
    img = _rgb_uint8(image, "dense_crf")
    if img.shape[:2] != p.shape[:2]:
        raise ValueError(f"dense_crf: the image is {img.shape[:2]} but the probabilities are {p.shape[:2]}; "
                         "resize the scores to the image first")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("dense_crf: probabilities must be finite and >= 0 (pass from_logits=True for logits)")
    h, w, c = p.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    # Unary -log P, P clipped at pydensecrf's 1e-5 (float32 softmax can reach exactly 0).
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.moveaxis(p, -1, 0))))
    if params.w2 > 0:
        crf.addPairwiseGaussian(sxy=float(params.sigma_gamma), compat=float(params.w2))
    if params.w1 > 0:
        crf.addPairwiseBilateral(sxy=float(params.sigma_alpha), srgb=float(params.sigma_beta), rgbim=img,
                                 compat=float(params.w1))
    q = np.asarray(crf.inference(int(params.iterations)), dtype=np.float32)
    return np.moveaxis(q.reshape(c, h, w), 0, -1)


def crf_labels(image, probs, params: CRFParams | None = None, *, from_logits=False, **overrides) -> np.ndarray:
    """The CRF's label map, uint8 [H, W] (argmax of dense_crf)."""
    return dense_crf(image, probs, params, from_logits=from_logits, **overrides).argmax(-1).astype(np.uint8)
