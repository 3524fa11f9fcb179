"""Argument checks shared by the model builders."""


def check_input_shape(input_shape, rank=None):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or (rank is not None and len(shape) != rank)
    ):
        expected = (
            f"a tuple of {rank} positive integers" if rank else "a tuple of positive integers"
        )
        raise ValueError(f"`input_shape` must be {expected}. Received: input_shape={input_shape!r}")
    return shape


def check_positive_int(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")
    return value


def check_width_multiplier(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(
            f"`width_multiplier` must be a positive number. Received: width_multiplier={value!r}"
        )
    return float(value)


def scaled(width, multiplier):
    return max(1, int(round(width * multiplier)))
