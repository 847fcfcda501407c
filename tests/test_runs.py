"""codegpt.runs: a run folder (checkpoints, the model in it, metrics), the per-class sampler and the
image grid; codegpt.digits.patch_decoder, the one codes -> pixels renderer."""

import json
import shutil

import pytest
import torch

from codegpt import GPT
from codegpt.codebook import Codebook
from codegpt.digits import codes_to_images, patch_decoder
from codegpt.runs import (
    complete_checkpoints,
    load_model,
    newest_checkpoint,
    render_codes,
    resolve_run,
    sample_classes,
    save_image_grid,
)


def test_newest_complete_checkpoint_ignores_partial_ones(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert [step for step, _ in complete_checkpoints(run)] == [2, 4]
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000006")
    (ckpts / "step-000006" / "model" / "config.json").unlink()  # a model cut short
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000008")
    (ckpts / "step-000008" / "trainer_state.json").write_text('{"step": 8')  # a state cut short
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000010")
    (ckpts / "step-000010" / "trainer_state.json").write_text('{"step": 4}')  # not its own step
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000012.tmp")
    assert newest_checkpoint(run) == ckpts / "step-000004"
    assert newest_checkpoint(tmp_path / "nowhere") is None


def test_resolve_run_finds_the_model_and_its_evaluation(trained_run, tmp_path):
    final = resolve_run(trained_run)
    assert final.model_dir == trained_run / "model"
    last = json.loads((trained_run / "log.jsonl").read_text().splitlines()[-1])
    assert final.metrics == last and final.metrics["step"] == 4
    assert final.training_args["max_steps"] == 4
    # Without model/, a run folder stands for its newest complete checkpoint.
    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "model")
    assert resolve_run(run).model_dir == run / "checkpoints" / "step-000004" / "model"
    assert resolve_run(run / "checkpoints" / "step-000002").metrics["step"] == 2
    bare = resolve_run(run / "checkpoints" / "step-000002" / "model")
    with pytest.raises(FileNotFoundError, match="--model: .* holds no model"):
        resolve_run(tmp_path, what="--model")
    assert bare.metrics["step"] == 2 and bare.training_args["max_steps"] == 4


def test_load_model_keeps_the_saved_dtype_unless_told(trained_run, tmp_path):
    model = load_model(trained_run, device="cpu")
    assert not model.training and model.dtype == torch.float32
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_model(tmp_path / "bf16", device="cpu").dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16", device="cpu", dtype=torch.float32).dtype == torch.float32
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        load_model(tmp_path / "other")


def test_sample_classes_groups_by_class_and_is_seeded(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config()).train()
    rng = torch.get_rng_state()
    codes, classes = sample_classes(model, 3, seed=5, batch_size=4)  # batches cut across classes
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode kept, global RNG untouched
    assert codes.shape == (9, 16) and classes.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert int(codes.max()) < 16  # codes only, never the start token
    assert torch.equal(codes, sample_classes(model, 3, seed=5, batch_size=4)[0])
    assert not torch.equal(codes, sample_classes(model, 3, seed=6, batch_size=4)[0])
    some, which = sample_classes(model, 2, classes=[2], guidance_scale=2.0, seed=5)
    assert some.shape == (2, 16) and which.tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"classes must be class ids in \[0, 3\)"):
        sample_classes(model, 2, classes=[3])
    unconditional = GPT(tiny_config(class_conditional=False))
    codes, classes = sample_classes(unconditional, 4)
    assert codes.shape == (4, 16) and classes is None
    with pytest.raises(ValueError, match="unconditional"):
        sample_classes(unconditional, 4, classes=[0])


def test_patch_decoder_renders_in_unit_range_and_grid_is_a_png(tmp_path):
    codebook = Codebook.from_centroids(torch.tensor([[0.0] * 4, [16.0] * 4, [8.0, 0.0, 16.0, 4.0]]))
    decode = patch_decoder(codebook)  # patch 2 from dim 4
    codes = torch.tensor([[[0, 1], [2, 0]]])
    images = decode(codes)
    assert images.shape == (1, 4, 4)
    assert torch.allclose(images, codes_to_images(codebook, codes, patch=2) / 16)  # scaled by the centroid range
    with pytest.raises(ValueError, match="patch 3 needs codebook vectors of dim 9"):
        patch_decoder(codebook, patch=3)
    with pytest.raises(ValueError, match="not a square patch"):
        patch_decoder(Codebook.from_centroids(torch.ones(2, 3)))
    from PIL import Image

    png = save_image_grid(render_codes(codes.reshape(1, 4), (2, 2), decode, 3), tmp_path / "g.png", rows=1)
    assert Image.open(png).size == (2 + 4 * 8 + 2, 2 + 4 * 8 + 2)
    colours = render_codes(torch.tensor([[0, 1, 2, 0]]), (2, 2), None, 3)  # one colour per code
    assert colours.shape == (1, 2, 2, 3) and (colours[0, 0, 0] == colours[0, 1, 1]).all()
