"""`BitFlips`: single-bit faults in stored weights (float32 or int8)."""

import keras
import numpy as np

from keras_fip.operations.faults import bits as bits_lib
from keras_fip.operations.faults.fault import Fault


@keras.saving.register_keras_serializable(package="keras_fip")
class BitFlips(Fault):
    """Flips one bit in each of `count` distinct weights, as fault-injection tools do.

    The fault model of PyTorchFI and TensorFI2 (an extension beyond the resilience
    papers): `count` distinct free weights are drawn (a seeded permutation's prefix) and
    one bit of each, at a random position among `bits`, is flipped in its float32
    representation, or in its int8 code (`format="int8"`: symmetric per-tensor scale
    max|w|/127; the flipped weight becomes its dequantised code, the other weights keep
    their float values). The record lists every flip (`"bits"`: variable, index, bit,
    value before and after).

    Args:
        count: Number of weights (one bit each) to flip. Defaults to `1`.
        bits: Bits a flip may hit: `None` (any), `"sign"`, `"exponent"`, `"mantissa"`
            (float32 only) or a bit index. Defaults to `None`.
        format: The storage format flipped: `"float32"` or `"int8"`. Defaults to
            `"float32"`.
        layers: Names of the layers whose weights may be hit, or `None` for all.
            Defaults to `None`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> damage = keras_fip.Damage(BitFlips(count=3, bits="sign"), seed=0)
        >>> damaged = damage(model)
        >>> [flip["bit"] for flip in damage.history["bits"]]
        [31, 31, 31]
    """

    name = "bit_flips"

    def __init__(self, count=1, *, bits=None, format="float32", layers=None):
        super().__init__(layers=layers)
        self.count = self.check_number(count, "count", low=1, low_inclusive=True, integer=True)
        self.format = self.check_choice(format, "format", bits_lib.FORMATS)
        if bits is not None:
            width = bits_lib.num_bits(format)
            names = bits_lib.BIT_CLASSES if format == "float32" else ("sign",)
            valid = (
                bits in names
                if isinstance(bits, str)
                else (
                    isinstance(bits, (int, np.integer))
                    and not isinstance(bits, bool)
                    and 0 <= bits < width
                )
            )
            if not valid:
                raise ValueError(
                    f"`bits` must be None, one of {list(names)} or a bit index in "
                    f"[0, {width}) for format={format!r}. Received: bits={bits!r}"
                )
            bits = bits if isinstance(bits, str) else int(bits)
        self.bits = bits

    def check(self, model):
        variables = self.variables_of(model)
        self.number(
            None,
            self.count,
            sum(f.size for f in self.free_indices(model, variables)),
            "free weights",
        )

    def apply(self, model, inputs, labels, rng, seed):
        variables = self.variables_of(model)
        free = self.free_indices(model, variables)
        how_many = lambda total: self.number(None, self.count, total, "free weights")
        chosen = self.draw(free, rng, how_many)
        positions = np.asarray(bits_lib.bit_positions(self.bits, self.format))
        flips = []
        for variable, indices in zip(variables, chosen):
            if indices.size == 0:
                continue
            values = variable.numpy().astype(np.float32)
            drawn = rng.choice(positions, size=indices.size)
            old = values.reshape(-1)[indices].copy()
            if self.format == "float32":
                new = bits_lib.flip_float32(old, drawn)
            else:
                new = bits_lib.flip_int8(old, drawn, bits_lib.int8_scale(values))
            values.reshape(-1)[indices] = new
            variable.assign(values.astype(variable.dtype))
            flips.extend(
                {
                    "variable": variable.path,
                    "index": int(i),
                    "bit": int(b),
                    "before": float(o),
                    "after": float(n),
                }
                for i, b, o, n in zip(indices, drawn, old, new)
            )
        return {"bits": flips, "num_hit": len(flips), "format": self.format}, {}

    def get_config(self):
        return {
            "count": self.count,
            "bits": self.bits,
            "format": self.format,
            **super().get_config(),
        }
