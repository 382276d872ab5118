"""Outputs never destroy inputs; a checkpoint never makes us read or run what lies outside it
(issue 17, items 1-4)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.io import atomic_output, ensure_writable, load_model, open_tensor_source


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def family(tmp_path, tiny_tokenizer):
    """<root>/base, <root>/ft0, <root>/ft1: three tiny Llama folders side by side."""
    root = tmp_path / "tiny"
    for i, name in enumerate(("base", "ft0", "ft1")):
        model = make_tiny_llama(seed=i)
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    return root


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_an_output_that_is_or_contains_an_input_is_refused_and_nothing_is_deleted(family, tmp_path, capsys):
    before = _files(family)
    # pack into the folder holding the input, with --overwrite: refused, nothing touched
    assert run("pack", family / "ft1", family, "--overwrite", "--pattern", "2:4") == 2
    assert "contains the input" in capsys.readouterr().err
    # prune X X --overwrite
    assert run("prune", family / "ft0", family / "ft0", "--overwrite", "--no-progress") == 2
    assert "is the input" in capsys.readouterr().err
    # merge into the folder holding its inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {family / 'ft0'}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {family / 'ft1'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert run("merge", cfg, family, "--overwrite", "--no-progress") == 2
    assert "contains the input" in capsys.readouterr().err
    # unpack onto its own packed folder
    packed = tmp_path / "packed"
    assert run("pack", family / "base", packed, "--format", "dense", "--no-progress") == 0
    assert run("unpack", packed, packed, "--overwrite") == 2
    assert "is the input" in capsys.readouterr().err
    assert _files(family) == before and (packed / "sparsemerge_packed.json").is_file()
    # a symlink to an input is the input
    link = tmp_path / "alias"
    link.symlink_to(family, target_is_directory=True)
    with pytest.raises(SparsemergeError, match="contains the input"):
        ensure_writable(link, True, inputs=[family / "base"])
    # the API checks again when it renames (an input that appeared under the output meanwhile)
    out = tmp_path / "late"
    with pytest.raises(SparsemergeError, match="contains the input"):
        with atomic_output(out, overwrite=True, inputs=[out / "model"]) as tmp:
            (out / "model").mkdir(parents=True)
            (tmp / "x").write_text("new")
    assert (out / "model").is_dir()


def test_a_shard_index_pointing_outside_the_folder_is_refused(family, tmp_path, capsys):
    victim, other = family / "ft0", family / "ft1"
    weights = victim / "model.safetensors"
    for target in ("../ft1/model.safetensors", str(other / "model.safetensors"), "evil.bin"):
        (victim / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": target}}))
        with pytest.raises(SparsemergeError, match="inside the model folder"):
            open_tensor_source(victim)
        with pytest.raises(SparsemergeError, match="inside the model folder"):
            load_model(victim)
        assert run("pack", victim, tmp_path / "p", "--no-progress") == 2
        assert "inside the model folder" in capsys.readouterr().err
        assert not (tmp_path / "p").exists()
    # a pickle named by the index is never torch.load-ed: check refuses before reading it
    (victim / "evil.bin").write_bytes(b"not read")
    assert run("check", victim, "--quiet") == 2
    assert weights.is_file()


def test_remote_code_is_never_run(tiny_llama_dir, tmp_path, monkeypatch):
    """A config with auto_map to a local module: transformers must not import it (no prompt, no run)."""
    folder = tmp_path / "evil"
    shutil.copytree(tiny_llama_dir, folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import LlamaForCausalLM as EvilModel\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-llama"  # no built-in class: transformers would ask, then import evil.py
    (folder / "config.json").write_text(json.dumps(config))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user who answers "y"
    try:
        load_model(folder)
    except SparsemergeError:
        pass  # refusing is fine; running it is not
    assert not marker.exists() and not asked


def test_symlinked_side_files_pointing_outside_are_not_copied(tiny_llama_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "notes.txt").symlink_to(secret)
    (folder / "readme.md").write_text("inside")
    (folder / "alias.md").symlink_to(folder / "readme.md")  # a link inside the folder is fine
    out = tmp_path / "packed"
    assert run("pack", folder, out, "--pattern", "2:4", "--format", "dense", "--no-progress") == 0
    assert not (out / "notes.txt").exists()
    assert (out / "readme.md").read_text() == "inside" and (out / "alias.md").read_text() == "inside"
    assert "TOP SECRET" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix != ".safetensors")
