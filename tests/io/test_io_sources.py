import json

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.io import atomic_output, load_model, open_tensor_source, resolve_source, save_model, write_json_atomic


def test_resolve_kinds(tiny_llama_dir, tmp_path):
    assert resolve_source(tiny_llama_dir).kind == "hf"
    assert resolve_source(tiny_llama_dir / "model.safetensors").kind == "safetensors"
    with pytest.raises(SparsemergeError, match="not found"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparsemergeError, match="no config.json"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SparsemergeError, match="unknown file type"):
        resolve_source(tmp_path / "x.txt")


def test_load_hf_folder_and_bare_safetensors(tiny_llama_dir, tiny_tokenizer):
    a = load_model(tiny_llama_dir)
    b = load_model(tiny_llama_dir / "model.safetensors")  # config.json beside it
    for (na, ta), (nb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    text = "Shares in the company rose after the results were published."
    assert a.tokenizer(text).input_ids == tiny_tokenizer(text).input_ids


def test_corrupt_safetensors_gives_clear_error(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SparsemergeError, match="could not"):
        load_model(tiny_llama_dir)
    with pytest.raises(SparsemergeError, match="truncated or corrupt"):
        open_tensor_source(tiny_llama_dir)


def test_tensor_source_is_lazy_and_complete(tiny_llama_dir):
    model = make_tiny_llama()
    with open_tensor_source(tiny_llama_dir) as tensors:
        assert "model.layers.0.mlp.up_proj.weight" in tensors
        assert tensors.shape("model.layers.0.mlp.up_proj.weight") == (128, 64)
        assert torch.equal(tensors.get("model.layers.1.self_attn.q_proj.weight"), model.model.layers[1].self_attn.q_proj.weight)
        with pytest.raises(SparsemergeError, match="not in"):
            tensors.get("nope")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SparsemergeError, match="already exists.*--overwrite"):
        with atomic_output(out):
            pass
    assert (out / "keep.txt").read_text() == "precious"
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no backup left behind


def test_save_model_roundtrip(tmp_path, tiny_tokenizer):
    model = make_tiny_llama()
    out = save_model(model, tiny_tokenizer, tmp_path / "m", records={"rec.json": {"a": 1}})
    assert json.loads((out / "rec.json").read_text()) == {"a": 1}
    again = load_model(out).model
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}


@pytest.mark.slow
def test_bundled_smollm2_loads():
    loaded = load_model("smollm2")
    cfg = loaded.model.config
    assert cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    ids = loaded.tokenizer("The government said", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.isfinite().all()
