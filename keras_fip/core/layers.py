"""Walking a model's layers: nested models, and the sub-layers a custom layer holds.

Keras lists a model's own layers (`model.layers`) but not the sub-layers a layer builds in
its constructor (a user's transformer block, MultiHeadAttention's projections, a KerasHub
task's preprocessor). These functions find them as Keras's own tracking does: every layer
held by an attribute, directly or in a list, tuple or dict.
"""

import keras


def sublayers(layer):
    """The layers `layer` holds directly: a model's `layers`; for any other layer, every layer
    held by an attribute (alone, or in a list, tuple or dict), each once.

    Args:
        layer: A `keras.layers.Layer` (a model included).

    Returns:
        A list of layers.

    Examples:

        >>> block = keras.Sequential([keras.layers.Dense(2), keras.layers.Dense(3)])
        >>> [type(child).__name__ for child in sublayers(block)]
        ['Dense', 'Dense']
    """
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    children, seen = [], {id(layer)}
    for value in vars(layer).values():
        if isinstance(value, dict):
            items = value.values()
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            items = (value,)
        for item in items:
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                seen.add(id(item))
                children.append(item)
    return children


def all_layers(model, include_self=False):
    """Every layer under `model`, depth first, each once (nested models and sub-layers too).

    Args:
        model: A `keras.Model` or layer.
        include_self: Whether `model` itself comes first. Defaults to `False`.

    Returns:
        A list of layers.

    Examples:

        >>> inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        >>> outer = keras.Sequential([keras.Input((2,)), inner, keras.layers.Dense(1)])
        >>> len(all_layers(outer))
        3
    """
    seen, ordered = set(), []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        ordered.append(layer)
        for child in sublayers(layer):
            visit(child)

    visit(model)
    return ordered if include_self else ordered[1:]
