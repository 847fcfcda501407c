"""Image metrics: FID arithmetic against a direct computation, self-FID ~0, reconstruction metrics."""

import numpy as np
import pytest
import torch

from codegpt.autoencoders import PatchAutoencoder
from codegpt.codebook import Codebook
from codegpt.image_metrics import (
    FeatureNet,
    fid,
    image_metrics,
    reconstruction_metrics,
    standard_inception_available,
    train_feature_net,
)

pytest.importorskip("torchmetrics")


class Projection(torch.nn.Module):
    """A fixed random linear map of the pixels: features with a known, non-trivial spread."""

    def __init__(self, pixels: int, features: int = 6):
        super().__init__()
        self.weight = torch.randn(pixels, features, generator=torch.Generator().manual_seed(0))
        self.num_features = features

    def forward(self, x):
        return x.flatten(1).float() @ self.weight


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets (N, d), with scipy's matrix square root."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def sets(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(n, 1, 8, 8, generator=g)
    fake = (real.flip(-1) * 0.7 + 0.3 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return real, fake


@pytest.mark.parametrize("network", ["projection", "featurenet"])
def test_fid_matches_a_direct_computation_and_is_zero_against_itself(network):
    pytest.importorskip("scipy")
    real, fake = sets()
    feature = Projection(64) if network == "projection" else FeatureNet(1, num_features=8, seed=1)
    with torch.no_grad():
        expected = direct_fid(feature(real).double().numpy(), feature(fake).double().numpy())
    assert expected > 1e-6  # the sets differ
    assert fid(real, fake, feature, batch_size=50) == pytest.approx(expected, rel=1e-6, abs=1e-10)
    assert abs(fid(real, real, feature)) < 1e-6 * max(1.0, expected)
    # Batches in, the same figure.
    batches = [fake[:70], fake[70:]]
    assert fid(real, iter(batches), feature) == pytest.approx(expected, rel=1e-6, abs=1e-10)


def test_kid_and_inception_score_with_a_trained_classifier():
    real, fake = sets()
    labels = (real.mean(dim=(1, 2, 3)) > real.mean()).long()
    net = train_feature_net(real, labels, num_features=16, steps=30, batch_size=64)
    assert not any(p.requires_grad for p in net.parameters())
    result = image_metrics(real, fake, net)
    assert result["num_real"] == result["num_fake"] == 120
    assert "trained on 120 real images" in result["feature_network"]
    assert 1.0 <= result["inception_score_mean"] <= 2.0 + 1e-6  # two classes at most
    assert result["kid_mean"] > image_metrics(real, real, net)["kid_mean"]
    # An untrained network has no classifier: no Inception Score, the rest still comes.
    assert "inception_score_mean" not in image_metrics(real, fake, FeatureNet(1, 8))


def test_reconstruction_metrics_are_zero_for_a_lossless_codebook_and_grow_with_a_coarse_one():
    levels = torch.randint(0, 4, (60, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 3
    ae = PatchAutoencoder(8, channels=1, patch=1)  # one pixel per code: 4 values, 4 codes
    exact = Codebook.from_centroids(torch.tensor([[0.0], [1 / 3], [2 / 3], [1.0]]))
    feature = Projection(64)
    result = reconstruction_metrics(levels, ae, exact, feature)
    assert result["mse_autoencoder"] == pytest.approx(0.0, abs=1e-12)
    assert result["mse_codebook"] == pytest.approx(0.0, abs=1e-12)
    assert abs(result["fid_codebook"]) < 1e-6
    coarse = Codebook.from_centroids(torch.tensor([[0.0], [1.0]]))
    worse = reconstruction_metrics(levels, ae, coarse, feature)
    assert worse["mse_codebook"] > 0.01 and worse["fid_codebook"] > 1e-3


def test_bad_input_and_the_standard_network_when_it_cannot_run():
    real, fake = sets(4)
    with pytest.raises(ValueError, match="at least 2 real and 2 fake images, got 4 and 1"):
        fid(real, fake[:1], FeatureNet(1, 8))
    with pytest.raises(ValueError, match="feature must be an nn.Module"):
        fid(real, fake, "vgg")
    if not standard_inception_available():
        with pytest.raises(ValueError, match="torch-fidelity"):
            fid(real, fake, "inception")


@pytest.mark.skipif(not standard_inception_available(), reason="torch-fidelity or its cached weights missing")
def test_the_standard_inception_when_it_is_here():
    real, fake = sets(16)
    result = image_metrics(real, fake, "inception", kid=False)
    assert result["feature_network"].startswith("Inception v3") and result["fid"] > 0
    assert abs(fid(real, real, "inception")) < 1e-3
