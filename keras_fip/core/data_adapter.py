"""Normalises `data=` arguments into the batched `tf.data` pipeline the FIP trainer eats."""

import keras
import numpy as np
import tensorflow as tf


def _describe(value):
    if hasattr(value, "shape"):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    return repr(value)


def _materialize(dataset, name):
    """Reads a finite `tf.data.Dataset` of `x`, `(x,)`, `(x, y)` elements into numpy (`x`
    may be a dict or list of inputs, for a model with several)."""
    spec = dataset.element_spec
    is_batched = False
    first = tf.nest.flatten(spec)[0]
    if first.shape.rank is not None and first.shape.rank >= 1 and first.shape[0] is None:
        is_batched = True
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"`{name}` must be a finite `tf.data.Dataset` (it is read once). "
            f"Received: {name} with infinite cardinality"
        )
    elements = list(dataset.as_numpy_iterator())
    if not elements:
        raise ValueError(f"`{name}` must not be empty. Received: {name}={dataset}")
    if isinstance(elements[0], tuple):
        columns = list(zip(*elements))
    else:
        columns = [elements]
    combine = np.concatenate if is_batched else np.stack
    return tuple(
        tf.nest.map_structure(lambda *parts: combine(parts, axis=0), *column) for column in columns
    ), not is_batched


def normalize_data(data, name="data", require_labels=False, model=None, check_classes=None):
    """Turns an array, an `(x, y)` tuple or a finite `tf.data.Dataset` into numpy arrays.

    For a model with several inputs, `x` is a dict of arrays keyed by the inputs' names
    or a list of arrays in their order, as Keras takes them (`model.predict(x)`): so a
    list of arrays is always inputs, and labels come in an `(x, y)` tuple.

    Labels are class indices, as every operation reads them (the sparse categorical
    cross-entropy): integers, or floats holding integers, ≥ 0, one per example (an
    `(N, 1)` column is read as `(N,)`). One-hot labels, as `keras.utils.to_categorical`
    makes them for `categorical_crossentropy`, are turned into class indices here, once,
    so every operation sees the same integer labels. Anything else (NaN, fractional or
    negative values, rows that are not one-hot such as probabilities, a wrong length)
    raises a `ValueError` naming `name`. Without a model, labels of several axes that are
    not one-hot are taken as class indices per position when they hold integers ≥ 0.

    Args:
        data: A numpy array (or anything `np.asarray` accepts) of inputs, a dict or list of
            arrays of inputs, a tuple `(x,)` or `(x, y)`, or a finite `tf.data.Dataset`
            of `x`, `(x,)` or `(x, y)` elements, batched or not.
        name: The argument name used in error messages. Defaults to `"data"`.
        require_labels: Whether `y` must be present. Defaults to `False`.
        model: The model the inputs feed, if known. A dataset batched with a static batch
            size (`dataset.batch(n, drop_remainder=True)`, as TPUs need), whose elements
            look like single examples with one axis too many, is then un-batched: when
            every input array has one axis more than its model input (and the same
            trailing shape), the first two axes of the inputs and the labels are merged.
            Without a model such a dataset reads as examples of shape `(n, ...)`.
            With a model of one output, labels are also read against it: class indices
            of shape `(N,)` (or `(N, ...)` for per-position outputs `(N, ..., C)`), or
            one-hot rows of its shape. Defaults to `None`.
        check_classes: Whether each class index must be one of the model's `C` outputs
            (`0..C-1`; one-hot rows then have width `C`), checked for a model with one
            output of known width `C > 1`. `None` checks the labels of data that may
            come without them (`require_labels=False`: data whose outputs a model keeps
            or on which it is scored), not those a task requires, which may index
            outputs the operation adds (`keras_fip.ContinualLearn` grows the head and
            checks its labels itself). Defaults to `None`.

    Returns:
        A tuple `(x, y)`: `x` a numpy array (or a dict or list of them), `y` an int64
        array of class indices or `None` when there are no labels.

    Examples:

        >>> x, y = normalize_data((np.zeros((4, 2)), np.arange(4)))
        >>> x.shape, y.tolist()
        ((4, 2), [0, 1, 2, 3])
        >>> _, y = normalize_data((np.zeros((3, 2)), np.eye(4)[[2, 0, 3]]))
        >>> y.tolist()
        [2, 0, 3]
    """
    maybe_batched = False
    if isinstance(data, tf.data.Dataset):
        data, maybe_batched = _materialize(data, name)
    if isinstance(data, tuple):
        if len(data) not in (1, 2):
            raise ValueError(
                f"`{name}` must be `x`, `(x,)` or `(x, y)`. "
                f"Received: {name}=tuple of length {len(data)}"
            )
        x = data[0]
        y = data[1] if len(data) == 2 else None
    else:
        x, y = data, None
    if is_structured(x):
        x = normalize_inputs(x, name)
    else:
        try:
            x = np.asarray(x)
        except Exception as error:
            raise ValueError(
                f"`{name}` must hold an array of inputs. Received: {name}={_describe(x)}"
            ) from error
    if maybe_batched and model is not None and _statically_batched(model, x):
        x = tf.nest.map_structure(lambda array: array.reshape((-1,) + array.shape[2:]), x)
        if y is not None:
            y = np.asarray(y)
            y = y.reshape((-1,) + y.shape[2:])
    if not is_structured(x):
        _check_inputs_array(x, name)
    if check_classes is None:
        check_classes = not require_labels
    return x, _normalize_labels(x, y, name, require_labels, model, check_classes)


def _statically_batched(model, x):
    """Whether every array of `x` is a stack of batches of the model's inputs: one axis
    more than its input, with the input's trailing shape."""
    try:
        pairs = _matching_inputs(model, x, "data")
    except ValueError:
        return False
    if not pairs:
        return False
    for _, array, tensor in pairs:
        example = tuple(tensor.shape[1:])
        if array.ndim != len(example) + 2 or any(
            e is not None and e != r for e, r in zip(example, array.shape[2:])
        ):
            return False
    return True


def _check_inputs_array(x, name):
    """Raises a `ValueError` naming `name` unless `x` is a non-empty numeric (or boolean)
    array with a batch axis and no NaN or Inf."""
    if x.ndim < 1 or x.shape[0] == 0 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(
            f"`{name}` must hold a non-empty numeric array of inputs with a batch axis. "
            f"Received: {name}={_describe(x)} with dtype {x.dtype}"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise ValueError(
            f"`{name}` must not contain NaN or Inf values. Received: {name} with "
            f"{int(np.sum(~np.isfinite(x)))} non-finite entries"
        )


def _normalize_labels(x, y, name, require_labels, model=None, check_classes=False):
    """Labels as int64 class indices (see `normalize_data`), or `None`; a `ValueError`
    naming `name` for anything that is not a label array of `x`."""
    if y is None:
        if require_labels:
            raise ValueError(
                f"`{name}` must be an `(x, y)` tuple or a dataset of `(x, y)` pairs with "
                f"labels. Received: {name}={_describe(x)} without labels"
            )
        return None
    try:
        y = np.asarray(y)
    except Exception as error:
        raise ValueError(
            f"`{name}` labels must be an array of class indices. Received: y={_describe(y)}"
        ) from error
    if not (
        np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == bool
    ):
        raise ValueError(
            f"`{name}` labels must be integer class indices or one-hot rows. Received: "
            f"{name} with labels of dtype {y.dtype}"
        )
    if y.shape[:1] != (num_examples(x),):
        raise ValueError(
            f"`{name}` must have as many labels as inputs. Received: {name} with "
            f"{num_examples(x)} inputs and y of shape {y.shape}"
        )
    if np.issubdtype(y.dtype, np.floating):
        finite = np.isfinite(y)
        if not np.all(finite):
            where = np.unravel_index(int(np.argmin(finite)), y.shape)
            raise ValueError(
                f"`{name}` labels must not contain NaN or Inf values. Received: {name} "
                f"with {int(y.size - np.count_nonzero(finite))} non-finite labels, such as "
                f"{y[where].item()!r} at {_index_text(where)}"
            )
    output = _output_shape(model)
    y, width = _class_indices(y, name, output)
    if check_classes and output is not None and output[-1] is not None and output[-1] > 1:
        _check_classes(y, width, name, model.name, output[-1])
    return y


def _output_shape(model):
    """The shape of the model's one output (batch axis first), or `None` when unknown
    (no model, several outputs, a subclassed model)."""
    if model is None:
        return None
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or len(outputs) != 1:
        return None
    return tuple(outputs[0].shape)


def _one_hot_rows(y):
    """Whether every row of `y` along its last axis is one-hot (one 1, zeros elsewhere)."""
    return bool(np.all((y == 0) | (y == 1)) and np.all(np.count_nonzero(y, axis=-1) == 1))


def _class_indices(y, name, output):
    """`(labels as int64 class indices, width of their one-hot rows or None)`.

    With the model's `output` shape `(N, ..., C)`, class indices have its shape without
    the class axis and one-hot rows its rank; without it, any array of non-negative
    integers is taken as indices (per position when it has several axes)."""
    rank = None if output is None else len(output)
    width = None
    if y.ndim >= 2 and (rank is None or y.ndim == rank):
        if y.shape[-1] == 1:
            y = y[..., 0]  # A column of indices, as `sparse_categorical_crossentropy` reads.
        elif _one_hot_rows(y):
            width = int(y.shape[-1])
            return np.argmax(y, axis=-1).astype("int64"), width
        elif rank is not None or not np.all(y == np.floor(y)) or np.any(y < 0):
            bad = ~(np.all((y == 0) | (y == 1), axis=-1) & (np.count_nonzero(y, axis=-1) == 1))
            row = tuple(int(i) for i in np.argwhere(bad)[0])
            values = np.asarray(y[row], "float64")
            hint = ""
            if np.all(values >= 0) and abs(float(np.sum(values)) - 1.0) < 1e-3:
                hint = (
                    " (probabilities: operations train on class indices; pass "
                    "`np.argmax(y, axis=-1)` for the most likely class)"
                )
            raise ValueError(
                f"`{name}` labels must be class indices or one-hot rows (a single 1, zeros "
                f"elsewhere). Received: {name} with labels of shape {y.shape} whose row "
                f"{row if len(row) > 1 else row[0]} is {np.round(values, 4)[:10].tolist()}"
                f"{hint}"
            )
    if output is not None:
        expected = (y.shape[0],) + tuple(output[1:-1])
        if y.ndim != len(expected) or any(
            e is not None and e != r for e, r in zip(expected[1:], y.shape[1:])
        ):
            raise ValueError(
                f"`{name}` labels must be class indices of shape "
                f"{_shape_text(expected)} or one-hot rows of shape "
                f"{_shape_text(expected + (output[-1],))} for a model with outputs of "
                f"shape {_shape_text(output)}. Received: {name} with labels of shape "
                f"{y.shape}"
            )
    if np.issubdtype(y.dtype, np.floating):
        fractional = y != np.floor(y)
        if np.any(fractional):
            where = np.unravel_index(int(np.argmax(fractional)), y.shape)
            raise ValueError(
                f"`{name}` labels must be integer class indices. Received: {name} with the "
                f"fractional label {y[where].item()!r} at {_index_text(where)}"
            )
    if y.size and y.min() < 0:
        where = np.unravel_index(int(np.argmin(y)), y.shape)
        raise ValueError(
            f"`{name}` labels must be class indices ≥ 0. Received: {name} with the label "
            f"{_number(y[where])} at {_index_text(where)}"
        )
    return y.astype("int64"), width


def _check_classes(y, width, name, model_name, num_outputs):
    """Raises a `ValueError` unless the class indices `y` (and the one-hot rows they came
    from) are outputs of a model with `num_outputs` outputs."""
    if width is not None and width != num_outputs:
        raise ValueError(
            f"`{name}` one-hot labels must have one column per output of model "
            f"`{model_name}` ({num_outputs}). Received: {name} with one-hot labels of "
            f"width {width}"
        )
    if y.size and y.max() >= num_outputs:
        where = np.unravel_index(int(np.argmax(y)), y.shape)
        raise ValueError(
            f"`{name}` labels must be class indices of the {num_outputs} outputs of model "
            f"`{model_name}`, in 0..{num_outputs - 1}. Received: {name} with the label "
            f"{int(y[where])} at {_index_text(where)}"
        )


def _shape_text(shape):
    return (
        "("
        + ", ".join("N" if i == 0 else str(d) for i, d in enumerate(shape))
        + (",)" if len(shape) == 1 else ")")
    )


def _index_text(where):
    where = tuple(int(i) for i in where)
    return f"index {where[0]}" if len(where) == 1 else f"index {where}"


def is_structured(x):
    """Whether `x` holds the inputs of a model with several inputs: a dict of arrays (by
    input name) or a list or tuple of arrays (in the model's input order; a list of
    Python lists or numbers is one array, as `np.asarray` reads it)."""
    if isinstance(x, dict):
        return True
    return isinstance(x, (list, tuple)) and bool(x) and all(hasattr(item, "shape") for item in x)


def normalize_inputs(x, name):
    """Inputs of a model with several, checked: a dict (or list) of non-empty numeric,
    finite numpy arrays of one batch length.

    Args:
        x: A dict of arrays keyed by input name, or a list or tuple of arrays.
        name: The argument name used in error messages (`name['key']` for an input).

    Returns:
        The dict, or a list, of numpy arrays.
    """
    if not x:
        raise ValueError(
            f"`{name}` must hold at least one input array. Received: {name} with an "
            f"empty {type(x).__name__} of inputs"
        )
    keys = list(x) if isinstance(x, dict) else list(range(len(x)))
    arrays = {}
    for key in keys:
        value = x[key]
        label = f"{name}[{key!r}]"
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(
                f"`{label}` must be an array: inputs nest one level (a dict or list of "
                f"arrays). Received: {label}={type(value).__name__}"
            )
        try:
            value = np.asarray(value)
        except Exception as error:
            raise ValueError(
                f"`{label}` must be an array of inputs. Received: {label}={_describe(value)}"
            ) from error
        _check_inputs_array(value, label)
        arrays[key] = value
    lengths = {key: int(value.shape[0]) for key, value in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"`{name}` must hold inputs of one batch length. Received: {name} with "
            f"lengths {lengths}"
        )
    return arrays if isinstance(x, dict) else [arrays[key] for key in keys]


def num_examples(x):
    """The number of examples of inputs `x` (an array, or a dict or list of arrays)."""
    return int(np.shape(tf.nest.flatten(x)[0])[0])


def take(x, index):
    """The examples `index` (a slice or an index array) of every array of inputs `x`."""
    return tf.nest.map_structure(lambda array: array[index], x)


def all_finite(x):
    """Whether every float array of inputs `x` (one array, or a dict or list) is finite."""
    return all(
        np.all(np.isfinite(array))
        for array in tf.nest.flatten(as_arrays(x))
        if np.issubdtype(np.asarray(array).dtype, np.floating)
    )


def float32_inputs(x):
    """Inputs as the walks feed them: one array as float32; in a dict or list of inputs
    (a model with several), the float arrays as float32 and the rest (token ids, masks)
    as they are."""
    if not is_structured(x):
        return np.asarray(x, "float32")
    return tf.nest.map_structure(
        lambda a: a.astype("float32") if np.issubdtype(a.dtype, np.floating) else a, x
    )


def as_arrays(x):
    """Inputs as numpy: one array, or the dict or list of arrays as it is."""
    return x if is_structured(x) else np.asarray(x)


def concatenate(parts):
    """Inputs `parts` (arrays, or dicts or lists of arrays alike) joined along the batch."""
    return tf.nest.map_structure(lambda *arrays: np.concatenate(arrays, axis=0), *parts)


def model_example_shape(model):
    """The shape of one input example of a single-input model, or `None` if unknown."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs or len(inputs) != 1:
        return None
    return tuple(inputs[0].shape[1:])


def model_inputs(model):
    """The model's input `KerasTensor`s as built (a dict by name, a list, or one), or
    `None` when unknown (subclassed models)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    try:
        structure = model.input  # A functional model's inputs as built (a dict, a list).
    except (AttributeError, ValueError):
        structure = None  # A Sequential model that was never called: one input.
    if isinstance(structure, dict):
        return dict(structure)
    return inputs[0] if len(inputs) == 1 else list(inputs)


def _matching_inputs(model, x, name):
    """Pairs `(label, array, input)` of the arrays of `x` with the model's inputs, or
    `None` when the model's inputs are unknown. Raises a `ValueError` naming `name` when
    the structure of `x` cannot feed the model."""
    inputs = model_inputs(model)
    if inputs is None:
        return None
    if not is_structured(x):
        if is_structured(inputs):
            names = list(inputs) if isinstance(inputs, dict) else [tensor.name for tensor in inputs]
            raise ValueError(
                f"`{name}` must hold one array per input of model `{model.name}` (a dict "
                f"keyed by {names}, or a list in that order). Received: {name}="
                f"{_describe(x)}"
            )
        return [(name, x, inputs)]
    if not is_structured(inputs):
        raise ValueError(
            f"`{name}` must be one array: model `{model.name}` has one input. Received: "
            f"{name}={type(x).__name__} of {len(x)} arrays"
        )
    if isinstance(x, dict):
        by_name = inputs if isinstance(inputs, dict) else {tensor.name: tensor for tensor in inputs}
        if set(x) != set(by_name):
            raise ValueError(
                f"`{name}` must hold one array per input of model `{model.name}`, keyed "
                f"{sorted(by_name)}. Received: {name} with keys {sorted(x)}"
            )
        return [(f"{name}[{key!r}]", x[key], by_name[key]) for key in x]
    ordered = list(inputs.values()) if isinstance(inputs, dict) else inputs
    if len(x) != len(ordered):
        raise ValueError(
            f"`{name}` must hold {len(ordered)} arrays, one per input of model "
            f"`{model.name}`. Received: {name} with {len(x)} arrays"
        )
    return [
        (f"{name}[{index}]", array, tensor) for index, (array, tensor) in enumerate(zip(x, ordered))
    ]


def check_inputs_match_model(model, x, name="data"):
    """Raises a `ValueError` if `x` does not match the model's inputs.

    Checked for models with known inputs (Sequential and functional models): one array
    for one input; for several, a dict keyed by the inputs' names or a list in their
    order, each array of its input's shape. Token ids too: an input declared with an
    integer dtype must hold integers (floats holding integers are accepted, as the
    keras.io examples feed them), and an input read by an `Embedding` layer (directly,
    or by a layer or nested model that holds one, as custom layers and KerasHub
    backbones do) must hold integers in `[0, input_dim)`, which the `Embedding` itself
    does not check (TensorFlow raises on a CPU naming a graph node, and returns zeros on
    a GPU). The ids are read once, with numpy; inputs no `Embedding` reads and no
    integer input are not read at all.

    Args:
        model: A built `keras.Model`.
        x: A numpy array of inputs, or a dict or list of them.
        name: The argument name used in error messages. Defaults to `"data"`.
    """
    pairs = _matching_inputs(model, x, name)
    for label, array, tensor in pairs or ():
        expected = tuple(tensor.shape[1:])
        received = tuple(array.shape[1:])
        if len(expected) != len(received) or any(
            e is not None and e != r for e, r in zip(expected, received)
        ):
            raise ValueError(
                f"`{label}` must hold inputs of shape (batch, "
                f"{', '.join(str(e) for e in expected)}) to match model `{model.name}`. "
                f"Received: {label} with inputs of shape {array.shape}"
            )
    for label, array, tensor in pairs or ():
        _check_token_ids(model, label, array, tensor)


def _input_tensors(value):
    """The `KerasTensor`s of a layer's `input` (one, or a structure of them)."""
    return [tensor for tensor in keras.tree.flatten(value) if isinstance(tensor, keras.KerasTensor)]


def _reads(layer, tensor):
    """Whether `layer` was first called on `tensor` (a nested functional model: whether
    `tensor` is one of its own inputs, which a model built on a backbone's inputs shares
    with it)."""
    try:
        inputs = layer.input
    except (AttributeError, ValueError, TypeError):
        return False  # Never called (or not a graph layer).
    return any(candidate is tensor for candidate in _input_tensors(inputs))


def _descendants(layer):
    """Every layer inside `layer` (sub-layers held as attributes, nested models' layers),
    found by public means: a model's `layers`, a layer's attributes."""
    found, stack, seen = [], [layer], {id(layer)}
    while stack:
        current = stack.pop()
        if isinstance(current, keras.Model):
            children = list(current.layers)
        else:
            children = []
            for value in vars(current).values():
                if isinstance(value, dict):
                    value = list(value.values())
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, keras.layers.Layer):
                        children.append(item)
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def _embedding_readers(model, tensor, prefix=""):
    """`(reader name, [Embedding layers], direct)` for each layer of `model` that reads its
    input `tensor`: an `Embedding` itself (`direct`), or a layer or nested model holding
    `Embedding`s.

    Found from `model.layers` and each layer's `input` (its first call): a Sequential
    model's first layer reads its input; a nested functional model is followed into when
    `tensor` is one of its inputs (a model built on a backbone's inputs) or when it is the
    first layer of a Sequential model and has one input. A layer shared between inputs is
    seen on the one it was first called on; a nested functional model called on other
    tensors than its own inputs is not seen."""
    if isinstance(model, keras.Sequential):
        layers = list(model.layers[:1])
    else:
        layers = [layer for layer in model.layers if _reads(layer, tensor)]
    readers = []
    for layer in layers:
        name = prefix + layer.name
        if isinstance(layer, keras.layers.Embedding):
            readers.append((name, [layer], True))
            continue
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential):
            try:
                inner = list(layer.inputs or ())
            except (AttributeError, ValueError):
                inner = []  # A subclassed model: its Embeddings, below.
            if any(candidate is tensor for candidate in inner):
                readers.extend(_embedding_readers(layer, tensor, name + "/"))
                continue
            if isinstance(model, keras.Sequential) and len(inner) == 1:
                readers.extend(_embedding_readers(layer, inner[0], name + "/"))
                continue
        if isinstance(layer, keras.Sequential):
            readers.extend(_embedding_readers(layer, tensor, name + "/"))
            continue
        embeddings = [
            child for child in _descendants(layer) if isinstance(child, keras.layers.Embedding)
        ]
        if embeddings:
            readers.append((name, embeddings, False))
    return readers


def _check_token_ids(model, label, array, tensor):
    """Raises a `ValueError` naming `label` unless `array`, fed to the model input
    `tensor`, holds integers (an integer input, or one an `Embedding` reads) within the
    `input_dim` of every `Embedding` reading it."""
    readers = _embedding_readers(model, tensor)
    declared = keras.backend.standardize_dtype(tensor.dtype)
    integer = declared == "bool" or "int" in declared
    if not readers and not integer:
        return
    if readers:
        reader = readers[0][0]
        purpose = f"token ids of layer `{reader}`"
    else:
        purpose = f"values of the {declared} input `{tensor.name}` of model `{model.name}`"
    if np.issubdtype(array.dtype, np.floating):
        fractional = array != np.floor(array)
        if np.any(fractional):
            where = tuple(int(i) for i in np.unravel_index(int(np.argmax(fractional)), array.shape))
            raise ValueError(
                f"`{label}` must hold integers: the {purpose}. Received: {label} with the "
                f"fractional value {array[where].item()!r} at index {where}"
            )
    if not readers:
        return
    low, high = array.min(), array.max()
    for reader, embeddings, direct in readers:
        # Where the graph cannot tell which of a layer's `Embedding`s reads the input (a
        # custom layer with a token and a position embedding), the ids are held to the
        # largest `input_dim` among them.
        input_dim = max(int(embedding.input_dim) for embedding in embeddings)
        if low >= 0 and high < input_dim:
            continue
        if direct:
            source = f"the `Embedding` layer `{reader}` (input_dim={input_dim})"
        elif len(embeddings) == 1:
            source = (
                f"layer `{reader}`, whose `Embedding` `{embeddings[0].name}` "
                f"(input_dim={input_dim}) reads it"
            )
        else:
            held = ", ".join(f"`{e.name}` input_dim={int(e.input_dim)}" for e in embeddings)
            source = (
                f"layer `{reader}`, whose `Embedding` layers ({held}) read it: ids are held "
                f"to the largest, input_dim={input_dim}"
            )
        value, bound = (high, f"< {input_dim}") if high >= input_dim else (low, ">= 0")
        raise ValueError(
            f"`{label}` must hold token ids in [0, {input_dim}) for {source}. Received: "
            f"{label} with the id {_number(value)} (ids must be {bound}; received ids from "
            f"{_number(low)} to {_number(high)})"
        )


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def cast_inputs(model, x):
    """Casts float inputs to their model input's dtype (float32 unless the model says so);
    in a dict or list of inputs, each array to its own input's."""
    try:
        pairs = _matching_inputs(model, x, "x")
    except ValueError:
        pairs = None

    def cast(array, tensor):
        if not np.issubdtype(array.dtype, np.floating):
            return array
        dtype = "float32"
        if tensor is not None:
            dtype = keras.backend.standardize_dtype(tensor.dtype)
            if not np.issubdtype(np.dtype(dtype), np.floating):
                dtype = "float32"
        return array.astype(dtype, copy=False)

    if not is_structured(x):
        return cast(x, pairs[0][2] if pairs else None)
    tensors = [pair[2] for pair in pairs] if pairs else [None] * len(x)
    if isinstance(x, dict):
        return {key: cast(x[key], tensor) for key, tensor in zip(x, tensors)}
    return [cast(array, tensor) for array, tensor in zip(x, tensors)]


def reference_outputs(model, x, batch_size):
    """The model's outputs on `x` in inference mode, in batches of `batch_size`.

    Args:
        model: A built `keras.Model`.
        x: A numpy array of inputs, or a dict or list of them.
        batch_size: The batch size, best equal to the FIP step's anchor batch size.

    Returns:
        A numpy array (or structure of arrays) of outputs.
    """
    forward = tf.function(lambda inputs: model(inputs, training=False))
    batches = [
        tf.nest.map_structure(
            lambda t: t.numpy(),
            forward(tf.nest.map_structure(tf.constant, take(x, slice(i, i + batch_size)))),
        )
        for i in range(0, num_examples(x), batch_size)
    ]
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *batches)


def _index_batches(size, batch_size, shuffle, seed):
    """Infinite dataset of index batches of `batch_size` into `size` examples.

    Pass p over the examples is `range(size)` (no shuffle), a fresh random permutation
    (shuffle, no seed), or the stateless permutation of seed `(seed, p)`: not a seed
    generator that advances with every iterator, so any process, under any strategy
    (Keras iterates once more to build under one), resumed or not, sees the same batches.
    The passes are concatenated (the remainder of one pass rolls into the next) and cut
    into batches by `rebatch`, which slices whole passes: no per-example work.
    """
    if shuffle and seed is not None:

        def order(index):
            pass_seed = tf.stack([tf.constant(seed, tf.int64), index])
            return tf.argsort(tf.random.stateless_uniform([size], seed=pass_seed))

    elif shuffle:

        def order(index):
            del index
            return tf.random.shuffle(tf.range(size, dtype=tf.int32))

    else:

        def order(index):
            del index
            return tf.range(size, dtype=tf.int32)

    passes = tf.data.Dataset.range(np.iinfo(np.int64).max).map(order)
    return passes.rebatch(batch_size, drop_remainder=True)


def for_tf_data(structure):
    """A structure of arrays as `tf.data` takes it: its elements cannot hold lists (it
    would stack a list of inputs into one tensor), so lists become tuples, which Keras
    models take as they take lists."""
    if isinstance(structure, dict):
        return {key: for_tf_data(value) for key, value in structure.items()}
    if isinstance(structure, (list, tuple)):
        return tuple(for_tf_data(value) for value in structure)
    return structure


def _columns(tensors):
    """A structure of arrays as tensors for `tf.data` (`for_tf_data`)."""
    return tf.nest.map_structure(tf.convert_to_tensor, for_tf_data(tensors))


def _gather(columns, indices):
    """The rows `indices` of every array in the structure `columns`."""
    return tf.nest.map_structure(lambda column: tf.gather(column, indices), columns)


def repeated_batches(tensors, batch_size, shuffle=True, seed=None):
    """Infinite batches of the structure of arrays `tensors`, gathered by `_index_batches`.

    The pipeline of every custom training loop in keras_fip: with a `seed`, pass p is the
    stateless permutation of `(seed, p)`, so one process, any `tf.distribute` strategy
    (`keras_fip.distribute.distribute_dataset` splits each batch over the replicas) and a
    resumed run see the same global batches, which `Dataset.shuffle(seed=...)` does not
    promise once a strategy rebuilds the pipeline. Each batch is one gather per array
    (prefetched), from arrays held once in memory; the last, partial batch of a pass rolls
    into the next pass, so every batch has `batch_size` examples.

    Args:
        tensors: An array, or a structure (tuple, dict) of arrays of equal length.
        batch_size: Examples per batch.
        shuffle: Whether each pass is permuted. Defaults to `True`.
        seed: The permutations' seed, or `None` (a fresh permutation each pass).
            Defaults to `None`.

    Returns:
        An infinite `tf.data.Dataset` of batches with the structure of `tensors`.
    """
    size = len(tf.nest.flatten(tensors)[0])
    columns = _columns(tensors)
    indices = _index_batches(size, batch_size, shuffle, seed)
    return indices.map(lambda batch: _gather(columns, batch)).prefetch(2)


def fip_dataset(
    model,
    anchor,
    secondary=None,
    batch_size=128,
    secondary_batch_size=None,
    reference="start",
    shuffle=True,
    seed=None,
):
    """Builds the infinite, shuffled, batched pipeline of `FIPTrainer` steps.

    The anchor inputs are validated against `model` (shape, finiteness). With
    `reference="start"` the reference outputs `f(x; w₀)` of the model as it is now are
    computed once, in inference mode, and zipped with the anchor inputs. Each element is a
    dict `{"anchor_inputs", "anchor_outputs" (start reference only), "secondary" (when
    given)}`. Batches have static sizes (the remainder of an epoch rolls into the next), so
    steps compile once and split evenly across replicas.

    Args:
        model: The built `keras.Model` to be moved (returning logits); it is not changed.
        anchor: Anchor inputs whose outputs must be kept: an array, an `(x, y)` tuple (`y`
            is ignored) or a finite `tf.data.Dataset`.
        secondary: Data of the secondary objective: an `(x, y)` tuple (or dataset of
            pairs) for a supervised loss, an array of inputs, or `None` when L needs no
            data. Defaults to `None`.
        batch_size: Anchor examples per step (global, over all replicas). Defaults to
            `128`.
        secondary_batch_size: Secondary examples per step. Defaults to `None`
            (`batch_size`).
        reference: `"start"` to cache the reference outputs, or `"local"` to leave them to
            the trainer. Defaults to `"start"`.
        shuffle: Whether to reshuffle the examples every pass. Defaults to `True`.
        seed: Shuffle seed. Defaults to `None`.

    Returns:
        An infinite `tf.data.Dataset` of dicts, to pass to `FIPTrainer.fit` with
        `steps_per_epoch`.

    Examples:

        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        >>> data = fip_dataset(model, np.ones((10, 2), "float32"), batch_size=4)
        >>> sorted(data.element_spec)
        ['anchor_inputs', 'anchor_outputs']
    """
    for name, value in (("batch_size", batch_size), ("secondary_batch_size", secondary_batch_size)):
        if value is None and name == "secondary_batch_size":
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if reference not in ("start", "local"):
        raise ValueError(
            f"`reference` must be 'start' or 'local'. Received: reference={reference!r}"
        )
    secondary_batch_size = secondary_batch_size or batch_size

    # Validate everything before any work.
    anchor_x, _ = normalize_data(anchor, name="anchor", model=model)
    check_inputs_match_model(model, anchor_x, name="anchor")
    anchor_x = cast_inputs(model, anchor_x)
    if secondary is not None:
        secondary_x, secondary_y = normalize_data(secondary, name="secondary", model=model)
        check_inputs_match_model(model, secondary_x, name="secondary")
        secondary_x = cast_inputs(model, secondary_x)

    # Anchor pipeline, with the reference outputs computed once.
    anchor_tensors = {"anchor_inputs": anchor_x}
    if reference == "start":
        anchor_tensors["anchor_outputs"] = reference_outputs(model, anchor_x, batch_size)
    anchor_columns = _columns(anchor_tensors)
    indices = _index_batches(num_examples(anchor_x), batch_size, shuffle, seed)
    if secondary is None:
        dataset = indices.map(lambda batch: _gather(anchor_columns, batch))
        return dataset.prefetch(tf.data.AUTOTUNE)

    # Secondary pipeline: its own index stream (seed + 1), gathered in the same map.
    tensors = secondary_x if secondary_y is None else (secondary_x, secondary_y)
    secondary_columns = _columns(tensors)
    secondary_seed = None if seed is None else seed + 1
    secondary_indices = _index_batches(
        num_examples(secondary_x), secondary_batch_size, shuffle, secondary_seed
    )

    def gather_both(anchor_batch, secondary_batch):
        element = _gather(anchor_columns, anchor_batch)
        element["secondary"] = _gather(secondary_columns, secondary_batch)
        return element

    dataset = tf.data.Dataset.zip((indices, secondary_indices)).map(gather_both)
    return dataset.prefetch(tf.data.AUTOTUNE)
