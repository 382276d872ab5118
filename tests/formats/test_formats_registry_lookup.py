"""formats/base.py finds codecs and the COO hub through its registries (no imports of the
concrete modules): each CodecSpec kind reaches the right encoder with the right parameters,
and the registries are full after importing base.py alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsemerge
from sparsemerge.formats.base import CODECS, FORMATS, CodecSpec
from sparsemerge.formats.codebook import fit_codebook
from sparsemerge.formats.coo import COO
from sparsemerge.formats.dense import Dense
from sparsemerge.formats.quant import quantize


def _same_fields(a, b) -> None:
    fa, fb = a.fields(), b.fields()
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    assert a.params() == b.params()


@pytest.mark.parametrize(
    "spec, direct",
    [
        (CodecSpec("int8", 0, True), lambda x: quantize(x, 8, 0, True)),
        (CodecSpec("int4", 4, False), lambda x: quantize(x, 4, 4, False)),
        (CodecSpec("int4", 8, True), lambda x: quantize(x, 4, 8, True)),
        (CodecSpec("codebook", k=8), lambda x: fit_codebook(x, 8)),
    ],
)
def test_codec_spec_reaches_its_encoder(spec: CodecSpec, direct) -> None:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    encoded = spec.encode(x)
    assert encoded.params()["kind"] == spec.kind
    _same_fields(encoded, direct(x))


def test_none_keeps_values_and_to_coo_uses_the_hub() -> None:
    x = torch.randn(4, 8)
    assert CodecSpec("none").encode(x) is x
    coo = Dense.from_dense(x * (x > 0)).to_coo()
    assert type(coo) is COO and torch.equal(coo.to_dense(), x * (x > 0))


def test_registries_full_after_importing_base_alone() -> None:
    src = str(Path(sparsemerge.__file__).resolve().parents[1])
    code = (
        "import json, torch; from sparsemerge.formats.base import CODECS, FORMATS, CodecSpec, convert; "
        "d = __import__('sparsemerge.formats.dense', fromlist=['Dense']).Dense.from_dense(torch.eye(4)); "
        "print(json.dumps({'codecs': CODECS.names(), 'formats': FORMATS.names(), "
        "'csr': type(convert(d, 'csr')).__name__, 'q': CodecSpec('int8').encode(torch.ones(2, 4)).kind}))"
    )
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(got["codecs"]) == set(CODECS.names()) >= {"int8", "int4", "codebook"}
    assert set(got["formats"]) == set(FORMATS.names()) >= {"nm", "bitmask", "coo", "csr", "bsr", "dense"}
    assert got["csr"] == "CSR" and got["q"] == "int8"
