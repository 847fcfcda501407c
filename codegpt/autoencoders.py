"""Autoencoders: images to a latent grid and back, the step before (and after) the codebook.

Every autoencoder here speaks one convention at its interface:

- images are float tensors (N, C, H, W) with values in [0, 1] (`value_range`), of the declared
  `image_size` (H, W) and `channels` C; `decode` returns the same, clamped to [0, 1];
- latents are float tensors (N, h, w, D), channels last (the codebook's (..., D) layout), with
  h = H / `downsample`, w = W / `downsample` and D = `latent_dim`.

Implementations:

- `PatchAutoencoder`: the identity autoencoder over non-overlapping p x p pixel patches (ImageGPT's
  road; the digits' original path). D = C * p * p, in pixel-unshuffle order (channel, row, column).
- `DiffusersAutoencoder`: a diffusers `AutoencoderKL` (the latent mean, shifted and scaled as the
  model's config says; `decode` undoes both) or `VQModel` (its pre-quantisation latents, so a
  post-hoc codebook replaces its own; `own_codebook()` gives its own codebook when its own codes are
  wanted). Loaded from a Hub id or a folder, with `subfolder` and `revision` (`codegpt[diffusers]`).
- `ModuleAutoencoder`: the adapter for any module with `encode(x) -> (N, D, h, w)` and
  `decode(z) -> (N, C, H, W)` in a value range of its own.

`spec()` records an autoencoder as JSON (kind, source, revision, subfolder, config, and a fingerprint
of its weights); `load_autoencoder(spec)` rebuilds it and `check_autoencoder(spec, autoencoder)`
refuses a different one, naming what differs. `train_autoencoder` trains the small `AutoencoderKL`
that the digits demo uses.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._util import check_int, jsonable

__all__ = [
    "Autoencoder",
    "DiffusersAutoencoder",
    "ModuleAutoencoder",
    "PatchAutoencoder",
    "check_autoencoder",
    "load_autoencoder",
    "train_autoencoder",
]

# The fields that make two autoencoders the same one; source, revision and subfolder are where it
# came from (a moved folder or another revision with the same weights is still the same autoencoder).
_IDENTITY_KEYS = ("kind", "class", "image_size", "channels", "downsample", "latent_dim", "patch", "scale",
                  "scaling_factor", "shift_factor", "weights_sha256")
_DEFAULT_BATCH = 64


class Autoencoder:
    """The interface (see the module docstring). Subclasses set the attributes and implement
    `_encode_batch`, `_decode_batch` and `spec`."""

    kind: str = "abstract"
    image_size: tuple[int, int]
    channels: int
    downsample: int
    latent_dim: int
    value_range: tuple[float, float] = (0.0, 1.0)
    device: torch.device = torch.device("cpu")
    batch_size: int = _DEFAULT_BATCH

    @property
    def latent_grid(self) -> tuple[int, int]:
        """(h, w): the code grid of one image, so a prior over it has seq_len = h * w."""
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, h, w, D)
        raise NotImplementedError

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:  # (B, h, w, D) -> (B, C, H, W)
        raise NotImplementedError

    def _base_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": list(self.image_size), "channels": self.channels,
                "downsample": self.downsample, "latent_dim": self.latent_dim,
                "value_range": list(self.value_range)}

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> latents (N, h, w, D) float32 on the CPU, batch by batch
        (memory on the device is bounded by the batch)."""
        images = self.check_images(images)
        batch_size = check_int("batch_size", batch_size or self.batch_size, 1)
        out = torch.empty(images.shape[0], *self.latent_grid, self.latent_dim)
        for begin in range(0, images.shape[0], batch_size):
            batch = images[begin:begin + batch_size].to(self.device, torch.float32)
            out[begin:begin + batch.shape[0]] = self._encode_batch(batch).float().cpu()
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor | np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Latents (N, h, w, D) -> images (N, C, H, W) in [0, 1], float32 on the CPU."""
        latents = self.check_latents(latents)
        batch_size = check_int("batch_size", batch_size or self.batch_size, 1)
        out = torch.empty(latents.shape[0], self.channels, *self.image_size)
        for begin in range(0, latents.shape[0], batch_size):
            batch = latents[begin:begin + batch_size].to(self.device, torch.float32)
            out[begin:begin + batch.shape[0]] = self._decode_batch(batch).float().clamp(0, 1).cpu()
        return out

    def check_images(self, images: Any) -> torch.Tensor:
        """`images` as a float tensor, or a clear error naming the shape, dtype or values wanted."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got dtype {images.dtype} (divide uint8 images "
                            "by 255, or read them through codegpt.images)")
        wanted = (self.channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != wanted:
            raise ValueError(f"images must have shape (N, {wanted[0]}, {wanted[1]}, {wanted[2]}) for this "
                             f"{self.kind} autoencoder, got {tuple(images.shape)}")
        if images.numel():
            low, high = float(images.min()), float(images.max())
            if not (low >= -1e-6 and high <= 1 + 1e-6):  # also catches NaN
                raise ValueError(f"images must hold values in [0, 1], got values in [{low}, {high}]")
        return images

    def check_latents(self, latents: Any) -> torch.Tensor:
        if isinstance(latents, np.ndarray):
            latents = torch.from_numpy(latents)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor, got {getattr(latents, 'dtype', type(latents))}")
        wanted = (*self.latent_grid, self.latent_dim)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != wanted:
            raise ValueError(f"latents must have shape (N, {wanted[0]}, {wanted[1]}, {wanted[2]}) (latent grid "
                             f"and latent_dim of this {self.kind} autoencoder), got {tuple(latents.shape)}")
        return latents

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, image_size={self.image_size}, channels={self.channels}, "
                f"downsample={self.downsample}, latent_dim={self.latent_dim})")


# ---------------------------------------------------------------------- pixel patches


class PatchAutoencoder(Autoencoder):
    """Pixel patches as latents: (N, C, H, W) -> (N, H/p, W/p, C*p*p), lossless, no weights.

    Args:
        image_size: (H, W), both divisible by `patch` (an int means a square).
        channels: C.
        patch: p.
        scale: latents are pixel values times `scale`; the digits use 16 so that their codebook
            sees the 0-16 values it always saw.
    """

    kind = "patches"

    def __init__(self, image_size: int | tuple[int, int], channels: int = 1, patch: int = 2,
                 scale: float = 1.0) -> None:
        self.image_size = _check_size("image_size", image_size)
        self.channels = check_int("channels", channels, 1)
        self.patch = check_int("patch", patch, 1)
        if self.image_size[0] % patch or self.image_size[1] % patch:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch={patch}")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0
                and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.downsample = patch
        self.latent_dim = channels * patch * patch

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        # pixel_unshuffle orders each vector (channel, row, column): for one channel it is the
        # row-major patch of codegpt.digits.patchify.
        return F.pixel_unshuffle(images, self.patch).permute(0, 2, 3, 1) * self.scale

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.permute(0, 3, 1, 2) / self.scale, self.patch)

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "patch": self.patch, "scale": self.scale}


# ---------------------------------------------------------------------- any module


class ModuleAutoencoder(Autoencoder):
    """The adapter for any `torch.nn.Module` with `encode` and `decode` methods.

    `module.encode(x)` must return latents (N, D, h, w) (or something `encode_output` turns into
    them) for images x (N, C, H, W) in `module_range`; `module.decode(z)` must return images in
    `module_range` (or something `decode_output` turns into them). The adapter maps [0, 1] to and
    from `module_range` and moves channels last.

    Example, a VQGAN from taming-transformers::

        ae = ModuleAutoencoder(vqgan, image_size=256, channels=3, downsample=16, latent_dim=256,
                               module_range=(-1, 1), encode_output=lambda out: out[0],
                               name="taming vqgan_imagenet_f16_16384")

    Its `spec()` records `name` and a fingerprint of the weights; `load_autoencoder` cannot rebuild
    it from the spec alone (pass the module again and `check_autoencoder` compares them).
    """

    kind = "module"

    def __init__(self, module: torch.nn.Module, *, image_size: int | tuple[int, int], channels: int,
                 downsample: int, latent_dim: int, module_range: tuple[float, float] = (0.0, 1.0),
                 encode_output: Callable[[Any], torch.Tensor] | None = None,
                 decode_output: Callable[[Any], torch.Tensor] | None = None, name: str = "",
                 device: torch.device | str | None = None, batch_size: int = _DEFAULT_BATCH) -> None:
        for method in ("encode", "decode"):
            if not callable(getattr(module, method, None)):
                raise TypeError(f"module must have an {method}() method, {type(module).__name__} has none")
        self.module = module.eval().requires_grad_(False)
        self.image_size = _check_size("image_size", image_size)
        self.channels = check_int("channels", channels, 1)
        self.downsample = check_int("downsample", downsample, 1)
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        low, high = (float(v) for v in module_range)
        if not high > low:
            raise ValueError(f"module_range must be (low, high) with high > low, got {module_range!r}")
        self.module_range = (low, high)
        self.encode_output = encode_output or (lambda out: out)
        self.decode_output = decode_output or (lambda out: out)
        self.name = name
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.device = torch.device(device) if device is not None else _module_device(module)
        self.module.to(self.device)

    def _to_module(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.module_range
        return images * (high - low) + low

    def _from_module(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self.module_range
        return (images - low) / (high - low)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encode_output(self.module.encode(self._to_module(images)))
        return _channels_last(z, self, "module.encode")

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        return self._from_module(self.decode_output(self.module.decode(latents.permute(0, 3, 1, 2))))

    def spec(self) -> dict[str, Any]:
        return {**self._base_spec(), "class": type(self.module).__name__, "name": self.name,
                "module_range": list(self.module_range), "weights_sha256": weights_fingerprint(self.module)}


# ---------------------------------------------------------------------- diffusers


class DiffusersAutoencoder(Autoencoder):
    """A diffusers `AutoencoderKL` or `VQModel` (see the module docstring).

    Build it with `DiffusersAutoencoder.from_pretrained(id_or_folder, subfolder=..., revision=...)`,
    or wrap a model in memory (`source` then says where it came from, for the record).

    Args:
        model: the diffusers model (kept frozen, in eval mode).
        image_size: (H, W) the images are converted to; default the model's `sample_size`.
        source, revision, subfolder: where the weights came from, recorded by `spec()`.
        device: where to run; default where the model is.
        batch_size: images per forward pass in `encode`/`decode`.
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int | tuple[int, int] | None = None,
                 source: str | None = None, revision: str | None = None, subfolder: str | None = None,
                 device: torch.device | str | None = None, batch_size: int = _DEFAULT_BATCH) -> None:
        cls = type(model).__name__
        config = getattr(model, "config", None)
        if cls not in ("AutoencoderKL", "VQModel") or config is None:
            raise TypeError(f"model must be a diffusers AutoencoderKL or VQModel, got {cls}")
        self.model = model.eval().requires_grad_(False)
        self.model_class = cls
        self.kind = "diffusers"
        self.channels = int(config.in_channels)
        if int(config.out_channels) != self.channels:
            raise ValueError(f"the model's in_channels ({config.in_channels}) and out_channels "
                             f"({config.out_channels}) differ: it is not an image autoencoder")
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        if cls == "VQModel":
            self.latent_dim = int(config.vq_embed_dim or config.latent_channels)
            self.scaling_factor, self.shift_factor = 1.0, 0.0  # the codebook lives in the raw latents
            if getattr(self.model.quantize, "remap", None) is not None:
                raise ValueError("VQModel with a remapped codebook (remap=...) is not supported")
        else:
            self.latent_dim = int(config.latent_channels)
            self.scaling_factor = float(config.scaling_factor)
            self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        size = image_size if image_size is not None else config.sample_size
        self.image_size = _check_size("image_size", tuple(size) if isinstance(size, list) else size)
        for side in self.image_size:
            if side % self.downsample:
                raise ValueError(f"image_size {self.image_size} must be divisible by the model's downsampling "
                                 f"factor {self.downsample}")
        self.source, self.revision, self.subfolder = source, revision, subfolder
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.model.to(self.device)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, subfolder: str | None = None,
                        revision: str | None = None, image_size: int | tuple[int, int] | None = None,
                        device: torch.device | str | None = None, batch_size: int = _DEFAULT_BATCH,
                        **kwargs: Any) -> DiffusersAutoencoder:
        """Load an `AutoencoderKL` or `VQModel` (the class is read from its config) from a Hub id or
        a folder; `kwargs` go to diffusers' `from_pretrained` (e.g. `local_files_only=True`)."""
        diffusers = _import_diffusers()
        name_or_path = os.fspath(name_or_path)
        # Both classes share ConfigMixin.load_config; it returns the config dict with _class_name.
        raw = diffusers.AutoencoderKL.load_config(name_or_path, subfolder=subfolder, revision=revision,
                                                  **{k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS})
        cls_name = raw.get("_class_name")
        if cls_name not in ("AutoencoderKL", "VQModel"):
            raise ValueError(f"{name_or_path}{'/' + subfolder if subfolder else ''} holds a {cls_name}, "
                             "not an AutoencoderKL or VQModel")
        model = getattr(diffusers, cls_name).from_pretrained(name_or_path, subfolder=subfolder, revision=revision,
                                                             **kwargs)
        source = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
        return cls(model, image_size=image_size, source=source, revision=revision, subfolder=subfolder,
                   device=device, batch_size=batch_size)

    def _encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1  # diffusers autoencoders work in [-1, 1]
        if self.model_class == "VQModel":
            z = self.model.encode(x).latents  # before quantisation: the post-hoc codebook quantises
        else:
            z = (self.model.encode(x).latent_dist.mean - self.shift_factor) * self.scaling_factor
        return _channels_last(z, self, f"{self.model_class}.encode")

    def _decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.permute(0, 3, 1, 2)
        if self.model_class == "VQModel":
            # Without the flag VQModel.decode quantises again with its own codebook, silently
            # replacing the codes of ours.
            y = self.model.decode(z, force_not_quantize=True).sample
        else:
            y = self.model.decode(z / self.scaling_factor + self.shift_factor).sample
        return (y + 1) / 2

    def own_codebook(self):
        """A VQModel's own codebook as a `codegpt.Codebook` (its indices become the codes)."""
        from .codebook import Codebook

        if self.model_class != "VQModel":
            raise ValueError(f"only a VQModel has a codebook of its own, this is an {self.model_class}")
        weight = self.model.quantize.embedding.weight.detach().float().cpu()
        return Codebook.from_centroids(weight, description=f"the own codebook of VQModel {self.source or ''}")

    def spec(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        return {**self._base_spec(), "class": self.model_class, "source": self.source, "revision": self.revision,
                "subfolder": self.subfolder, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "config": jsonable(config),
                "weights_sha256": self._fingerprint}


_CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "proxies")


# ---------------------------------------------------------------------- records


def load_autoencoder(spec: dict[str, Any], *, module: torch.nn.Module | None = None,
                     device: torch.device | str | None = None, check: bool = True, **kwargs: Any) -> Autoencoder:
    """Rebuild the autoencoder that `spec` (from `Autoencoder.spec()`) records.

    Patches need nothing else; diffusers models load from the recorded source, revision and
    subfolder (`kwargs` go to `from_pretrained`); a `ModuleAutoencoder` needs its `module` again.
    With `check`, the loaded weights must be the recorded ones (`check_autoencoder`).
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"spec must be a dict from Autoencoder.spec() with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind == "patches":
        autoencoder: Autoencoder = PatchAutoencoder(tuple(spec["image_size"]), spec["channels"], spec["patch"],
                                                    spec.get("scale", 1.0))
    elif kind == "diffusers":
        if not spec.get("source"):
            raise ValueError("the recorded diffusers autoencoder has no source (it was built in memory and never "
                             "saved): save it with save_pretrained and record that folder")
        autoencoder = DiffusersAutoencoder.from_pretrained(spec["source"], subfolder=spec.get("subfolder"),
                                                           revision=spec.get("revision"),
                                                           image_size=tuple(spec["image_size"]), device=device,
                                                           **kwargs)
    elif kind == "module":
        if module is None:
            raise ValueError(f"the recorded autoencoder is a module ({spec.get('class')} {spec.get('name')!r}); "
                             "pass it as module=")
        autoencoder = ModuleAutoencoder(module, image_size=tuple(spec["image_size"]), channels=spec["channels"],
                                        downsample=spec["downsample"], latent_dim=spec["latent_dim"],
                                        module_range=tuple(spec.get("module_range", (0.0, 1.0))),
                                        name=spec.get("name", ""), device=device, **kwargs)
    else:
        raise ValueError(f"spec kind must be one of 'patches', 'diffusers', 'module', got {kind!r}")
    if check:
        check_autoencoder(spec, autoencoder)
    return autoencoder


def check_autoencoder(expected: dict[str, Any], autoencoder: Autoencoder | dict[str, Any],
                      what: str = "the codes") -> None:
    """Raise ValueError unless `autoencoder` is the one `expected` (a spec) records, naming each field
    that differs; `what` says what was made with the expected one (for the message)."""
    actual = autoencoder if isinstance(autoencoder, dict) else autoencoder.spec()
    differences = []
    for key in _IDENTITY_KEYS:
        a, b = _normal(expected.get(key)), _normal(actual.get(key))
        if a != b:
            differences.append(f"{key}: {_short(a)} recorded, {_short(b)} given")
    if differences:
        origin = _origin(expected)
        raise ValueError(f"{what} were made with another autoencoder ({origin}); refusing to decode with "
                         f"{_origin(actual)}: " + "; ".join(differences))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, dtypes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------- training the demo's autoencoder


def train_autoencoder(
    images: torch.Tensor | np.ndarray,
    *,
    block_out_channels: tuple[int, ...] = (16, 32),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    mid_block_attention: bool = False,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = False,
) -> tuple[DiffusersAutoencoder, dict[str, Any]]:
    """Train a small diffusers `AutoencoderKL` on `images` (N, C, H, W) in [0, 1]; return it frozen.

    Why a KL autoencoder and not a VQModel: the codebook is fitted post hoc on its latents, so the
    autoencoder needs continuous latents only; a VQModel would quantise twice and its straight-through
    training needs more steps. Loss: MSE in [-1, 1] plus `kl_weight` times the KL term; AdamW with
    a one-cycle schedule. At the end the latents' scaling factor is set to 1 / their standard
    deviation (as Stable Diffusion did), so that codebook errors read on a unit scale.

    Returns the autoencoder and the training record: steps, seconds, final training MSE (on [0, 1]),
    parameters, scaling_factor.
    """
    diffusers = _import_diffusers()
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"images must be a float tensor (N, C, H, W) in [0, 1], got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    n, channels, height, width = images.shape
    depth = len(block_out_channels)
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * depth, up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=height,
        mid_block_add_attention=mid_block_attention,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    data = images.float() * 2 - 1
    start = time.perf_counter()
    model.train()
    from tqdm.auto import tqdm

    mse = float("nan")
    for _ in tqdm(range(steps), desc="autoencoder", disable=not progress):
        x = data[torch.randint(n, (min(batch_size, n),), generator=generator)]
        posterior = model.encode(x).latent_dist
        # The posterior sample draws from torch's global RNG, seeded above.
        reconstruction = model.decode(posterior.sample()).sample
        loss_mse = F.mse_loss(reconstruction, x)
        loss = loss_mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        mse = float(loss_mse.detach()) / 4  # on [0, 1]
    model.eval()
    with torch.inference_mode():
        std = float(torch.cat([model.encode(data[i:i + 256]).latent_dist.mean for i in range(0, n, 256)]).std())
    model.register_to_config(scaling_factor=1.0 / std)
    autoencoder = DiffusersAutoencoder(model, image_size=(height, width))
    record = {"steps": steps, "seconds": time.perf_counter() - start, "train_mse": mse,
              "parameters": sum(p.numel() for p in model.parameters()), "scaling_factor": 1.0 / std}
    return autoencoder, record


# ---------------------------------------------------------------------- helpers


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("diffusers autoencoders need diffusers: pip install 'codegpt[diffusers]'") from err
    return diffusers


def _channels_last(z: torch.Tensor, autoencoder: Autoencoder, where: str) -> torch.Tensor:
    wanted = (autoencoder.latent_dim, *autoencoder.latent_grid)
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != wanted:
        raise ValueError(f"{where} returned {tuple(getattr(z, 'shape', ()))}, expected (N, {wanted[0]}, "
                         f"{wanted[1]}, {wanted[2]}) from the declared latent_dim, image_size and downsample")
    return z.permute(0, 2, 3, 1)


def _module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(iter(module.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_size(name: str, size: Any) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"{name} must be an int or (H, W) of ints >= 1, got {size!r}")
    return int(size[0]), int(size[1])


def _normal(value: Any) -> Any:
    """Compare lists and tuples alike, and floats to 6 significant digits (JSON round trips)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 20 else text[:16] + "...'"


def _origin(spec: dict[str, Any]) -> str:
    parts = [spec.get("class") or spec.get("kind", "?")]
    for key in ("source", "subfolder", "revision", "name"):
        if spec.get(key):
            parts.append(f"{key}={spec[key]}")
    return " ".join(str(p) for p in parts)
