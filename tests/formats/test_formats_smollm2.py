"""The bundled SmolLM2 (slow): real weight shapes through the formats, and pack's refusal of
an unpruned model."""
from __future__ import annotations

import math

import pytest
import torch

from sparsemerge.errors import PatternViolation
from sparsemerge.formats import CodecSpec, NMPacked
from sparsemerge.masks import nm_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from sparsemerge.io import open_tensor_source

    try:
        with open_tensor_source("smollm2") as source:
            yield source
    except Exception as exc:  # the bundled package is part of `make venv`
        pytest.skip(f"bundled SmolLM2 unavailable: {exc}")


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"])
def test_real_weights_pack_to_the_entropy_bound_and_int4(smollm2, name):
    w = smollm2.get(name).float()
    w = w * nm_mask(w.abs(), 2, 4)
    packed = NMPacked.from_dense(w, 2, 4, "entropy")
    bound = math.log2(6)
    assert bound <= packed.metadata_bits_per_group() < bound * 1.01
    rebuilt = NMPacked.from_fields(packed.shape, packed.dtype, packed.params(), packed.fields())
    assert torch.equal(rebuilt.to_dense(), w)
    q = NMPacked.from_dense(w, 2, 4, "entropy").with_codec(CodecSpec("int4", 128))
    rows, cols = w.shape
    # per dense weight: 4 bits x 1/2 kept + metadata ~2.59/4 + one float32 scale per 128 kept
    expected = 2 + bound / 4 + 32 * math.ceil(cols / 2 / 128) / cols
    assert 8 * q.nbytes / w.numel() <= expected * 1.01
    rel = (q.to_dense() - w).norm() / w.norm()
    assert rel < 0.15


def test_pack_refuses_the_unpruned_model_naming_a_tensor(tmp_path):
    from sparsemerge.formats.model import pack

    with pytest.raises(PatternViolation, match=r"tensor 'model\.layers\.\d+\.[a-z_.]+weight': not 2:4 sparse"):
        pack("smollm2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
