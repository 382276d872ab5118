"""The streamed magnitude prune (prune/streaming.py) writes what loading the model writes."""
from __future__ import annotations

import filecmp
import json

import pytest
import torch

from sparsemerge.cli.main import main
from sparsemerge.prune import streaming


def prune_both(src, tmp_path, monkeypatch, *extra):
    """``(streamed folder, loaded folder)`` of ``sparsemerge prune SRC ...`` by each path."""
    streamed, loaded = tmp_path / "streamed", tmp_path / "loaded"
    calls = []
    real = streaming.prune_streaming
    monkeypatch.setattr(streaming, "prune_streaming", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["prune", str(src), str(streamed), "--no-progress", *extra]) == 0
    assert calls, "the streamed path was not taken"
    monkeypatch.setattr(streaming, "streaming_unsupported", lambda config, source: "off")
    assert main(["prune", str(src), str(loaded), "--no-progress", *extra]) == 0
    return streamed, loaded


def assert_same_folder(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "sparsemerge_prune.json":  # equal but for the seconds
            ra, rb = (json.loads((d / name).read_text()) for d in (a, b))
            ra.pop("seconds"), rb.pop("seconds")
            assert ra == rb
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("extra", [[], ["--pattern", "4:8", "--exclude", "mlp"], ["--pattern", "unstructured:0.3"]])
def test_streamed_prune_equals_loaded_prune(tiny_llama_dir, tmp_path, monkeypatch, extra):
    assert_same_folder(*prune_both(tiny_llama_dir, tmp_path, monkeypatch, *extra))


def test_streamed_prune_of_sharded_bfloat16_untied(tmp_path, monkeypatch, tiny_tokenizer):
    from conftest import make_tiny_llama
    from transformers import LlamaForCausalLM

    config = make_tiny_llama().config
    config.tie_word_embeddings = False
    src = tmp_path / "bf16"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    streamed, loaded = prune_both(src, tmp_path, monkeypatch)
    assert_same_folder(streamed, loaded)  # float32 out, as load_model gives


def test_other_methods_and_foreign_names_load_the_model(tiny_llama_dir, tmp_path):
    from sparsemerge.io import resolve_source
    from sparsemerge.prune.config import PruneConfig

    source = resolve_source(tiny_llama_dir)
    assert streaming.streaming_unsupported(PruneConfig(), source) is None
    assert "needs the loaded model" in streaming.streaming_unsupported(PruneConfig(method="wanda"), source)
    assert "permutation" in streaming.streaming_unsupported(PruneConfig(permute=True), source)
    assert "global" in streaming.streaming_unsupported(PruneConfig(pattern="unstructured-global:0.5"), source)
    # a checkpoint whose names are not the model's (an extra tensor): nothing written, the caller loads
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_llama_dir / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(4, 4)}, tiny_llama_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert streaming.prune_streaming(source, out, PruneConfig(progress=False)) is None
    assert not out.exists()


def test_streamed_prune_refuses_non_finite_weights(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_llama_dir / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, tiny_llama_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama_dir), str(out), "--no-progress"]) == 2
    assert "model.layers.1.mlp.up_proj contains NaN or Inf" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half written
