"""Fine-tuning from a trained prior (``init_from``: weights only, a new optimizer and schedule from step 0) and
Hub ids wherever the CLI takes a run folder (sample, eval, push, train --init-from), offline from a hand-made
cache (the ``hub_repo`` fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegpt.cli import main
from codegpt.data import CodeDataset
from codegpt.runs import load_model, read_starts, read_training_args
from codegpt.training import TrainingArguments, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def data_of(trained_run: Path) -> CodeDataset:
    return CodeDataset(trained_run.parent / "data")  # the codes the shared run was trained on


def args_for(out: Path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=out, max_steps=2, per_device_batch_size=8, warmup_steps=0, progress=False,
              samples_per_class=1, save_every=0)
    return TrainingArguments(**{**kw, **overrides})


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_init_from_a_run_starts_from_its_weights_at_step_0(trained_run, tmp_path):
    source = load_model(trained_run, device="cpu").state_dict()
    # A learning rate too small to move the weights: what the run starts from shows through.
    result = train(args_for(tmp_path / "tuned", learning_rate=1e-12, init_from=str(trained_run)), None,
                   data_of(trained_run))
    assert result.step == 2 and result.resumed_from is None
    tuned = load_file(result.model_dir / "model.safetensors")
    assert_same_weights(tuned, {k: v for k, v in source.items() if k in tuned}, atol=1e-6)  # tied: saved once
    # The config is the source's; the run records where its weights came from (the card's "fine-tuned from").
    assert json.loads((result.model_dir / "config.json").read_text())["embed_dim"] == 32
    recorded = json.loads((tmp_path / "tuned" / "training_args.json").read_text())
    assert recorded["init_from"] == str(trained_run)
    assert recorded["init_from_dir"] == str((trained_run / "model").resolve())
    assert read_starts(tmp_path / "tuned")[0]["step"] == 0
    # A local source's path stays off the public card.
    assert run_cli("push", tmp_path / "tuned", "--repo-id", "me/tuned", "--dry-run", tmp_path / "upload",
                   "--decoder", "a toy patch codebook") == 0
    assert str(trained_run) not in (tmp_path / "upload" / "README.md").read_text()


def test_init_from_trains_on_with_a_new_optimizer(trained_run, tmp_path, fresh_accelerate_state):
    """The same 2 steps from the same weights, once fine-tuned and once from a hand-loaded model: equal."""
    train(args_for(tmp_path / "tuned", init_from=str(trained_run)), None, data_of(trained_run))
    fresh_accelerate_state()
    by_hand = load_model(trained_run, device="cpu")
    train(args_for(tmp_path / "by_hand"), by_hand.train(), data_of(trained_run))
    tuned = load_file(tmp_path / "tuned" / "model" / "model.safetensors")
    assert_same_weights(tuned, load_file(tmp_path / "by_hand" / "model" / "model.safetensors"))
    assert not all(torch.equal(tuned[k], v) for k, v in load_model(trained_run, device="cpu").state_dict().items()
                   if k in tuned)


def test_init_from_refuses_data_the_model_does_not_fit_and_another_shape(trained_run, tmp_path, learnable_dataset):
    other = learnable_dataset(tmp_path / "data", n=32, codebook_size=8)
    with pytest.raises(ValueError, match=r"init_from .*: the model config does not match .*codebook_size 16 != 8"):
        train(args_for(tmp_path / "tuned", init_from=str(trained_run)), None, other)
    assert not (tmp_path / "tuned" / "training_args.json").exists()
    data = data_of(trained_run)
    saved = load_model(trained_run, device="cpu").config
    wider = type(saved).from_dict({**saved.to_dict(), "embed_dim": 64})
    with pytest.raises(ValueError, match="differs from the source's in embed_dim: 32 -> 64; only dropout may change"):
        train(args_for(tmp_path / "tuned", init_from=str(trained_run)), wider, data)
    # Dropout may change: the weights shape nothing differently.
    config = type(saved).from_dict({**saved.to_dict(), "embd_dropout": 0.3})
    result = train(args_for(tmp_path / "tuned", init_from=str(trained_run), overwrite_output_dir=True), config, data)
    assert json.loads((result.model_dir / "config.json").read_text())["embd_dropout"] == 0.3


def test_a_resume_wins_over_init_from_and_keeps_its_source_on_record(trained_run, tmp_path, fresh_accelerate_state):
    data = data_of(trained_run)
    out = tmp_path / "tuned"
    train(args_for(out, init_from=str(trained_run), save_every=1), None, data)
    fresh_accelerate_state()
    with pytest.raises(ValueError, match="init_from: .* -> 'elsewhere'"):
        train(args_for(out, init_from="elsewhere", resume=True, max_steps=3), None, data)
    fresh_accelerate_state()
    result = train(args_for(out, resume=True, max_steps=3), None, data)  # no init_from: the checkpoint's weights
    assert result.resumed_from is not None and result.step == 3
    assert read_training_args(out)["init_from"] == str(trained_run)
    assert read_training_args(out)["init_from_dir"] == str((trained_run / "model").resolve())


def test_init_from_a_hub_id_records_the_commit(hub_repo, trained_run, tmp_path):
    result = train(args_for(tmp_path / "tuned", learning_rate=1e-12, init_from=hub_repo.repo_id,
                            init_revision=hub_repo.old), None, data_of(trained_run))
    step2 = load_model(trained_run / "checkpoints" / "step-000002", device="cpu").state_dict()
    tuned = load_file(result.model_dir / "model.safetensors")
    assert_same_weights(tuned, {k: v for k, v in step2.items() if k in tuned}, atol=1e-6)
    recorded = read_training_args(tmp_path / "tuned")
    assert (recorded["init_from"], recorded["init_revision"]) == (hub_repo.repo_id, hub_repo.old)
    assert recorded["init_from_commit"] == hub_repo.old
    # The card says what the run was fine-tuned from: the Hub id and commit, never a local path.
    assert run_cli("push", tmp_path / "tuned", "--repo-id", "me/tuned", "--dry-run", tmp_path / "upload",
                   "--decoder", "a toy patch codebook") == 0
    card = (tmp_path / "upload" / "README.md").read_text()
    assert hub_repo.repo_id in card and hub_repo.old in card


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_cli_train_init_from(hub_repo, trained_run, tmp_path, capsys):
    data = trained_run.parent / "data"
    assert run_cli("train", "--data", data, "--out", tmp_path / "tuned", "--init-from", hub_repo.repo_id,
                   "--revision", hub_repo.old, "--steps", 2, "--batch-size", 8, "--no-progress",
                   "--samples-per-class", 1, "--dropout", 0.2) == 0
    recorded = read_training_args(tmp_path / "tuned")
    assert recorded["init_from_commit"] == hub_repo.old
    assert json.loads((tmp_path / "tuned" / "model" / "config.json").read_text())["embd_dropout"] == 0.2
    capsys.readouterr()
    # The shape is the source's: a shape flag is refused, naming it.
    assert run_cli("train", "--data", data, "--out", tmp_path / "other", "--init-from", trained_run,
                   "--embed-dim", 64) == 2
    assert "--init-from" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert run_cli("train", "--data", data, "--out", tmp_path / "other", "--init-from", tmp_path / "nowhere") == 2
    assert "--init-from: no such directory" in capsys.readouterr().err


def test_cli_sample_by_hub_id_draws_what_the_run_draws(hub_repo, trained_run, tmp_path, capsys):
    assert run_cli("sample", trained_run / "checkpoints" / "step-000002", "--per-class", 2, "--out",
                   tmp_path / "local.png", "--codes-out", tmp_path / "local.safetensors") == 0
    assert run_cli("sample", hub_repo.repo_id, "--revision", hub_repo.old, "--per-class", 2, "--out",
                   tmp_path / "hub.png", "--codes-out", tmp_path / "hub.safetensors") == 0
    assert f"at commit {hub_repo.old}" in capsys.readouterr().out
    local, hub = (load_file(tmp_path / f"{name}.safetensors")["codes"] for name in ("local", "hub"))
    assert torch.equal(local, hub)
    assert run_cli("sample", hub_repo.repo_id, "--per-class", 2, "--out", tmp_path / "main.png") == 0  # main
    assert f"at commit {hub_repo.new}" in capsys.readouterr().out
    assert run_cli("sample", trained_run, "--revision", "main") == 2
    assert "is for a Hub model id" in capsys.readouterr().err


def test_cli_eval_by_hub_id_measures_what_the_run_measures(hub_repo, trained_run, tmp_path, capsys):
    data = trained_run.parent / "data"
    common = ["--data", data, "--samples-per-class", 2, "--val-fraction", 0.25]
    assert run_cli("eval", trained_run, *common, "--out", tmp_path / "local.json") == 0
    assert run_cli("eval", hub_repo.repo_id, *common, "--out", tmp_path / "hub.json") == 0
    local, hub = (json.loads((tmp_path / f"{n}.json").read_text())["eval"] for n in ("local", "hub"))
    assert hub["bits_per_code"] == local["bits_per_code"]


def test_cli_push_dry_run_of_a_hub_id_ships_the_same_model_and_codebook(hub_repo, tmp_path, capsys):
    assert run_cli("push", hub_repo.repo_id, "--revision", hub_repo.old, "--repo-id", "toy-org/copy",
                   "--dry-run", tmp_path / "upload") == 0
    original = hub_repo.snapshots / hub_repo.old
    files = sorted(p.relative_to(original).as_posix() for p in original.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "upload").as_posix() for p in (tmp_path / "upload").rglob("*")
                  if p.is_file()) == files
    for name in ("model.safetensors", "codebook/model.safetensors"):
        assert_same_weights(load_file(tmp_path / "upload" / name), load_file(original / name))
    shutil.rmtree(tmp_path / "upload")


def test_cli_push_of_a_hub_id_ships_its_autoencoder_again(hub_repo, tmp_path):
    """A re-push keeps the autoencoder the repo ships in autoencoder/ (the upload replaces every codebook and
    autoencoder file), recorded as the new repo's."""
    snapshot = hub_repo.snapshots / hub_repo.new
    (snapshot / "autoencoder").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (snapshot / "autoencoder" / name).write_bytes(b"{}" if name.endswith(".json") else b"weights")
    config = json.loads((snapshot / "codebook" / "config.json").read_text())
    spec = {"kind": "diffusers", "class": "AutoencoderKL", "source": hub_repo.repo_id, "subfolder": "autoencoder",
            "revision": None, "image_size": [4, 8], "channels": 1, "downsample": 2, "latent_dim": 4}
    (snapshot / "codebook" / "config.json").write_text(json.dumps({**config, "autoencoder": spec}))
    assert run_cli("push", hub_repo.repo_id, "--repo-id", "toy-org/copy", "--dry-run", tmp_path / "upload") == 0
    shipped = json.loads((tmp_path / "upload" / "codebook" / "config.json").read_text())["autoencoder"]
    assert (shipped["source"], shipped["subfolder"]) == ("toy-org/copy", "autoencoder")
    assert (tmp_path / "upload" / "autoencoder" / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
