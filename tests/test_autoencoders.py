"""Autoencoders: round trips for each kind, the records that refuse a different autoencoder, bad input."""

import json

import pytest
import torch

from codegpt.autoencoders import (
    DiffusersAutoencoder,
    ModuleAutoencoder,
    PatchAutoencoder,
    check_autoencoder,
    load_autoencoder,
    train_autoencoder,
)
from codegpt.digits import patchify

diffusers = pytest.importorskip("diffusers")


def tiny_kl(channels: int = 3, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = dict(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16, mid_block_add_attention=False)
    return diffusers.AutoencoderKL(**{**config, **overrides})


def tiny_vq(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, sample_size=16, num_vq_embeddings=32,
                             mid_block_add_attention=False)


def images(n=5, channels=3, size=16, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_patches_are_lossless_and_match_the_digits_layout():
    x = images(4, channels=1, size=8)
    ae = PatchAutoencoder(8, channels=1, patch=2, scale=16)
    z = ae.encode(x)
    assert z.shape == (4, 4, 4, 4) and ae.latent_grid == (4, 4)
    assert torch.equal(z, patchify(x[:, 0] * 16, 2))  # the digits' codebooks still apply
    assert torch.allclose(ae.decode(z), x, atol=1e-6)
    rgb = PatchAutoencoder((8, 12), channels=3, patch=4)
    x = images(2, channels=3, size=8)[..., :8].repeat(1, 1, 1, 2)[..., :12]
    assert rgb.encode(x).shape == (2, 2, 3, 48)
    assert torch.allclose(rgb.decode(rgb.encode(x)), x, atol=1e-6)


def test_kl_round_trip_scales_latents_and_batches_do_not_change_them(tmp_path):
    model = tiny_kl()
    model.register_to_config(scaling_factor=0.5)
    ae = DiffusersAutoencoder(model)
    x = images(5)
    z = ae.encode(x, batch_size=2)
    assert z.shape == (5, 8, 8, 4) and ae.downsample == 2 and ae.latent_dim == 4
    with torch.no_grad():
        mean = model.encode(x * 2 - 1).latent_dist.mean
        expected = (model.decode(mean).sample + 1) / 2
    assert torch.allclose(z, 0.5 * mean.permute(0, 2, 3, 1), atol=1e-5)
    assert torch.allclose(ae.decode(z), expected.clamp(0, 1), atol=1e-5)
    assert torch.allclose(ae.encode(x, batch_size=5), z, atol=1e-6)


def test_kl_from_a_folder_with_subfolder_is_the_same_autoencoder(tmp_path):
    model = tiny_kl()
    model.save_pretrained(tmp_path / "repo" / "vae")
    ae = DiffusersAutoencoder.from_pretrained(tmp_path / "repo", subfolder="vae")
    x = images(3)
    assert torch.allclose(ae.encode(x), DiffusersAutoencoder(model).encode(x), atol=1e-6)
    spec = json.loads(json.dumps(ae.spec()))  # what a dataset records
    assert spec["source"] == str((tmp_path / "repo").resolve()) and spec["subfolder"] == "vae"
    again = load_autoencoder(spec)  # rebuilt from the record alone
    assert torch.allclose(again.encode(x), ae.encode(x), atol=1e-6)
    check_autoencoder(spec, DiffusersAutoencoder(model))  # the same weights in memory pass


def test_a_different_autoencoder_is_refused_naming_what_differs(tmp_path):
    spec = DiffusersAutoencoder(tiny_kl(seed=0)).spec()
    with pytest.raises(ValueError, match="weights_sha256"):
        check_autoencoder(spec, DiffusersAutoencoder(tiny_kl(seed=1)))
    with pytest.raises(ValueError, match="class: 'AutoencoderKL' recorded, 'VQModel' given"):
        check_autoencoder(spec, DiffusersAutoencoder(tiny_vq()))
    with pytest.raises(ValueError, match="image_size"):
        check_autoencoder(spec, DiffusersAutoencoder(tiny_kl(seed=0), image_size=8))
    patches = PatchAutoencoder(8, 1, 2).spec()
    with pytest.raises(ValueError, match="patch: 2 recorded, 4 given"):
        check_autoencoder(patches, PatchAutoencoder(8, 1, 4))
    # Weights changed in the recorded folder: loading from the record refuses them.
    model = tiny_kl()
    model.save_pretrained(tmp_path / "vae")
    spec = DiffusersAutoencoder.from_pretrained(tmp_path / "vae").spec()
    tiny_kl(seed=3).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="another autoencoder"):
        load_autoencoder(spec)


def test_vq_uses_pre_quantisation_latents_and_decodes_them_unquantised():
    model = tiny_vq()
    ae = DiffusersAutoencoder(model)
    x = images(4)
    z = ae.encode(x)
    with torch.no_grad():
        h = model.encode(x * 2 - 1).latents
        _, _, (_, _, indices) = model.quantize(h)
    assert torch.allclose(z, h.permute(0, 2, 3, 1), atol=1e-6)
    # Its own codebook, by choice: the same codes as its quantiser, and the same images as its decode.
    own = ae.own_codebook()
    codes = own.encode(z)
    assert torch.equal(codes.flatten(), indices.flatten())
    with torch.no_grad():
        quantised = (model.decode(h).sample + 1) / 2
    assert torch.allclose(ae.decode(own.decode(codes)), quantised.clamp(0, 1), atol=1e-5)
    # Latents off its codebook (a post-hoc codebook's) must not be snapped back onto its codebook.
    shifted = z + 0.3
    with torch.no_grad():
        requantised = ((model.decode(shifted.permute(0, 3, 1, 2)).sample + 1) / 2).clamp(0, 1)
        raw = ((model.decode(shifted.permute(0, 3, 1, 2), force_not_quantize=True).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(ae.decode(shifted), raw, atol=1e-5)
    assert not torch.allclose(ae.decode(shifted), requantised, atol=1e-3)
    with pytest.raises(ValueError, match="only a VQModel"):
        DiffusersAutoencoder(tiny_kl()).own_codebook()


class Halver(torch.nn.Module):
    """Any module with encode/decode: average-pools to half size, works in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        return {"z": torch.nn.functional.avg_pool2d(x, 2) * self.gain}

    def decode(self, z):
        return torch.nn.functional.interpolate(z / self.gain, scale_factor=2.0)


def test_any_module_through_the_adapter():
    ae = ModuleAutoencoder(Halver(), image_size=8, channels=3, downsample=2, latent_dim=3, module_range=(-1, 1),
                           encode_output=lambda out: out["z"], name="halver")
    x = images(2, size=8)
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 3)
    assert torch.allclose(z, (torch.nn.functional.avg_pool2d(x, 2) * 2 - 1).permute(0, 2, 3, 1), atol=1e-6)
    assert torch.allclose(ae.decode(z), torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2),
                                                                        scale_factor=2.0), atol=1e-6)
    spec = ae.spec()
    assert spec["kind"] == "module" and spec["name"] == "halver"
    with pytest.raises(ValueError, match="pass it as module="):
        load_autoencoder(spec)
    assert load_autoencoder(spec, module=Halver(), encode_output=lambda out: out["z"]).latent_dim == 3
    wrong = ModuleAutoencoder(Halver(), image_size=8, channels=3, downsample=2, latent_dim=5,
                              encode_output=lambda out: out["z"])
    with pytest.raises(ValueError, match=r"module.encode returned \(2, 3, 4, 4\), expected \(N, 5, 4, 4\)"):
        wrong.encode(x)
    with pytest.raises(TypeError, match="must have an encode"):
        ModuleAutoencoder(torch.nn.Linear(2, 2), image_size=8, channels=3, downsample=2, latent_dim=3)


def test_bad_images_are_refused_before_any_compute():
    ae = PatchAutoencoder(8, channels=1, patch=2)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\).*got \(2, 3, 8, 8\)"):
        ae.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floats in \\[0, 1\\], got dtype torch.uint8"):
        ae.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="values in \\[0, 1\\], got values in \\[0.0, 255.0\\]"):
        ae.encode(torch.full((2, 1, 8, 8), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="latents must have shape \\(N, 4, 4, 4\\)"):
        ae.decode(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="divisible by patch=3"):
        PatchAutoencoder(8, 1, 3)
    with pytest.raises(ValueError, match="divisible by the model's downsampling factor 2"):
        DiffusersAutoencoder(tiny_kl(), image_size=15)


def test_train_autoencoder_learns_and_is_frozen():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)).round()
    untrained, _ = train_autoencoder(x, steps=1, batch_size=8, seed=0)
    trained, record = train_autoencoder(x, steps=25, batch_size=8, seed=0)
    error = lambda ae: float((ae.decode(ae.encode(x)) - x).pow(2).mean())  # noqa: E731
    assert error(trained) < 0.7 * error(untrained)
    assert record["steps"] == 25 and record["parameters"] > 0
    assert not any(p.requires_grad for p in trained.model.parameters())
    # The scaling factor makes the latents unit-variance.
    assert trained.encode(x).std().item() == pytest.approx(1.0, rel=0.05)
    again, _ = train_autoencoder(x, steps=25, batch_size=8, seed=0)
    assert again.spec()["weights_sha256"] == trained.spec()["weights_sha256"]  # seeded
