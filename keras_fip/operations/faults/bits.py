"""Bit-level faults in stored weights: float32 and int8 bit flips (PyTorchFI's fault names).

Pure numpy helpers of `keras_fip.faults.BitFlips`. A float32 weight is flipped in
its IEEE-754 representation (bit 31 the sign, bits 23-30 the exponent, bits 0-22 the
mantissa). An int8 flip acts on the weight's symmetric per-tensor int8 code
`q = round(w / s)`, `s = max|w| / 127` (bit 7 the two's-complement sign, bits 0-6 the
magnitude), and writes back the dequantised `q' · s`.
"""

import numpy as np

BIT_CLASSES = ("sign", "exponent", "mantissa")
FORMATS = ("float32", "int8")
# Bit positions of each class, per storage format.
_FLOAT32_BITS = {"sign": (31,), "exponent": tuple(range(23, 31)), "mantissa": tuple(range(0, 23))}
_INT8_BITS = {"sign": (7,)}


def num_bits(bit_format):
    """Bits per stored weight: 32 for `"float32"`, 8 for `"int8"`."""
    return 32 if bit_format == "float32" else 8


def bit_positions(bits, bit_format):
    """The bit positions a flip may hit: `bits` is `None` (any), a class name or an int.

    Args:
        bits: `None`, `"sign"`, `"exponent"`, `"mantissa"` (float32 only) or a bit index.
        bit_format: `"float32"` or `"int8"`.

    Returns:
        A tuple of bit indices.
    """
    if bits is None:
        return tuple(range(num_bits(bit_format)))
    if isinstance(bits, str):
        table = _FLOAT32_BITS if bit_format == "float32" else _INT8_BITS
        return table[bits]
    return (int(bits),)


def flip_float32(values, bits):
    """Flips bit `bits[i]` of float32 `values[i]`; returns the new float32 values."""
    words = np.asarray(values, dtype=np.float32).copy().view(np.uint32)
    words ^= np.left_shift(np.uint32(1), np.asarray(bits, dtype=np.uint32))
    return words.view(np.float32)


def int8_scale(weights):
    """The symmetric per-tensor int8 scale `max|w| / 127` (1 for an all-zero tensor)."""
    peak = float(np.max(np.abs(weights))) if np.size(weights) else 0.0
    return peak / 127.0 if peak > 0 else 1.0


def flip_int8(values, bits, scale):
    """Flips bit `bits[i]` of the int8 code of `values[i]` (scale `scale`); dequantises."""
    codes = np.clip(np.round(np.asarray(values, np.float64) / scale), -127, 127)
    codes = codes.astype(np.int8).view(np.uint8)
    codes ^= np.left_shift(np.uint8(1), np.asarray(bits, dtype=np.uint8))
    return (codes.view(np.int8).astype(np.float64) * scale).astype(np.float32)
