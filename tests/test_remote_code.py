"""A pushed prior loads anywhere: local folder, offline cache by repo id, and remote code in a fresh
process where codegpt cannot be imported.

In-process loads always get codegpt's own class (a registered local class wins over remote code), so
the remote-code checks run in a child interpreter whose first line makes ``import codegpt`` fail.

Also a script, for the cross-version check in ``.ci/compat.sh``: ``python tests/test_remote_code.py
write DIR`` saves an upload folder with the installed transformers, ``... check DIR`` loads it as
remote code in a fresh process and compares its greedy codes with those recorded at write time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from transformers import AutoModel, AutoModelForCausalLM

from codegpt import GPT
from codegpt.codebook import Codebook
from codegpt.hub import CardInfo, SamplingSettings, load_codebook, prepare_upload_folder

REPO_ID = "toy-org/toy-prior"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLASSES = [0, 2, 1]
GUIDANCE = 2.0
REPO = Path(__file__).resolve().parents[1]


def tiny_model(tie: bool = False) -> GPT:
    return make_model(tie_word_embeddings=tie)


def tiny_codebook() -> Codebook:
    g = torch.Generator().manual_seed(0)
    return Codebook.fit(torch.randn(400, 4, generator=g), 16, seed=0, progress=False)


def write_upload_folder(root: Path, tie: bool = False) -> tuple[GPT, Path]:
    """A tiny trained-looking prior and its dry-run folder (codebook included) under ``root``."""
    model = tiny_model(tie)
    model.save_pretrained(root / "checkpoint")
    tiny_codebook().save_pretrained(root / "codebook")
    folder = prepare_upload_folder(
        root / "checkpoint",
        root / "upload",
        repo_id=REPO_ID,
        info=CardInfo(dataset_id="toy", class_names=["a", "b", "c"]),
        sampling=SamplingSettings(temperature=0.9, top_k=8, guidance_scale=GUIDANCE),
        metrics={"eval_bits_per_code": 3.5},
        codebook_dir=root / "codebook",
    )
    return model, folder


def install_in_cache(folder: Path, hf_home: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """Lay ``folder`` out as hf_hub_download would have cached ``repo_id`` at ``commit``."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


def greedy(model, guidance_scale: float | None = None) -> list[list[int]]:
    return model.generate(classes=torch.tensor(CLASSES), do_sample=False, guidance_scale=guidance_scale or 1.0).tolist()


# The child: codegpt blocked first, then only transformers' remote code can build the model.
CHILD = r"""
import sys
sys.modules["codegpt"] = None
import json
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM

args = json.loads(sys.argv[1])
classes = torch.tensor(args["classes"])
out = {"transformers": transformers.__version__}
try:
    import codegpt  # noqa: F401
    out["codegpt_importable"] = True
except ImportError:
    out["codegpt_importable"] = False

def greedy(model, scale=1.0):
    return model.generate(classes=classes, do_sample=False, guidance_scale=scale).tolist()

loads = {}
for source in args["sources"]:
    for auto in (AutoModelForCausalLM, AutoModel):
        model = auto.from_pretrained(source, trust_remote_code=True)
        key = f"{auto.__name__}:{source}"
        loads[key] = {
            "module": type(model).__module__,
            "class": type(model).__name__,
            "greedy": greedy(model),
            "guided": greedy(model, args["guidance"]),
            "tied": model.lm_head.weight is model.wte.weight,
        }
        torch.manual_seed(0)  # the saved generation settings: four samples of one class
        loads[key]["distinct"] = len({tuple(row) for row in model.generate(classes=classes[:1].repeat(4)).tolist()})
        loads[key]["sampling"] = [model.generation_config.do_sample, model.generation_config.top_k]
out["loads"] = loads

model = AutoModelForCausalLM.from_pretrained(args["sources"][0], trust_remote_code=True)
gen = model.generation_config
out["generation_config"] = {k: getattr(gen, k) for k in
    ("do_sample", "temperature", "top_k", "guidance_scale", "suppress_tokens", "bos_token_id", "max_length")}
torch.manual_seed(0)
out["sampled"] = model.generate(classes=classes).tolist()  # the saved recommended settings

if args.get("codebook_repo"):
    # Decoding needs no codegpt either: the centroids are one safetensors tensor.
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file
    path = hf_hub_download(args["codebook_repo"], "codebook/model.safetensors")
    codes = torch.tensor(out["sampled"])[:, 1:]
    out["decoded"] = load_file(path)["centroids"][codes].tolist()

if args.get("untrusted"):
    try:
        AutoModel.from_pretrained(args["untrusted"])
        out["untrusted"] = "loaded"
    except Exception as err:
        out["untrusted"] = f"{type(err).__name__}: {err}"
print("\nRESULT " + json.dumps(out))  # after the y/N prompt, which ends without a newline
"""


def run_child(tmp: Path, hf_home: Path, code: str = CHILD, pythonpath: str | None = None, **args) -> dict:
    """Run ``code`` (CHILD) in a fresh interpreter: offline, an empty HF home, a dummy token and a dead endpoint;
    codegpt importable only from ``pythonpath``, if given."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_dummy_token_for_tests_only",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),
    }
    args = {"classes": CLASSES, "guidance": GUIDANCE, **args}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=tmp,
        env=env,
        stdin=subprocess.DEVNULL,  # the trust_remote_code prompt then fails at once
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------
# Fresh process, codegpt not importable
# ---------------------------------------------------------------------------------------------


def test_dry_run_folder_loads_as_remote_code_by_repo_id_and_path(tmp_path):
    model, folder = write_upload_folder(tmp_path)
    tied = tiny_model(tie=True)
    tied.save_pretrained(tmp_path / "tied")
    hf_home = tmp_path / "hf"
    install_in_cache(folder, hf_home)
    # One child for every source: each fresh interpreter costs seconds of imports.
    out = run_child(
        tmp_path,
        hf_home,
        sources=[REPO_ID, str(folder), str(tmp_path / "tied")],
        codebook_repo=REPO_ID,
        untrusted=str(folder),
    )
    assert out["codegpt_importable"] is False
    expected = {
        False: (greedy(model), greedy(model, GUIDANCE)),
        True: (greedy(tied), greedy(tied, GUIDANCE)),
    }
    assert expected[False][0] != expected[False][1]  # guidance really changes the codes
    assert len(out["loads"]) == 6
    for key, load in out["loads"].items():
        assert load["module"].startswith("transformers_modules."), key
        assert load["module"].endswith(".modeling_codegpt") and load["class"] == "GPT", key
        assert load["tied"] is key.endswith("tied"), key
        assert (load["greedy"], load["guided"]) == expected[load["tied"]], key
        assert load["distinct"] == 4, key  # the saved settings sample, in every load
        # A plain save_pretrained folder samples with the recommended top-k; the upload folder with its own.
        assert load["sampling"] == ([True, 16] if load["tied"] else [True, 8]), key

    gen = out["generation_config"]
    assert gen == {
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 8,
        "guidance_scale": GUIDANCE,
        "suppress_tokens": [16],
        "bos_token_id": 16,
        "max_length": 17,
    }
    # The same seed and the saved settings sample the same codes with codegpt's own class.
    local = GPT.from_pretrained(folder)
    torch.manual_seed(0)
    sampled = local.generate(classes=torch.tensor(CLASSES))
    assert out["sampled"] == sampled.tolist()
    assert all(t < 16 for row in out["sampled"] for t in row[1:])  # never the start token

    codebook = load_codebook(folder)
    assert out["decoded"] == codebook.decode(sampled[:, 1:]).tolist()
    assert out["untrusted"].startswith("ValueError") and "trust_remote_code" in out["untrusted"]


# Runs the model card's python blocks as written, each list in one namespace; ``block`` hides codegpt.
CARD_CHILD = r"""
import json
import sys
args = json.loads(sys.argv[1])
if args["block"]:
    sys.modules["codegpt"] = None
out = []
for blocks in args["programs"]:
    names = {}
    for code in blocks:
        exec(compile(code, "<model card>", "exec"), names)
    shapes = {k: list(names[k].shape) for k in ("tokens", "codes", "latents") if k in names}
    out.append({"module": type(names["model"]).__module__, **shapes})
print("\nRESULT " + json.dumps(out))
"""


def card_blocks(folder: Path) -> tuple[list[str], list[str]]:
    """The python blocks of an upload folder's card: those without codegpt, those with it."""
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    with_codegpt = [b for b in blocks if "import codegpt" in b]
    return [b for b in blocks if b not in with_codegpt], with_codegpt


def test_card_usage_blocks_run_as_written_with_and_without_codegpt(tmp_path):
    # A class-conditional prior with its codebook, and an unconditional one without, pinned to a commit.
    _, conditional = write_upload_folder(tmp_path / "conditional")
    make_model(seed=1, class_conditional=False).save_pretrained(tmp_path / "plain")
    other = "toy-org/plain-prior"
    unconditional = prepare_upload_folder(tmp_path / "plain", tmp_path / "plain-upload", repo_id=other,
                                          revision=COMMIT, info=CardInfo(decoder="a VQGAN decoder (not shipped)."))
    hf_home = tmp_path / "hf"
    install_in_cache(conditional, hf_home)
    install_in_cache(unconditional, hf_home, repo_id=other)
    assert f'revision="{COMMIT}"' in (unconditional / "README.md").read_text()
    (without_a, with_a), (without_b, with_b) = card_blocks(conditional), card_blocks(unconditional)
    assert (len(without_a), len(with_a), len(without_b), len(with_b)) == (3, 1, 2, 1)  # load, sample(, decode)

    # Without codegpt: the Hub id through transformers' remote code, huggingface_hub and safetensors only.
    out = run_child(tmp_path, hf_home, code=CARD_CHILD, block=True, programs=[without_a, without_b])
    assert all(run["module"].startswith("transformers_modules.") for run in out)
    assert out[0]["tokens"] == [3, 17] and out[0]["codes"] == [3, 4, 4] and out[0]["latents"] == [3, 4, 4, 4]
    assert out[1]["tokens"] == [4, 17] and out[1]["codes"] == [4, 4, 4] and "latents" not in out[1]

    # With codegpt: its own class, its sampler and the codebook.
    out = run_child(tmp_path, hf_home, code=CARD_CHILD, block=False, pythonpath=str(REPO), programs=[with_a, with_b])
    assert all(run["module"] == "codegpt.modeling_codegpt" for run in out)
    assert out[0]["codes"] == [3, 4, 4] and out[0]["latents"] == [3, 4, 4, 4]
    assert out[1]["codes"] == [4, 4, 4] and "latents" not in out[1]


# ---------------------------------------------------------------------------------------------
# In process, with codegpt (its registered class wins)
# ---------------------------------------------------------------------------------------------


def test_local_folder_and_offline_cache_load_with_codegpt(tmp_path):
    model, folder = write_upload_folder(tmp_path)
    hub_cache = install_in_cache(folder, tmp_path / "hf").parent
    expected = greedy(model, GUIDANCE)
    for source, kwargs in ((folder, {}), (REPO_ID, {"cache_dir": hub_cache, "local_files_only": True})):
        for cls in (GPT, AutoModel, AutoModelForCausalLM):
            loaded = cls.from_pretrained(source, **kwargs)
            assert type(loaded) is GPT, (source, cls)
            assert greedy(loaded, GUIDANCE) == expected, (source, cls)
    by_repo = load_codebook(REPO_ID, cache_dir=hub_cache, local_files_only=True)
    assert torch.equal(by_repo.centroids, load_codebook(folder).centroids)


# ---------------------------------------------------------------------------------------------
# Across transformers versions (driven by .ci/compat.sh)
# ---------------------------------------------------------------------------------------------

FOREIGN = os.environ.get("CODEGPT_FOREIGN_UPLOAD")


@pytest.mark.skipif(not FOREIGN, reason="set CODEGPT_FOREIGN_UPLOAD to a folder written by another transformers")
def test_folder_from_another_transformers_version_loads(tmp_path):
    check(Path(FOREIGN), tmp_path)


def write(root: Path) -> None:
    """Save an upload folder and its expected greedy codes with the installed transformers."""
    import transformers

    model, folder = write_upload_folder(root)
    expected = {
        "transformers": transformers.__version__,
        "greedy": greedy(model),
        "guided": greedy(model, GUIDANCE),
    }
    (root / "expected.json").write_text(json.dumps(expected))


def check(root: Path, tmp: Path) -> None:
    """Load ``write``'s folder as remote code in a fresh process, by path and by repo id."""
    expected = json.loads((root / "expected.json").read_text())
    hf_home = tmp / "hf"
    install_in_cache(root / "upload", hf_home)
    out = run_child(tmp, hf_home, sources=[REPO_ID, str(root / "upload")])
    for key, load in out["loads"].items():
        assert load["module"].startswith("transformers_modules."), key
        assert (load["greedy"], load["guided"]) == (expected["greedy"], expected["guided"]), (
            f"{key}: saved with transformers {expected['transformers']}, loaded with {out['transformers']}"
        )
    print(f"ok: saved with transformers {expected['transformers']}, loaded with {out['transformers']}")


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit("usage: python tests/test_remote_code.py write|check DIR")
    target = Path(sys.argv[2])
    if sys.argv[1] == "write":
        target.mkdir(parents=True, exist_ok=False)
        write(target)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            check(target, Path(scratch))
