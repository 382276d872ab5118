"""N:M position codings: colex ranks over every combination, hand-worked bitstreams, and
corrupt-metadata detection."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats import NMPacked
from sparsemerge.formats.nm_coding import decode_metadata, encode_metadata, rank_groups, unrank_groups


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 12])
def test_ranks_enumerate_every_combination_once(m):
    for n in range(1, m):
        combos = torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.uint8)
        ranks = rank_groups(combos, m)
        assert sorted(ranks.tolist()) == list(range(math.comb(m, n)))
        assert torch.equal(unrank_groups(ranks, n, m), combos)


def test_hand_worked_streams_for_2_of_4():
    # groups (0,1), (2,3), (0,2): colex ranks 0, C(2,1)+C(3,2)=5, C(2,2)=1
    positions = torch.tensor([[0, 1], [2, 3], [0, 2]], dtype=torch.uint8)
    assert rank_groups(positions, 4).tolist() == [0, 5, 1]
    # bits2: 2 bits per position, LSB first: 0,1,2,3,0,2 -> 0b11100100, 0b1000
    assert encode_metadata(positions, "bits2", 2, 4, 1).tolist() == [0b11100100, 0b00001000]
    # index: 3 bits per rank: 0 | 5<<3 | 1<<6 = 104
    assert encode_metadata(positions, "index", 2, 4, 1).tolist() == [104, 0]
    # entropy: V = 0 + 5*6 + 1*36 = 66 in bitlength(6**3 - 1) = 8 bits
    assert encode_metadata(positions, "entropy", 2, 4, 1).tolist() == [66]
    for coding in ("bits2", "index", "entropy"):
        stream = encode_metadata(positions, coding, 2, 4, 1)
        assert torch.equal(decode_metadata(stream, coding, 2, 4, 1, 3), positions)


def test_entropy_rows_are_packed_back_to_back():
    # two rows of one 2:4 group each: B = bitlength(5) = 3 bits per row
    positions = torch.tensor([[2, 3], [1, 3]], dtype=torch.uint8)  # ranks 5, 4
    stream = encode_metadata(positions, "entropy", 2, 4, 2)
    assert stream.tolist() == [5 | (4 << 3)]


def test_entropy_value_out_of_range_is_corrupt():
    # 1 row, 3 groups: B = 8 bits; 255 >= 6**3 = 216 is not a valid code
    with pytest.raises(SparsemergeError, match="out of range"):
        decode_metadata(torch.tensor([255], dtype=torch.uint8), "entropy", 2, 4, 1, 3, "tensor 'w'")


def test_bits2_positions_must_ascend():
    stream = torch.tensor([0b00000111], dtype=torch.uint8)  # positions 3, 1
    with pytest.raises(SparsemergeError, match="ascending"):
        decode_metadata(stream, "bits2", 2, 4, 1, 1, "tensor 'w'")


def test_large_m_entropy_refused_with_advice():
    x = torch.zeros(1, 64)
    with pytest.raises(SparsemergeError, match="use --metadata index"):
        NMPacked.from_dense(x, 32, 64, "entropy")
    # index coding still works: 32 float32 slots + one ceil(log2 C(64, 32)) = 61-bit rank in 8 bytes
    assert NMPacked.from_dense(x, 32, 64, "index").nbytes == 32 * 4 + 8
