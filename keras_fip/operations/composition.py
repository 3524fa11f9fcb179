"""`Chain` and `chain`: operations compose into an operation.

The module is named `composition` so that the function `keras_fip.operations.chain` does not
shadow it (a module `operations/chain.py` would be hidden behind the function of its name).
"""

import keras

from keras_fip.operations.base import Operation


@keras.saving.register_keras_serializable(package="keras_fip")
class Chain(Operation):
    """Applies operations one after the other: `Chain([a, b])(m)` is `b(a(m))`.

    A chain is an `Operation` too, so it can be chained, serialised and called like any
    other. The input model is never changed (each operation works on its own copy).
    `paths` and `histories` hold each operation's `path` and `history` after a call;
    `path` and `history` are those of the last operation that walked.

    Args:
        operations: A non-empty list of `Operation`s (or their serialised configs).
        name: The chain's name. Defaults to `None`.

    Examples:

        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.rand(16, 4).astype("float32")
        >>> settings = keras_fip.Walk(steps=2, batch_size=8, verbose=0)
        >>> walk = keras_fip.Isofunctional(data=x, walk=settings)
        >>> both = Chain([walk, keras_fip.Isofunctional.from_config(walk.get_config())])
        >>> moved = both(model)
        >>> len(both.paths), moved is model
        (2, False)
    """

    def __init__(self, operations, name=None):
        super().__init__(name=name)
        if not isinstance(operations, (list, tuple)) or not operations:
            raise ValueError(
                "`operations` must be a non-empty list of keras_fip Operations. "
                f"Received: operations={operations!r}"
            )
        resolved = []
        for index, operation in enumerate(operations):
            if isinstance(operation, dict):
                operation = keras.saving.deserialize_keras_object(operation)
            if not isinstance(operation, Operation):
                raise ValueError(
                    "`operations` must be a non-empty list of keras_fip Operations. "
                    f"Received: operations[{index}]={operation!r}"
                )
            resolved.append(operation)
        self.operations = resolved
        self.paths = []
        self.histories = []

    def __call__(self, model):
        self.paths, self.histories = [], []
        self.path, self.history = None, None
        for operation in self.operations:
            model = operation(model)
            self.paths.append(operation.path)
            self.histories.append(operation.history)
            if operation.path is not None:
                self.path, self.history = operation.path, operation.history
        return model

    def call(self, model):
        for operation in self.operations:
            model = operation.call(model)
        return model

    def get_config(self):
        return {
            **super().get_config(),
            "operations": [
                keras.saving.serialize_keras_object(operation) for operation in self.operations
            ],
        }


def chain(*operations, name=None):
    """Composes operations into one: `chain(a, b)(model)` equals `b(a(model))`.

    Args:
        *operations: `Operation`s, applied left to right.
        name: The chain's name. Defaults to `None`.

    Returns:
        A `Chain`, itself an `Operation`.

    Examples:

        >>> x = np.zeros((8, 2), "float32")
        >>> walk = keras_fip.Isofunctional(data=x, walk=keras_fip.Walk(steps=1))
        >>> isinstance(chain(walk, walk), Operation)
        True
    """
    return Chain(list(operations), name=name)
