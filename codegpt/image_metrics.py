"""The field's image metrics: FID (and KID, Inception Score) between generated and real images, and
the reconstruction FID of real images through autoencoder + codebook (the ceiling a prior can reach).

The arithmetic is torchmetrics' (`FrechetInceptionDistance`, `KernelInceptionDistance`,
`InceptionScore`), chosen because it installs without torchvision: torch-fidelity and clean-fid import
torchvision, which has no CPU build matching our torch (see the README). torchmetrics takes any
`nn.Module` as the feature network, so two feature networks are used:

- the standard Inception v3 (2048 features, torch-fidelity's FID weights) when torch-fidelity imports
  and its weights are already in torch's hub cache: figures comparable with papers; nothing is ever
  downloaded here;
- otherwise a `FeatureNet` of our own, small and convolutional: trained as a classifier on the data's
  real training images (`train_feature_net`; the digits demo does this) or, for tests, left at its
  seeded initialisation. Figures from it compare runs on one data set with one network, never
  with published FIDs; every result says which network made it (`feature_network`).

Precision and recall are not in torchmetrics (torch-fidelity has them), so they are not reported.
Images everywhere are float (N, C, H, W) in [0, 1], as tensors or as iterables of such batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureNet", "fid", "image_metrics", "reconstruction_metrics", "standard_inception_available",
           "train_feature_net"]

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


class FeatureNet(nn.Module):
    """A small CNN: images (N, C, H, W) in [0, 1] -> features (N, num_features); `logits(x)` adds a
    linear classifier on top (for training it, and for the Inception Score).

    Three 3x3 conv blocks (GELU, the last two strided) and a global average pool: any image size
    works, and for 8x8 digits it has about 30k parameters.
    """

    def __init__(self, channels: int = 1, num_features: int = 64, num_classes: int = 0, width: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            torch.manual_seed(seed)  # the network is part of the metric: the same seed, the same network
            self.body = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1), nn.GELU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(2 * width, num_features, 3, stride=2, padding=1), nn.GELU(),
            )
            self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else None
        self.channels = channels
        self.num_features = num_features  # torchmetrics reads this instead of probing a 299x299 image
        self.num_classes = num_classes
        self.description = f"codegpt FeatureNet({channels} channels, {num_features} features), untrained, seed {seed}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float()).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this FeatureNet has no classifier (num_classes=0)")
        return self.head(self(images))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, *, num_features: int = 64, steps: int = 600,
                      batch_size: int = 128, learning_rate: float = 3e-3, seed: int = 0,
                      augment_noise: float = 0.05) -> FeatureNet:
    """Train a `FeatureNet` classifier on real images (N, C, H, W) in [0, 1] and labels (N,); frozen.

    The features of a network that tells the classes apart see what matters in these images, which
    a random network does not. Light Gaussian noise on the inputs keeps it from keying on the exact
    pixel statistics of real images (decoded images are slightly smoother).
    """
    labels = torch.as_tensor(labels).long()
    if images.ndim != 4 or len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"images (N, C, H, W) and labels (N,) must match, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1
    net = FeatureNet(images.shape[1], num_features, num_classes, seed=seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    images = images.float()
    net.train()
    for _ in range(steps):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x = images[index]
        x = x + augment_noise * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(net.logits(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.description = (f"codegpt FeatureNet({images.shape[1]} channels, {num_features} features), classifier "
                       f"trained on {len(images)} real images ({steps} steps, seed {seed})")
    return net.eval().requires_grad_(False)


def standard_inception_available() -> bool:
    """Whether the standard FID Inception can run here without a download: torch-fidelity imports
    (it needs a torchvision that matches torch) and its weights are in torch's hub cache."""
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
        return False
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS))


def _feature(feature: nn.Module | str) -> tuple[Any, str, bool]:
    """(what torchmetrics takes, its description, whether it is the standard Inception)."""
    if isinstance(feature, nn.Module):
        return feature.eval(), getattr(feature, "description", type(feature).__name__), False
    if feature == "inception":
        if not standard_inception_available():
            raise ValueError("feature='inception' needs torch-fidelity (pip install torch-fidelity, with a torchvision "
                             f"that matches torch) and {INCEPTION_WEIGHTS} in {torch.hub.get_dir()}/checkpoints")
        return 2048, "Inception v3 (torch-fidelity FID weights, 2048 features): the standard FID", True
    raise ValueError(f"feature must be an nn.Module (e.g. a FeatureNet) or 'inception', got {feature!r}")


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        return images.split(batch_size)
    return images


@torch.inference_mode()
def image_metrics(real: torch.Tensor | Iterable[torch.Tensor], fake: torch.Tensor | Iterable[torch.Tensor],
                  feature: nn.Module | str, *, kid: bool = True, inception_score: bool = True,
                  batch_size: int = 256) -> dict[str, Any]:
    """FID (and KID, Inception Score when asked and possible) of `fake` against `real`.

    `feature`: a feature network (e.g. `train_feature_net(...)`) or "inception" (the standard one;
    see `standard_inception_available`). The Inception Score needs class logits: the standard
    Inception's, or a `FeatureNet` trained as a classifier. Returns a dict with `fid`,
    `kid_mean`/`kid_std`, `inception_score_mean`/`_std`, `num_real`, `num_fake`, `feature_network`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    module, description, standard = _feature(feature)
    kwargs = {"normalize": True} if standard else {}
    metrics: dict[str, Any] = {"fid": FrechetInceptionDistance(feature=module, **kwargs)}
    with warnings.catch_warnings():
        # KID and IS keep every feature vector (N x features floats): their own warning says so.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        if kid:
            # KID's subset size must fit the smaller set; it is set once the sets are counted.
            metrics["kid"] = KernelInceptionDistance(feature=module, subset_size=2, **kwargs)
        if inception_score:
            if standard:
                metrics["is"] = InceptionScore(normalize=True)
            elif isinstance(module, FeatureNet) and module.head is not None:
                metrics["is"] = InceptionScore(feature=nn.Sequential(module, module.head))  # calls it for logits
    counts = {"real": 0, "fake": 0}
    for name, images in (("real", real), ("fake", fake)):
        for batch in _batches(images, batch_size):
            batch = batch.float()
            if standard and batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)  # Inception wants RGB
            counts[name] += len(batch)
            metrics["fid"].update(batch, real=name == "real")
            if "kid" in metrics:
                metrics["kid"].update(batch, real=name == "real")
            if name == "fake" and "is" in metrics:
                metrics["is"].update(batch)
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 real and 2 fake images, got {counts['real']} and {counts['fake']}")
    result: dict[str, Any] = {"fid": float(metrics["fid"].compute()), "num_real": counts["real"],
                              "num_fake": counts["fake"], "feature_network": description}
    if "kid" in metrics:
        metrics["kid"].subset_size = min(1000, counts["real"], counts["fake"])
        mean, std = metrics["kid"].compute()
        result.update(kid_mean=float(mean), kid_std=float(std))
    if "is" in metrics:
        mean, std = metrics["is"].compute()
        result.update(inception_score_mean=float(mean), inception_score_std=float(std))
    return result


def fid(real: torch.Tensor | Iterable[torch.Tensor], fake: torch.Tensor | Iterable[torch.Tensor],
        feature: nn.Module | str, batch_size: int = 256) -> float:
    """The Fréchet distance between the feature statistics of `real` and `fake` (see `image_metrics`)."""
    return image_metrics(real, fake, feature, kid=False, inception_score=False, batch_size=batch_size)["fid"]


@torch.inference_mode()
def reconstruction_metrics(images: torch.Tensor, autoencoder: Any, codebook: Any, feature: nn.Module | str,
                           *, batch_size: int = 256) -> dict[str, Any]:
    """Real images (N, C, H, W) in [0, 1] through autoencoder alone and autoencoder + codebook.

    Returns `mse_autoencoder` and `mse_codebook` (per pixel, on [0, 1]), `fid_autoencoder` and
    `fid_codebook` (reconstructions against the originals: the best FID a prior over these codes
    can reach), and `feature_network`.
    """
    from .images import decode_codes

    through_ae, through_codes = [], []
    for begin in range(0, len(images), batch_size):
        latents = autoencoder.encode(images[begin:begin + batch_size])
        through_ae.append(autoencoder.decode(latents))
        through_codes.append(decode_codes(codebook.encode(latents), codebook, autoencoder))
    ae, codes = torch.cat(through_ae), torch.cat(through_codes)
    images = images.float()
    return {"mse_autoencoder": float((ae - images).pow(2).mean()),
            "mse_codebook": float((codes - images).pow(2).mean()),
            "fid_autoencoder": fid(images, ae, feature), "fid_codebook": fid(images, codes, feature),
            "feature_network": _feature(feature)[1], "num_images": len(images)}
