"""Bit-level packing shared by the formats (one convention everywhere).

**Bit order.** A bitstream is a 1-D ``uint8`` array; bit ``k`` of the stream is bit ``k % 8``
of byte ``k // 8`` counting from the least significant bit (numpy's
``packbits(..., bitorder="little")``). A ``w``-bit code stored at bit offset ``o`` occupies
stream bits ``o .. o+w-1``, least significant bit first.

**Index dtypes.** Index arrays use the narrowest signed integer that holds their largest
value: int16 up to 32767, int32 up to 2**31-1, else int64 (signed so every torch op and
every safetensors reader handles them).
"""
from __future__ import annotations

import numpy as np
import torch


def index_dtype(max_value: int) -> torch.dtype:
    """The narrowest signed dtype that stores indices in ``[0, max_value]``."""
    if max_value <= 32767:
        return torch.int16
    if max_value <= 2**31 - 1:
        return torch.int32
    return torch.int64


def width_for(count: int) -> int:
    """Bits for a code in ``[0, count)``: ``ceil(log2 count)`` (0 when count <= 1)."""
    return max(int(count) - 1, 0).bit_length()


def pack_codes(codes: "np.ndarray | torch.Tensor", width: int) -> torch.Tensor:
    """Pack non-negative integers (< 2**width) as consecutive ``width``-bit codes.

    Returns ``ceil(codes.size * width / 8)`` bytes (uint8, 1-D); trailing bits are zero.
    """
    arr = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    arr = arr.reshape(-1).astype(np.uint64, copy=False)
    if width == 0 or arr.size == 0:
        return torch.zeros((arr.size * width + 7) // 8, dtype=torch.uint8)
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((arr[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))


def unpack_codes(stream: "np.ndarray | torch.Tensor", width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int64."""
    data = stream.numpy() if isinstance(stream, torch.Tensor) else np.asarray(stream)
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(data.reshape(-1), count=count * width, bitorder="little")
    bits = bits.reshape(count, width).astype(np.int64)
    return (bits << np.arange(width, dtype=np.int64)).sum(axis=1)


def packed_nbytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """INT4 codes (int8 in [-8, 7], shape (rows, k)) -> uint8 (rows, ceil(k/2)).

    Column ``2j`` goes to the low nibble of byte ``j``, column ``2j+1`` to the high nibble,
    each as 4-bit two's complement (``code & 0xF``); an odd last column leaves the high
    nibble zero.
    """
    rows, k = codes.shape
    u = codes.numpy().view(np.uint8) & np.uint8(0xF)
    if k % 2:
        u = np.concatenate([u, np.zeros((rows, 1), dtype=np.uint8)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << np.uint8(4))))


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int8 codes in [-8, 7] of shape (rows, k)."""
    data = packed.numpy()
    both = np.empty((data.shape[0], 2 * data.shape[1]), dtype=np.uint8)
    both[:, 0::2] = data & np.uint8(0xF)
    both[:, 1::2] = data >> np.uint8(4)
    signed = (both[:, :k] ^ np.uint8(8)).view(np.int8) - np.int8(8)  # 4-bit two's complement
    return torch.from_numpy(np.ascontiguousarray(signed))
