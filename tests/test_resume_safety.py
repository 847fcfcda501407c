"""Runs and checkpoints: a resume is exact or refused, a run is never lost (issue 14, runs part).

Each test damages a run the way a careless or unlucky user would (a truncated or foreign file, a
changed flag, a second run into the same folder, a kill between two renames, a full disk) and checks
the promise: a clear error naming the file or field, or an exact resume, and nothing lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from safetensors.torch import load_file, save_file

from codegpt import GPT
from codegpt._util import file_record
from codegpt.cli import main
from codegpt.runs import complete_checkpoints, load_model, newest_checkpoint, resolve_run
from codegpt.training import TrainingArguments, train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

DROPOUT = dict(embd_dropout=0.1, resid_dropout=0.1, class_dropout_prob=0.2)


def tiny_args(out: Path, **overrides) -> TrainingArguments:
    # warmup_steps=8: every step of these short runs is in the warmup, whose learning rate does not depend on
    # max_steps, so a run resumed with more steps can be compared with one that was given them from the start.
    kw = dict(output_dir=out, max_steps=4, per_device_batch_size=8, learning_rate=3e-3, warmup_steps=8, save_every=2,
              progress=False, samples_per_class=1, eval_batch_size=16)
    kw.update(overrides)
    return TrainingArguments(**kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "the weights differ"


def reseal(checkpoint: Path) -> None:
    """Rewrite a checkpoint's manifest after editing it: what a writer with a bug would leave (the manifest
    matches, the content is wrong)."""
    files = {p.relative_to(checkpoint).as_posix(): file_record(p)
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps(
        {"format": "codegpt-manifest", "format_version": 1, "files": files}))


def learnable_codes(path: Path, n: int = 48, seed: int = 0):
    """A code dataset with structure (each class draws from its own four codes), 2x4 grid, 16 codes, 3 classes."""
    from codegpt.data import CodeDataset, write_code_dataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    codes = (4 * labels[:, None, None] + torch.randint(0, 4, (n, 2, 4), generator=g)) % 16
    write_code_dataset(path, codes, labels, codebook_size=16, num_classes=3)
    return CodeDataset(path)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A run to 4 steps (checkpoints at 2 and 4, model/) and an uninterrupted reference run to 6 steps. Shared:
    copy it before changing anything."""
    from codegpt import GPTConfig

    root = tmp_path_factory.mktemp("resume_safety")
    dataset = learnable_codes(root / "data")
    config = GPTConfig(vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, embed_dim=16, num_layers=1,
                       num_heads=2, class_conditional=True, num_classes=dataset.num_classes, **DROPOUT)
    for name, steps in (("run", 4), ("reference", 6)):
        reset_accelerate()
        train(tiny_args(root / name, max_steps=steps), config, dataset)
    reset_accelerate()
    return root


def run_config(run: Path):
    """The model config the run was trained with (as a user who repeats the model's flags would pass it)."""
    folders = [run / "model", *sorted((run / "checkpoints").glob("step-??????/model"))]
    return GPT.from_pretrained(next(f for f in folders if (f / "config.json").is_file())).config


def read_records(run: Path) -> dict[str, bytes | None]:
    return {name: (run / name).read_bytes() if (run / name).exists() else None
            for name in ("training_args.json", "starts.jsonl", "log.jsonl")}


def copy_run(runs_dir: Path, tmp_path: Path) -> tuple[Path, object]:
    from codegpt.data import CodeDataset

    return shutil.copytree(runs_dir / "run", tmp_path / "run"), CodeDataset(runs_dir / "data")


# ---------------------------------------------------------------------------------------------
# 1-2. A checkpoint that cannot be restored exactly is skipped for the previous complete one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["rng missing", "rng truncated", "rng foreign", "optimizer missing",
                                    "scheduler missing", "model missing", "one byte flipped"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one_and_the_resume_stays_exact(
        damage, runs_dir, tmp_path, capsys):
    run, dataset = copy_run(runs_dir, tmp_path)
    newest, previous = run / "checkpoints" / "step-000004", run / "checkpoints" / "step-000002"
    rng = newest / "random_states_0.pkl"
    if damage == "rng missing":
        rng.unlink()
    elif damage == "rng truncated":
        rng.write_bytes(rng.read_bytes()[:100])
    elif damage == "rng foreign":  # a valid random state, of another step
        shutil.copyfile(previous / "random_states_0.pkl", rng)
    elif damage == "one byte flipped":  # same size: only the hash sees it
        data = bytearray((newest / "optimizer.bin").read_bytes())
        data[len(data) // 2] ^= 1
        (newest / "optimizer.bin").write_bytes(bytes(data))
    else:
        (newest / {"optimizer missing": "optimizer.bin", "scheduler missing": "scheduler.bin",
                   "model missing": "model.safetensors"}[damage]).unlink()

    result = train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert result.resumed_from == previous
    out = capsys.readouterr().out
    assert "warning: skipping a checkpoint" in out and "step-000004" in out
    # From step 2 to 6, exactly as the run that was never interrupted.
    assert_same_weights(weights(run / "model"), weights(runs_dir / "reference" / "model"))


def test_a_resume_with_no_restorable_checkpoint_is_refused_naming_each(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    (run / "checkpoints" / "step-000004" / "random_states_0.pkl").unlink()
    (run / "checkpoints" / "step-000002" / "manifest.json").unlink()  # e.g. written by an older codegpt
    before = weights(run / "model")
    with pytest.raises(ValueError, match=r"no checkpoint .* can be restored exactly") as err:
        train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert "step-000004/random_states_0.pkl' is missing" in str(err.value)
    assert "step-000002' has no manifest.json" in str(err.value)
    assert_same_weights(weights(run / "model"), before)


def test_a_random_state_that_accelerate_cannot_load_is_an_error_not_a_log_line(runs_dir, tmp_path):
    """Accelerate's load_state only logs a random state it fails to load; past the manifest (a writer's bug,
    resealed), the resume still compares the live generators with the file."""
    run, dataset = copy_run(runs_dir, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    newest = run / "checkpoints" / "step-000004"
    (newest / "random_states_0.pkl").write_bytes(b"not a pickle")
    reseal(newest)
    before = weights(run / "model")
    with pytest.raises(ValueError, match=r"step-000004: the random state random_states_0.pkl cannot be restored"):
        train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert_same_weights(weights(run / "model"), before)


# ---------------------------------------------------------------------------------------------
# 3. trainer_state.json is validated, errors name the file and the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("epoch", -1, r"field 'epoch' must be >= 0, got -1"),
    ("position", 10_000, r"field 'position' must be in \[0, 48\], got 10000"),
    ("step", 0, r"field 'step' must be >= 1, got 0"),
    ("step", "4", r"field 'step' must be an int"),
    ("eval_history", {"step": 4}, r"field 'eval_history' must be a list"),
    ("num_processes", None, r"field 'num_processes' must be an int"),
])
def test_trainer_state_is_validated_naming_file_and_field(field, value, message, runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    newest = run / "checkpoints" / "step-000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    state[field] = value
    (newest / "trainer_state.json").write_text(json.dumps(state))
    reseal(newest)
    with pytest.raises(ValueError, match=message) as err:
        train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert "step-000004/trainer_state.json" in str(err.value)


# ---------------------------------------------------------------------------------------------
# 4. What may change on resume, what may not; the history of every start
# ---------------------------------------------------------------------------------------------


def test_a_resume_that_would_change_the_run_is_refused_listing_every_difference(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    records = read_records(run)
    other = learnable_codes(tmp_path / "other", seed=1)  # same shape, other codes
    model = GPT.from_pretrained(run / "checkpoints" / "step-000004" / "model").config
    model.num_heads = 4
    args = tiny_args(run, max_steps=6, resume=True, seed=1, learning_rate=1e-3, per_device_batch_size=4,
                     adam_betas=(0.9, 0.99), save_every=3, eval_every=1)
    with pytest.raises(ValueError, match="cannot go on with other settings") as err:
        train(args, model, other)
    message = str(err.value)
    for difference in ("seed: 0 -> 1", "learning_rate: 0.003 -> 0.001", "per_device_batch_size: 8 -> 4",
                       "adam_betas: [0.9, 0.95] -> [0.9, 0.99]", "model num_heads: 2 -> 4", "data shards_sha256: "):
        assert difference in message, difference
    assert "save_every" not in message.split(". A resume may")[0]  # cadence may change
    assert read_records(run) == records  # nothing rewritten


def test_a_resume_keeps_the_first_arguments_and_records_every_start(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    first = (run / "training_args.json").read_bytes()
    train(tiny_args(run, max_steps=6, resume=True, eval_every=3, num_workers=0), run_config(run), dataset)
    assert (run / "training_args.json").read_bytes() == first  # the original arguments, never overwritten
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 4] and starts[1]["resumed_from"] == "step-000004"
    # The folder was copied elsewhere: a moved run may go on, and the move is on record.
    assert starts[1]["changed"] == {"max_steps": [4, 6], "eval_every": [0, 3],
                                    "output_dir": [str(runs_dir / "run"), str(run)]}
    assert all(s["time"] and s["data"]["num_items"] == 48 for s in starts)
    # What reads the run (the model card) sees the arguments in force.
    assert resolve_run(run).training_args["max_steps"] == 6


# ---------------------------------------------------------------------------------------------
# 5. The model comes from the checkpoint; steps at or below it are an error
# ---------------------------------------------------------------------------------------------


def test_a_resume_without_a_model_takes_the_checkpoints(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    result = train(tiny_args(run, max_steps=6, resume=True), None, dataset)
    assert result.resumed_from == run / "checkpoints" / "step-000004"
    assert_same_weights(weights(run / "model"), weights(runs_dir / "reference" / "model"))


def test_cli_resume_rebuilds_the_model_from_the_checkpoint_and_refuses_other_model_flags(small_data, tmp_path,
                                                                                       capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(small_data), "--out", str(out), "--batch-size", "8", "--save-every", "2",
            "--no-progress", "--samples-per-class", "1", "--warmup-steps", "8"]
    assert main([*base, "--steps", "2", "--embed-dim", "16", "--layers", "1", "--heads", "2"]) == 0
    capsys.readouterr()
    reset_accelerate()
    assert main([*base, "--steps", "4", "--resume", "--embed-dim", "32", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("codegpt train: error: ") and "Traceback" not in err
    assert "model embed_dim: 16 -> 32" in err and "learning_rate: 0.001 -> 0.01" in err
    reset_accelerate()
    assert main([*base, "--steps", "2", "--resume"]) == 2  # nothing to do is an error, not a silent no-op
    err = capsys.readouterr().err
    assert "max_steps 2 (--steps)" in err and "already at step 2" in err
    reset_accelerate()
    assert main([*base, "--steps", "4", "--resume"]) == 0  # no model flags: the checkpoint's model
    assert "resumed from" in capsys.readouterr().out
    assert GPT.from_pretrained(out / "model").config.embed_dim == 16


# ---------------------------------------------------------------------------------------------
# 6. Weights that do not match the config are an error wherever a model is loaded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["renamed", "missing", "misshapen"])
def test_a_model_folder_whose_weights_do_not_match_is_refused(damage, runs_dir, tmp_path, capsys):
    folder = shutil.copytree(runs_dir / "run" / "model", tmp_path / "model")
    tensors = weights(folder)
    if damage == "renamed":
        tensors["wte.renamed"] = tensors.pop("wte.weight")
    elif damage == "missing":
        del tensors["ln_f.weight"]
    else:
        tensors["wpe.weight"] = tensors["wpe.weight"][:4].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    key = {"renamed": "wte.weight", "missing": "ln_f.weight", "misshapen": "wpe.weight"}[damage]
    with pytest.raises(ValueError, match="do not match its config.json") as err:
        load_model(folder, device="cpu")
    assert str(folder) in str(err.value) and key in str(err.value)
    assert main(["sample", str(folder), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and not (tmp_path / "s.png").exists()


def test_verify_run_checks_every_checkpoint_and_the_model(runs_dir, tmp_path):
    from codegpt.runs import verify_run

    run, _ = copy_run(runs_dir, tmp_path)
    checked = verify_run(run)
    assert checked == [run / "checkpoints" / "step-000002", run / "checkpoints" / "step-000004", run / "model"]
    scheduler = run / "checkpoints" / "step-000002" / "scheduler.bin"
    data = bytearray(scheduler.read_bytes())
    data[-1] ^= 1
    scheduler.write_bytes(bytes(data))
    verify_run(run, hashes=False)  # the size still matches
    with pytest.raises(ValueError, match=r"1 problem: .*scheduler.bin' does not match its SHA-256"):
        verify_run(run)
    (run / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 problems: .*model/model.safetensors' holds 0 bytes"):
        verify_run(run)


# ---------------------------------------------------------------------------------------------
# 7. Lost work: finished runs, two runs at once, kills between renames and during pruning
# ---------------------------------------------------------------------------------------------


def test_a_finished_run_is_never_overwritten_without_asking(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    shutil.rmtree(run / "checkpoints")  # a finished run saved without checkpoints (save_every=0)
    before = weights(run / "model")
    config = GPT.from_pretrained(run / "model").config
    with pytest.raises(ValueError, match=r"already holds a finished run \(model/\)"):
        train(tiny_args(run, save_every=0), config, dataset)
    with pytest.raises(ValueError, match="holds a finished model but no checkpoint to continue from"):
        train(tiny_args(run, save_every=0, max_steps=6, resume=True), config, dataset)
    assert_same_weights(weights(run / "model"), before)
    (run / "notes.txt").write_text("the user's own file")
    train(tiny_args(run, save_every=0, seed=3, overwrite_output_dir=True), config, dataset)
    assert (run / "notes.txt").read_text() == "the user's own file"  # only the run's own files go
    assert json.loads((run / "training_args.json").read_text())["seed"] == 3


SCRIPT = textwrap.dedent(
    """
    import os, shutil, signal, sys, time, torch
    torch.set_num_threads(1)
    from codegpt import GPTConfig
    from codegpt.data import CodeDataset
    from codegpt.training import TrainingArguments, train

    data, out, mode, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Slow(torch.utils.data.Dataset):
        def __init__(self, base): self.base = base
        def __len__(self): return len(self.base)
        def __getitem__(self, i):
            time.sleep(0.02 if mode == "slow" else 0)
            return self.base[i]

    if mode == "kill-between-renames":  # SIGKILL right after replace_dir moved the old model/ aside
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if ".old-" in os.path.basename(str(dst)) and os.path.basename(str(src)) == "model":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    if mode == "kill-while-pruning":  # SIGKILL half way through deleting an old checkpoint
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            name = os.path.basename(str(path))
            if os.path.basename(os.path.dirname(str(path))) == "checkpoints" and not name.endswith(".tmp"):
                os.remove(os.path.join(str(path), "optimizer.bin"))
                os.kill(os.getpid(), signal.SIGKILL)
            real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree

    ds = CodeDataset(data)
    config = GPTConfig(vocab_size=ds.vocab_size, seq_len=ds.seq_len, embed_dim=16, num_layers=1, num_heads=2,
                       class_conditional=True, num_classes=ds.num_classes, embd_dropout=0.1, resid_dropout=0.1,
                       class_dropout_prob=0.2)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_batch_size=8, learning_rate=3e-3,
                             warmup_steps=8, save_every=2, save_total_limit=2, progress=False, samples_per_class=1,
                             resume=mode != "slow")
    train(args, config, Slow(ds))
    """
)


def _start(tmp_path: Path, *argv: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(script), *argv], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_runs_cannot_train_into_one_folder_and_a_dead_runs_lock_is_taken_over(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    first = _start(tmp_path, str(runs_dir / "data"), str(tmp_path / "busy"), "slow", "400")
    deadline = time.monotonic() + 60
    while not (tmp_path / "busy" / "starts.jsonl").exists() and not (tmp_path / "busy" / "log.jsonl").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.05)
    config = GPT.from_pretrained(run / "model").config
    with pytest.raises(FileExistsError, match=rf"another run is training into it \(pid {first.pid} on "):
        train(tiny_args(tmp_path / "busy", max_steps=500, resume=True), config, dataset)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / "busy" / "train.lock").is_file()  # a kill never runs `finally`
    result = train(tiny_args(tmp_path / "busy", max_steps=2, resume=True), config, dataset)  # a stale lock
    assert result.step == 2 and not (tmp_path / "busy" / "train.lock").exists()  # released at the end


def test_sigkill_between_the_two_renames_of_the_final_model_is_repaired_on_the_next_start(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    killed = _start(tmp_path, str(runs_dir / "data"), str(run), "kill-between-renames", "6")
    output, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, output
    assert not (run / "model").exists() and list(run.glob("model.old-*")) and (run / "model.tmp").is_dir()
    # The next start finishes the move (the new model was complete), then finds nothing left to do.
    with pytest.raises(ValueError, match="already at step 6"):
        train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("model")) == ["model"]
    assert_same_weights(weights(run / "model"), weights(run / "checkpoints" / "step-000006" / "model"))
    assert_same_weights(weights(run / "model"), weights(runs_dir / "reference" / "model"))


def test_sigkill_while_pruning_leaves_no_half_deleted_checkpoint(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    killed = _start(tmp_path, str(runs_dir / "data"), str(run), "kill-while-pruning", "8")
    output, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, output
    # The half-deleted step 2 is not taken for a checkpoint, before the next start cleans it up.
    assert [step for step, _ in complete_checkpoints(run)] == [4, 6]
    train(tiny_args(run, max_steps=8, resume=True), run_config(run), dataset)
    # Only complete checkpoints remain, each as its manifest says.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    from codegpt.runs import verify_run

    verify_run(run)


def test_leftovers_of_a_kill_between_renames_of_a_checkpoint_are_repaired(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    ckpts = run / "checkpoints"
    # Killed after the old step-4 was moved aside and before the new one was moved in: the new one is complete.
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000004.tmp")
    os.replace(ckpts / "step-000004", ckpts / "step-000004.old-12345")
    # Killed in the same place while re-saving step 2, but with the new folder cut short: the old one returns.
    shutil.copytree(ckpts / "step-000002", ckpts / "step-000002.tmp")
    (ckpts / "step-000002.tmp" / "manifest.json").unlink()
    os.replace(ckpts / "step-000002", ckpts / "step-000002.old-12345")
    assert newest_checkpoint(run) is None
    result = train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    assert result.resumed_from == ckpts / "step-000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000006"]
    assert_same_weights(weights(run / "model"), weights(runs_dir / "reference" / "model"))


# ---------------------------------------------------------------------------------------------
# 8. Disk full and read-only folders
# ---------------------------------------------------------------------------------------------


def _fill_disk_at_step(monkeypatch, step: int) -> None:
    import codegpt.training

    real = codegpt.training.write_json

    def write_json(path, obj):
        if Path(path).name == "trainer_state.json" and obj["step"] >= step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, obj)

    monkeypatch.setattr(codegpt.training, "write_json", write_json)


def test_a_full_disk_is_one_clear_error_and_the_older_checkpoints_stay(runs_dir, tmp_path, monkeypatch):
    run, dataset = copy_run(runs_dir, tmp_path)
    shutil.rmtree(run / "model")
    _fill_disk_at_step(monkeypatch, 6)
    with pytest.raises(OSError, match=r"could not write checkpoint step-000006 in .*checkpoints.*No space left"):
        train(tiny_args(run, max_steps=8, resume=True), run_config(run), dataset)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    from codegpt.runs import verify_run

    verify_run(run)  # intact, hashes included
    assert not (run / "train.lock").exists()


def test_cli_disk_full_and_lost_work_errors_are_one_line_with_status_2(small_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(small_data), "--out", str(out), "--batch-size", "8", "--embed-dim", "16",
            "--layers", "1", "--heads", "2", "--no-progress", "--samples-per-class", "1"]
    _fill_disk_at_step(monkeypatch, 4)
    assert main([*base, "--steps", "5", "--save-every", "2"]) == 2
    monkeypatch.undo()
    errors = [capsys.readouterr().err]
    reset_accelerate()
    assert main([*base, "--steps", "2", "--save-every", "0"]) == 2  # the folder holds the first run's checkpoint
    errors.append(capsys.readouterr().err)
    (tmp_path / "file").write_text("")
    reset_accelerate()
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "file")]) == 2
    errors.append(capsys.readouterr().err)
    for err in errors:  # (transformers' progress bars may come first)
        assert err.endswith("\n") and err.splitlines()[-1].startswith("codegpt train: error: "), err
        assert err.count("error") == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "older checkpoints are intact" in errors[0]
    assert "--resume" in errors[1] and "--overwrite-output-dir" in errors[1]
    assert "is a file" in errors[2]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_clear_error(runs_dir, tmp_path):
    run, dataset = copy_run(runs_dir, tmp_path)
    os.chmod(run, 0o555)
    try:
        with pytest.raises(OSError, match=rf"could not write the output folder {run}.*Permission denied"):
            train(tiny_args(run, max_steps=6, resume=True), run_config(run), dataset)
    finally:
        os.chmod(run, 0o755)
    from codegpt.runs import verify_run

    verify_run(run)


@pytest.fixture
def small_data(tmp_path) -> Path:
    learnable_codes(tmp_path / "data", n=32)
    return tmp_path / "data"
