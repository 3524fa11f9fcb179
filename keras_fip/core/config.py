"""`Config`: the small serialisable objects that hold an operation's knobs.

A step rule, a fault model, a repair method, a pruning schedule: each is a class whose
constructor arguments are its whole state. `Config` gives them what Keras gives its own
configurable objects (`get_config` / `from_config`), plus equality and a readable `repr`
from the config, so that one definition of the arguments serves all four. `resolve` turns
what a user passes for such an argument (the object, its config, `None`) into the object.
"""

import inspect

import keras


class Config:
    """Base of objects defined by their constructor arguments.

    A subclass stores its arguments and returns them from `get_config()`; `from_config`,
    `==`, `hash` and `repr` follow from that. Register a subclass with
    `@keras.saving.register_keras_serializable(package="keras_fip")` so that
    `keras.saving.serialize_keras_object` round-trips it.

    Examples:

        >>> class Decay(Config):
        ...     def __init__(self, rate=0.5):
        ...         self.rate = rate
        ...     def get_config(self):
        ...         return {"rate": self.rate}
        >>> Decay(0.1)
        Decay(rate=0.1)
        >>> Decay.from_config(Decay(0.1).get_config()) == Decay(0.1)
        True
    """

    def get_config(self):
        """The constructor arguments, as a dict."""
        return {}

    @classmethod
    def from_config(cls, config):
        """Re-creates the object from `get_config()`."""
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self)))

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


def resolve(value, cls, argument, default=None):
    """The `cls` object a user means by `value`.

    Args:
        value: An instance of `cls`, its `get_config()`, its
            `keras.saving.serialize_keras_object` form, or `None`.
        cls: The `Config` subclass expected.
        argument: The argument's name, for the error.
        default: What `None` gives: a `cls` instance, or `None` for `cls()`.
            Defaults to `None`.

    Returns:
        An instance of `cls`.

    Raises:
        ValueError: if `value` is none of these.

    Examples:

        >>> class Decay(Config):
        ...     def __init__(self, rate=0.5):
        ...         self.rate = rate
        ...     def get_config(self):
        ...         return {"rate": self.rate}
        >>> resolve({"rate": 0.1}, Decay, "decay")
        Decay(rate=0.1)
        >>> resolve(None, Decay, "decay")
        Decay(rate=0.5)
    """
    if value is None:
        return cls() if default is None else default
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        if "class_name" in value:
            value = keras.saving.deserialize_keras_object(value)
        elif set(value) <= set(inspect.signature(cls).parameters):
            value = cls.from_config(value)
        if isinstance(value, cls):
            return value
    raise ValueError(
        f"`{argument}` must be a `{cls.__name__}`, its config, or None. "
        f"Received: {argument}={value!r}"
    )
