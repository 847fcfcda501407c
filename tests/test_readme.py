"""README.md as a test: every python block and every command line in it runs, so the README cannot drift
from the code.

Sizes shrink and the things that live on the Hub (an SD-VAE, a pushed repo) become tiny local ones through
exact text replacements, each of which must still match the README (an edited example fails here until
its replacement is updated). A new block in a section this file does not know fails too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reset_accelerate

from codegpt.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

TINY_PRIOR = "--steps 4 --save-every 2 --batch-size 8 --embed-dim 16 --layers 1 --heads 2 --no-progress"
TINY_DEMO = ("--out demo --steps 20 --batch-size 32 --embed-dim 32 --layers 1 --heads 2 --samples-per-class 4 "
             "--grid-columns 3 --feature-steps 20 --no-progress")

# (old, new): applied to every block, in order; every one must match somewhere in the README.
SWAPS = [
    # python: the prior, the sampler and the codebook at toy sizes
    ("seq_len=1024, embed_dim=256, num_layers=8", "seq_len=16, embed_dim=32, num_layers=2"),
    ("codegpt.to_grid(tokens, (32, 32))", "codegpt.to_grid(tokens, (4, 4))"),
    ("H, W = 32, 32", "H, W = 4, 4"),
    ("[:, : 8 * W]", "[:, : 2 * W]"),
    ("num_codes=1024, seed=0", "num_codes=32, seed=0"),
    ("codebook_size=1024", "codebook_size=32"),
    # an SD-VAE and a pushed repo: local stand-ins
    ('"stabilityai/sd-vae-ft-mse", image_size=256', '"vae", image_size=8'),
    ('"photos"), ae, "enc", num_codes=1024', '"photos"), ae, "enc_py", num_codes=8'),
    ('"ORG/NAME", revision="<commit sha>", ', '"upload", '),
    # command lines
    ("accelerate launch -m codegpt ", "codegpt "),
    ("--steps 5000 --save-every 500", TINY_PRIOR),
    ("--steps 20000 --save-every 1000", TINY_PRIOR),
    ("codegpt train --data work/data --out run --resume", f"codegpt train --data work/data --out run --resume "
                                                          f"{TINY_PRIOR.replace('--steps 4', '--steps 6')}"),
    ("--autoencoder stabilityai/sd-vae-ft-mse --image-size 256 --num-codes 1024",
     "--autoencoder vae --image-size 8 --num-codes 8 --batch-size 8 --no-progress"),
    ("codegpt eval run --data work/data", "codegpt eval run --data work/data --samples-per-class 3"),
    ("codegpt eval run --fid", "codegpt eval run --fid --fid-steps 5 --samples-per-class 3"),
    ("--per-class 8", "--per-class 2"),
]
DEMO_LINES = {  # whole command lines whose job needs its tiny settings appended
    "codegpt demo": f"codegpt demo --ae-steps 30 --ae-width 8 {TINY_DEMO}",
    "codegpt demo --autoencoder patches": f"codegpt demo --autoencoder patches {TINY_DEMO}",
}


def readme_blocks() -> list[tuple[str, str, str]]:
    """Every fenced block as ``(section heading, language, code)``, in order."""
    blocks, section, fence, lang, lines = [], "", False, "", []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not fence and line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            if fence:
                blocks.append((section, lang, "\n".join(lines)))
            fence, lang, lines = not fence, line[3:].strip(), []
        elif fence:
            lines.append(line)
    return blocks


BLOCKS = readme_blocks()


def tiny(code: str) -> str:
    for old, new in SWAPS:
        code = code.replace(old, new)
    return code


def block(section: str, lang: str, index: int = 0) -> str:
    found = [code for s, lg, code in BLOCKS if s == section and lg == lang]
    assert len(found) > index, f"README has no {lang} block number {index + 1} under '## {section}'"
    return tiny(found[index])


def run_commands(code: str) -> int:
    """Run every command line of a bash block in-process (comments dropped); returns how many ran."""
    count = 0
    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        line = DEMO_LINES.get(line, line)
        argv = shlex.split(line)
        assert argv[0] == "codegpt", f"README command not run by this test: {line}"
        reset_accelerate()
        assert main(argv[1:]) == 0, line
        count += 1
    return count


# Sections whose blocks the tests below run, by language; "" (diagrams, layouts) is never run.
KNOWN = {
    ("Quickstart", "bash"): 2,
    ("The model", "python"): 1,
    ("Sampling", "python"): 3,
    ("Codebooks and code datasets", "python"): 1,
    ("Training and the command line", "bash"): 1,
    ("Your images, your autoencoder", "bash"): 1,
    ("Your images, your autoencoder", "python"): 1,
    ("Sharing on the Hub", "python"): 1,
}


def test_every_runnable_block_is_one_this_file_runs():
    counts: dict[tuple[str, str], int] = {}
    for section, lang, _ in BLOCKS:
        if lang:
            counts[(section, lang)] = counts.get((section, lang), 0) + 1
    assert counts == KNOWN


def test_the_quickstart_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    install_and_test = block("Quickstart", "bash", 1).strip()
    assert install_and_test in ci.splitlines()
    assert re.search(r"pip install torch==[\d.]+ ", block("Quickstart", "bash", 0))  # torch first, pinned


def test_python_examples_model_sampling_codebooks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 999, (2, 17), generator=g)
    input_ids[:, 0] = 999  # the start token
    ns = {"input_ids": input_ids, "labels": input_ids, "classes": torch.tensor([1, 2])}
    exec(block("The model", "python"), ns)
    assert torch.isfinite(ns["loss"])
    exec(block("Sampling", "python", 0), ns)
    assert ns["codes"].shape == (10, 4, 4)
    exec(block("Sampling", "python", 1), ns)
    assert ns["images"].shape == (10, 4, 4) and torch.equal(ns["images"][:, :2], ns["codes"][:, :2])
    exec(block("Sampling", "python", 2), ns)
    assert ns["tokens"].shape == (4, 17) and len({tuple(t.tolist()) for t in ns["tokens"]}) == 4  # four samples
    assert ns["same_settings"].shape == (4, 17) and ns["greedy"].shape == (1, 17)
    ns.update(latents=torch.randn(40, 4, 4, 4, generator=g), labels=torch.randint(0, 10, (40,), generator=g),
              names=[f"class {i}" for i in range(10)])
    exec(block("Codebooks and code datasets", "python"), ns)
    assert len(ns["train_set"]) + len(ns["val_set"]) == 40 and (tmp_path / "codebook" / "config.json").is_file()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_command_line_examples_then_loading_the_pushed_folder(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("torchmetrics")
    monkeypatch.chdir(tmp_path)
    assert run_commands(block("Training and the command line", "bash")) == 8
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "upload" / "config.json").is_file()
    ns: dict = {}
    exec(block("Sharing on the Hub", "python"), ns)
    assert ns["tokens"].shape == (1, ns["model"].config.seq_len + 1)


def _photos(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / "photos" / "abc"[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.integers(0, 80, (8, 8)) + 80 * (i % 3)).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_your_images_examples(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torchmetrics")
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=8,
                            mid_block_add_attention=False).save_pretrained(tmp_path / "vae")
    assert run_commands(block("Your images, your autoencoder", "bash")) == 4
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "metrics.json").is_file()
    ns = {"codes": torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))}
    exec(block("Your images, your autoencoder", "python"), ns)
    assert ns["images"].shape == (2, 1, 8, 8) and 0 <= ns["images"].min() <= ns["images"].max() <= 1


def test_every_replacement_still_matches_the_readme():
    text = README.read_text(encoding="utf-8")
    assert [old for old, _ in SWAPS if old not in text] == []
    assert [line for line in DEMO_LINES if line not in text] == []
