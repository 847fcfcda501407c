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


# ---------------------------------------------------------------------------------------------
# Hub ids wherever a run folder is taken
# ---------------------------------------------------------------------------------------------


def test_a_hub_id_resolves_to_its_snapshot_at_the_revision_asked(hub_repo, trained_run):
    main = resolve_run(hub_repo.repo_id)
    assert main.model_dir == hub_repo.snapshots / hub_repo.new
    assert main.hub == {"repo_id": hub_repo.repo_id, "revision": None, "commit": hub_repo.new}
    assert main.metrics is None and main.training_args is None
    assert main.data["codebook"] == str(main.model_dir / "codebook")  # the codebook it ships
    pinned = resolve_run(hub_repo.repo_id, revision=hub_repo.old)
    assert pinned.model_dir == hub_repo.snapshots / hub_repo.old and pinned.hub["commit"] == hub_repo.old
    # The weights are the run's: the final model at main, the step-2 checkpoint at the old commit.
    for revision, local in ((None, trained_run), (hub_repo.old, trained_run / "checkpoints" / "step-000002")):
        hub_model = load_model(hub_repo.repo_id, device="cpu", revision=revision)
        local_model = load_model(local, device="cpu")
        for (key, a), b in zip(hub_model.state_dict().items(), local_model.state_dict().values(), strict=True):
            assert torch.equal(a, b), key
    assert resolve_run(hub_repo.repo_id, revision="main").hub["commit"] == hub_repo.new


def test_a_local_folder_wins_and_a_missing_one_says_so(hub_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Path-like names that do not exist: no such directory, no word about repo ids.
    for missing in ("nowhere", "./toy-org/none", str(tmp_path / "none"), "a/b/c", tmp_path / "toy-org/toy-prior"):
        with pytest.raises(FileNotFoundError, match="model: no such directory") as err:
            resolve_run(missing, what="model")
        assert "Hub" not in str(err.value)
    # A repo id the cache does not hold (offline): named, with the Hub's reason.
    with pytest.raises(FileNotFoundError, match="no such directory 'toy-org/other', and the Hub model toy-org/other"):
        resolve_run("toy-org/other", what="model")
    with pytest.raises(FileNotFoundError, match="at revision 'v9' could not be fetched"):
        resolve_run("toy-org/toy-prior", what="model", revision="v9")
    # A folder named like the repo id is what the user meant.
    shutil.copytree(hub_repo.snapshots / hub_repo.old, tmp_path / hub_repo.repo_id)
    assert resolve_run(hub_repo.repo_id).hub is None
    with pytest.raises(ValueError, match="revision 'main' is for a Hub model id"):
        resolve_run(hub_repo.repo_id, revision="main")
