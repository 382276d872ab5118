"""Formats against references: scipy.sparse for COO/CSR/BSR, numpy.packbits for the
bitmask, the compressed-tensors sparse-24-bitmask layout (and the library itself when its
peer venv exists), and the chapter's storage exercises through the size calculator."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sparsemerge.cli.main import main
from sparsemerge.formats import BSR, COO, CSR, Bitmask, NMPacked
from sparsemerge.formats.ct import from_ct_fields, to_ct_fields
from sparsemerge.formats.model import pack, read_packed, unpack
from sparsemerge.formats.size import nm_overheads, overhead, plan
from sparsemerge.masks import nm_mask

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / ".venv-peers" / "compressed-tensors" / "bin" / "python"


def _sparse(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < density)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (40, 300), (5, 40000)])
def test_coo_and_csr_match_scipy(shape):
    x = _sparse(*shape, 0.3, 1)
    ref = sp.coo_matrix(x.numpy())
    ref.sum_duplicates()  # canonical row-major order
    coo = COO.from_dense(x)
    assert np.array_equal(coo.row.numpy(), ref.row) and np.array_equal(coo.col.numpy(), ref.col)
    assert np.array_equal(coo.values.numpy(), ref.data)
    assert coo.col.dtype == (torch.int32 if shape[1] > 32768 else torch.int16)
    csr_ref = sp.csr_matrix(x.numpy())
    csr = CSR.from_dense(x)
    assert np.array_equal(csr.indptr.numpy(), csr_ref.indptr) and np.array_equal(csr.indices.numpy(), csr_ref.indices)
    assert np.array_equal(csr.values.numpy(), csr_ref.data)
    # and back: scipy builds the same dense matrix from our arrays
    rebuilt = sp.csr_matrix((csr.values.numpy(), csr.indices.numpy(), csr.indptr.numpy()), shape=shape).toarray()
    assert np.array_equal(rebuilt, x.numpy())


@pytest.mark.parametrize("block", [1, 2, 4])
def test_bsr_matches_scipy(block):
    x = _sparse(16, 24, 0.05, 3)
    x[4:8, 8:12] = 1.0
    ref = sp.bsr_matrix(x.numpy(), blocksize=(block, block))
    ref.sort_indices()
    obj = BSR.from_dense(x, block=block)
    assert np.array_equal(obj.indptr.numpy(), ref.indptr)
    assert np.array_equal(obj.indices.numpy(), ref.indices)
    assert np.array_equal(obj.values.numpy(), ref.data)


def test_bitmask_matches_numpy_packbits_little():
    x = _sparse(6, 21, 0.4, 5)
    obj = Bitmask.from_dense(x)
    expected = np.packbits((x != 0).numpy(), axis=-1, bitorder="little")
    assert np.array_equal(obj.fields()["bitmask"].numpy(), expected)


def test_ct_fields_follow_the_sparse_24_bitmask_layout():
    x = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0], [4.0, 0.0, 0.0, 5.0, 0.0, 6.0, 7.0, 0.0]])
    fields = to_ct_fields(NMPacked.from_dense(x, 2, 4))
    assert fields["compressed"].tolist() == [[1.0, 2.0, 0.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    # row 0 mask 0110 1001 -> bits little-endian: 0b10010110; row 1: 1001 0110 -> 0b01101001
    assert fields["bitmask"].tolist() == [[0b10010110], [0b01101001]]
    assert fields["shape"].tolist() == [[2], [8]] and fields["shape"].dtype == torch.int64
    back = from_ct_fields("w", **fields)
    assert isinstance(back, NMPacked) and torch.equal(back.to_dense(), x)


def test_ct_reader_accepts_unstructured_bitmasks():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 7] = True
    bits = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    obj = from_ct_fields("w", torch.tensor([1.0, 2.0, 3.0, 4.0]), bits, torch.tensor([[2], [8]]))
    assert isinstance(obj, Bitmask)
    assert obj.to_dense()[0, :3].tolist() == [1.0, 2.0, 3.0] and obj.to_dense()[1, 7] == 4.0


@pytest.fixture
def pruned_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.mul_(nm_mask(param.abs(), 2, 4))
    model.save_pretrained(tmp_path / "pruned")
    tiny_tokenizer.save_pretrained(tmp_path / "pruned")
    return tmp_path / "pruned"


def test_ct_folder_round_trip(pruned_dir, tmp_path):
    from safetensors.torch import load_file

    pack(pruned_dir, tmp_path / "ct", format="sparse-24-bitmask")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert "model.layers.0.mlp.up_proj" in sparsity["targets"] and sparsity["global_sparsity"] == pytest.approx(0.5)
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert {"model.layers.0.mlp.up_proj.compressed", "model.layers.0.mlp.up_proj.bitmask", "model.layers.0.mlp.up_proj.shape"} <= set(state)
    assert "model.layers.0.mlp.up_proj.weight" not in state
    # read as a packed checkpoint, convert to our format, and back to dense
    ckpt = read_packed(tmp_path / "ct")
    assert isinstance(ckpt.get("model.layers.0.mlp.up_proj.weight"), NMPacked)
    unpack(tmp_path / "ct", tmp_path / "dense")
    dense_config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in dense_config
    a, b = load_file(str(pruned_dir / "model.safetensors")), load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.peer
def test_compressed_tensors_library_reads_our_layout(pruned_dir, tmp_path):
    if not PEER.exists():
        pytest.skip("peer venv missing: run benchmarks/bench_storage_setup_peers.sh")
    pack(pruned_dir, tmp_path / "ct", format="sparse-24-bitmask")
    script = ROOT / "benchmarks" / "bench_storage_ct_check.py"
    result = subprocess.run([str(PEER), str(script), str(tmp_path / "ct"), str(pruned_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_chapter_exercise_1_two_four_indices():
    w = torch.tensor([[0.5, -0.2, 0.8, -0.1, 0.3, 0.7, -0.6, 0.4]])
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert pruned.tolist() == [[0.5, 0.0, 0.800000011920929, 0.0, 0.0, 0.699999988079071, -0.6000000238418579, 0.0]]
    # kept positions: group 0 {0, 2}, group 1 {1, 2}; colex ranks r = C(p1,1) + C(p2,2): 0+1 = 1, 1+1 = 2
    assert overhead("2:4").index * 2 == 6  # 3 bits per group
    obj = NMPacked.from_dense(pruned, 2, 4, "index")
    # index: 3-bit codes LSB first (bits.py): 1 | 2 << 3 = 0b010001 = 17, 6 bits in one byte
    assert obj.metadata_stream().tolist() == [1 | 2 << 3]
    # bits2: positions 0, 2, 1, 2 at 2 bits each = 0 | 2<<2 | 1<<4 | 2<<6 = 152
    assert NMPacked.from_dense(pruned, 2, 4, "bits2").metadata_stream().tolist() == [0 | 2 << 2 | 1 << 4 | 2 << 6]
    # entropy: V = r0 + 6 * r1 = 13 in bitlength(6**2 - 1) = 6 bits
    assert NMPacked.from_dense(pruned, 2, 4, "entropy").metadata_stream().tolist() == [1 + 6 * 2]
    assert obj.values.tolist() == [[0.5, 0.800000011920929, 0.699999988079071, -0.6000000238418579]]


def test_chapter_exercise_2_coo_vs_packed_1024():
    rows = {r.format: r.nbytes for r in plan((1024, 1024), "2:4", value_bytes=2)}
    assert rows["coo"] == 3 * 524_288 * 2 == 3_145_728  # int16 row + int16 col + fp16 value
    assert rows["nm/index"] == 2 * 262_144 * 2 + 262_144 * 3 // 8 == 1_146_880
    assert rows["nm/bits2"] == 1_179_648 and rows["dense"] == 2_097_152
    assert rows["nm/entropy"] == 1024 * 2 * 256 * 2 + 1024 * math.ceil(256 * math.log2(6)) // 8
    # the calculator equals the real formats' nbytes
    x = torch.randn(1024, 1024).half()
    x = x * nm_mask(x.float().abs(), 2, 4)
    for coding in ("bits2", "index", "entropy"):
        assert NMPacked.from_dense(x, 2, 4, coding).nbytes == rows[f"nm/{coding}"]
    assert COO.from_dense(x).nbytes == rows["coo"] and CSR.from_dense(x).nbytes == rows["csr"]
    assert Bitmask.from_dense(x).nbytes == rows["bitmask"] and BSR.from_dense(x, 16).nbytes == rows["bsr"]


@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0), (4, 7)])
def test_quantized_plan_equals_real_nbytes(bits, group):
    from sparsemerge.formats import CodecSpec

    rows = {r.format: r.nbytes for r in plan((64, 200), "2:4", value_bytes=4, quant_bits=bits, group_size=group)}
    x = torch.randn(64, 200)
    x = x * nm_mask(x.abs(), 2, 4)
    for coding in ("bits2", "index", "entropy"):
        real = NMPacked.from_dense(x, 2, 4, coding).with_codec(CodecSpec(f"int{bits}", group))
        assert real.nbytes == rows[f"nm/{coding}+int{bits}"]


def test_chapter_exercise_4_and_7_index_overheads():
    options = {(o.n, o.m): o for o in nm_overheads(0.75, max_m=8)}
    assert set(options) == {(1, 4), (2, 8)}
    assert options[(1, 4)].index == 2 and options[(2, 8)].index == 5
    assert options[(2, 8)].entropy == pytest.approx(math.log2(28))
    assert overhead("2:4").entropy == pytest.approx(2.585, abs=1e-3)


def test_inspect_plan_cli(capsys):
    assert main(["inspect", "--plan", "1024x1024", "2:4", "0.75"]) == 0
    text = capsys.readouterr().out
    assert "3,145,728" in text and "1,146,880" in text and "2:8" in text and "4.807" in text
    assert main(["inspect", "--plan", "1024"]) == 2
