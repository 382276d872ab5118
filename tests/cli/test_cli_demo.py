"""``sparsemerge demo`` end to end on a tiny model and a text file (the real run uses SmolLM2).

Every number the demo reports is checked against an independent computation: perplexities
by a hand-written loop on models loaded with transformers from the folders the demo wrote
(the packed one decoded by tests/layout_reference.py), sparsity and the 2:4 pattern by
counting zeros, the magnitude row against a hand-made 2:4 mask, sizes from the files.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from layout_reference import decode_tensor, hand_perplexity, read_safetensors

TARGET = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _model(folder: Path, state: "dict[str, torch.Tensor] | None" = None):
    from transformers import AutoConfig, LlamaForCausalLM

    if state is None:
        return LlamaForCausalLM.from_pretrained(folder).eval()
    model = LlamaForCausalLM(AutoConfig.from_pretrained(folder)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # the head is tied to the embedding
    return model


def _magnitude_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest |w| of every group of 4 inputs (hand-made 2:4 magnitude mask)."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(w.shape)


def test_demo_prunes_packs_and_times_decoding(tiny_llama_dir, text_file, tmp_path, capsys):
    from sparsemerge.cli.main import main
    from sparsemerge.demo import _a8_available

    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tiny_llama_dir), "--data", str(text_file), "--methods", "magnitude", "sparsegpt",
                 "--seqlen", "32", "--max-windows", "2", "--nsamples", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "decoding, float activations" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    # SparseGPT is shown with its default walk and with sequential="block"
    assert [r["name"] for r in rows[:4]] == ["dense", "magnitude", "sparsegpt", "sparsegpt-block"]
    # pruned models are written inside --out, named after the model folder
    assert all(r["folder"].startswith(str(out)) for r in rows[1:])
    assert (out / f"{tiny_llama_dir.name}-sparsegpt-block-2of4" / "config.json").is_file()

    # the held-out windows: the text file's first 2 x 32 tokens (no special tokens)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(text_file.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[:64]).reshape(2, 32)
    dense_state = _state(tiny_llama_dir)
    dense = rows[0]
    assert dense["sparsity"] == 0.0 and dense["folder"] is None
    assert dense["perplexity"] == pytest.approx(hand_perplexity(_model(tiny_llama_dir), windows), rel=1e-5)

    # each pruned row: its folder is exactly 2:4 on every projection (half the weights zero,
    # at most 2 nonzeros per group of 4 inputs), everything else is the dense model, and the
    # reported perplexity is that folder's
    for row in rows[1:4]:
        state = _state(row["folder"])
        assert state.keys() == dense_state.keys()
        targets = [k for k in state if TARGET.search(k)]
        assert len(targets) == 2 * 7
        zeros = sum(int((state[k] == 0).sum()) for k in targets) / sum(state[k].numel() for k in targets)
        assert row["sparsity"] == zeros == 0.5, row["name"]
        assert all(int((state[k].reshape(-1, 4) != 0).sum(1).max()) <= 2 for k in targets), row["name"]
        assert all(torch.equal(state[k], dense_state[k]) for k in state if k not in targets), row["name"]
        assert row["perplexity"] == pytest.approx(hand_perplexity(_model(Path(row["folder"])), windows), rel=1e-5), row["name"]
    magnitude = _state(rows[1]["folder"])
    assert all(torch.equal(magnitude[k], _magnitude_24(dense_state[k])) for k in magnitude if TARGET.search(k))

    # the best pruned model is recovered by distillation (its zeros kept), then packed
    best = min(rows[1:4], key=lambda r: r["perplexity"])
    recovered = rows[4]
    assert recovered["name"] == best["name"] + "+recovered" and recovered["sparsity"] == 0.5
    assert (Path(recovered["folder"]) / "sparsemerge_recover.json").is_file()
    assert main(["check", recovered["folder"], "--pattern", "2:4", "--quiet"]) == 0
    before, after = _state(best["folder"]), _state(recovered["folder"])
    assert all(torch.equal(after[k] == 0, before[k] == 0) for k in after if TARGET.search(k))  # same zeros
    assert any(not torch.equal(after[k], before[k]) for k in after if TARGET.search(k))  # but trained
    assert recovered["perplexity"] == pytest.approx(hand_perplexity(_model(Path(recovered["folder"])), windows), rel=1e-5)

    packed = rows[-1]
    source = min(rows[1:5], key=lambda r: r["perplexity"])  # the best of the pruned and recovered rows
    assert len(rows) == 6 and packed["name"] == source["name"] + "+int4" and packed["sparsity"] == 0.5
    folder = Path(packed["folder"])
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.name.startswith(("packed", "sparsemerge"))]
    assert packed["megabytes"] == pytest.approx(sum(p.stat().st_size for p in files) / 1e6, abs=1e-9)
    model = _model(tiny_llama_dir)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() lists the tied one once
    dense_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    assert packed["dense_megabytes"] == pytest.approx(dense_bytes / 1e6, abs=1e-9)
    # decode the packed N:M + INT4 file by hand: the source folder's zeros stay zero, every value is
    # within half a quantization step, and the reported perplexity is the decoded model's
    manifest = json.loads((folder / "sparsemerge_packed.json").read_text())
    shards = {name: read_safetensors(folder / name)[0] for name in manifest["shards"]}
    expected_bytes, decoded = 0, {}
    for name, record in manifest["tensors"].items():
        fields = {f: shards[record["shard"]][info["key"]][1] for f, info in record["fields"].items()}
        decoded[name] = torch.from_numpy(np.ascontiguousarray(decode_tensor(record, fields)))
        if TARGET.search(name):  # N:M 2:4, INT4 codes (2 per byte), a float32 scale per 128 kept values, entropy metadata
            assert record["format"] == "nm" and record["params"]["codec"]["kind"] == "int4"
            rows_, cols = record["shape"]
            kept = cols // 2
            expected_bytes += rows_ * math.ceil(kept / 2) + rows_ * math.ceil(kept / 128) * 4
            expected_bytes += math.ceil(rows_ * (6 ** (cols // 4) - 1).bit_length() / 8)
        elif name == "model.embed_tokens.weight":  # the embedding in INT8, a scale per row (<= 128 columns)
            expected_bytes += decoded[name].numel() + decoded[name].shape[0] * 4
        else:
            expected_bytes += decoded[name].numel() * 4
    assert sum(len(raw) for tensors in shards.values() for _, _, raw in tensors.values()) == expected_bytes
    pruned = _state(source["folder"])
    assert decoded.keys() == pruned.keys()
    for name, value in decoded.items():
        assert not value[pruned[name] == 0].any(), name  # pruned zeros decode exactly (INT4 may add zeros)
        step = pruned[name].abs().amax(dim=-1, keepdim=True) / (7 if TARGET.search(name) else 127) if value.dim() == 2 else 0
        assert torch.all((value - pruned[name]).abs() <= step / 2 + 1e-6), name
    assert packed["perplexity"] == pytest.approx(hand_perplexity(_model(folder, decoded), windows), rel=1e-5)
    assert packed["megabytes"] < 0.3 * packed["dense_megabytes"]
    assert packed["speedup"] > 0  # a timing: its value depends on the machine

    table = (out / "results.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    body = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    for row in rows:  # "x dense" is each perplexity over the dense one
        assert float(body[row["name"]][header.index("x dense")]) == pytest.approx(row["perplexity"] / dense["perplexity"], rel=1e-3)
    if _a8_available():  # the INT8-activation row: its own perplexity and speed
        assert packed["speedup_a8"] > 0
        # rounding the activations to INT8 moves the perplexity by well under 5% on this model
        assert abs(packed["perplexity_a8"] / packed["perplexity"] - 1) < 0.05
        assert f"{packed['name']} int8-act" in body and "decoding, INT8 activations" in printed
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
