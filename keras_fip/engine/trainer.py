"""The FIP trainer: one graph-safe step that keeps anchor outputs while L pulls the model."""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_fip.core import outputs as outputs_lib
from keras_fip.core.masks import MaskConstraint
from keras_fip.core.masks import MaskedOptimizer
from keras_fip.engine import distances as distances_lib
from keras_fip.engine import rules as rules_lib
from keras_fip.engine import step_rules

REFERENCES = ("start", "local")
# Step outputs that `measure_every` leaves NaN between measurements.
_MEASURED = ("step_norm", "distance_from_start")


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_positive(value, name, allow_zero=False):
    if (
        not _is_number(value)
        or not math.isfinite(value)
        or (value < 0 if allow_zero else value <= 0)
    ):
        expected = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {expected} finite number. Received: {name}={value!r}")
    return float(value)


def _check_positive_integer(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _distance(left, right):
    """Euclidean distance between two aligned lists of tensors (one fused pass each)."""
    return tf.sqrt(
        tf.add_n(
            [
                tf.reduce_sum(tf.math.squared_difference(a, tf.cast(b, a.dtype)))
                for a, b in zip(left, right)
            ]
        )
    )


def _step_variable(name):
    """A step number held by the trainer (read on the first replica)."""
    return keras.Variable(
        0,
        dtype="int64",
        trainable=False,
        synchronization="on_read",
        aggregation="only_first_replica",
        name=name,
    )


def _unmeasured(after):
    """NaN `step_norm` and `distance_from_start`, and whether the weights are finite."""
    # A sum is non-finite when any term is (weights never near 1e38).
    total = tf.add_n([tf.reduce_sum(a) for a in after])
    nan = tf.constant(float("nan"), after[0].dtype)
    return nan, nan, tf.math.is_finite(total)


def _batch_size(inputs):
    """The batch size of `inputs`: a Python int when static, else a scalar tensor."""
    size = inputs.shape[0]
    return int(size) if size is not None else tf.shape(inputs)[0]


def _variable_masks(variables):
    """Boolean masks carried by `variables` as `MaskConstraint`s (None where unmasked)."""
    return [
        variable.constraint.mask if isinstance(variable.constraint, MaskConstraint) else None
        for variable in variables
    ]


def _snapshots(variables, prefix):
    """Per-replica-readable copies of `variables` (the start point, the previous point)."""
    return [
        keras.Variable(
            v.numpy(),
            trainable=False,
            synchronization="on_read",
            aggregation="only_first_replica",
            name=f"{prefix}_{i}",
        )
        for i, v in enumerate(variables)
    ]


@keras.saving.register_keras_serializable(package="keras_fip")
class FIPTrainer(keras.Model):
    """Moves a model along a functionally invariant path, one `fit` step at a time.

    Wraps `model` (whose weights it changes in place: pass a copy) and replaces `fit`'s step
    with the FIP step. Each step receives one anchor batch, whose outputs must stay close to
    the reference outputs under the output distance D, and optionally one secondary batch
    for the secondary objective L. Both sides of D run in inference mode, unless
    `training=True` puts the moving side in training mode:

    The step rule (`keras_fip.rules`) turns the gradient into the move:

    - `Penalty`: minimise `D + β·L` with the compiled Keras optimizer.
    - `Normalized`: the gradient of `D + β·L` rescaled to Euclidean length ε.
    - `Metric`: solve `(g + δI) θ = −β ∇L` by conjugate gradient with the matrix-free
      metric g on the anchor batch, rescale θ to length ε (the paper's step). D is then
      only measured.

    For the `Normalized` and `Metric` rules the step is handed to the compiled optimizer as
    a gradient; with the default `keras.optimizers.SGD(1.0)` the weights move by exactly θ.
    Masked weights (carried as `MaskConstraint`s) are excluded from the step and stay at
    zero. The batches are dicts, built by `keras_fip.core.data_adapter.fip_dataset`:
    `{"anchor_inputs": x, "anchor_outputs": f(x; w_ref), "secondary": batch}`;
    `"anchor_outputs"` is omitted with `reference="local"` (computed in the step from the
    previous point) and `"secondary"` when L needs no data. Each step returns, averaged
    over replicas: `distance` (D), `secondary_loss` (L), `step_norm` (‖Δw‖),
    `distance_from_start` (‖w − w₀‖; both NaN between measurements with
    `measure_every` > 1), `finite` (1.0 if the objective and the weights are
    finite; otherwise `walk` stops and puts the model back on the previous point, or the
    last measured one with `measure_every` > 1) and
    `accuracy` (on the secondary batch) when L is a cross-entropy.
    Create and compile it under the `tf.distribute` strategy scope it should run in.

    Args:
        model: The built `keras.Model` to move, returning logits or probabilities.
            Changed in place.
        rule: The step rule: a `keras_fip.rules.Penalty`, `Normalized` or `Metric`, or
            its name. Defaults to `"penalty"`.
        distance: Output distance D: `"kl"`, `"l2"`, `"bhattacharyya"` or a callable
            `fn(outputs, reference_outputs) -> scalar`. Defaults to `"kl"`.
        beta: β, the weight of the secondary objective. Defaults to `1.0`.
        secondary_loss: A `keras.losses.Loss` (or its config) applied to the model's
            outputs on secondary `(x, y)` batches, e.g.
            `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`. Exclusive with
            `secondary_objective`. Defaults to `None`.
        secondary_objective: A callable `fn(model, batch) -> scalar`, the mean of L over
            its batch (`batch` is `None` when the data carry no secondary batch). Exclusive
            with `secondary_loss`. Under a strategy it runs on each replica's share of the
            batch and the trainer divides it by the replicas, so it must be a plain batch
            mean: a `keras.losses.Loss` object called inside it already divides by the
            replicas in a replica context, and would be divided twice (call its loss
            function, e.g. `keras.losses.sparse_categorical_crossentropy`, and take the
            mean; or pass the object as `secondary_loss`). Defaults to `None` (with no
            `secondary_loss`, L = 0).
        reference: `"start"` (the frozen starting network: outputs cached once in the
            data) or `"local"` (the previous point of the path). Defaults to `"start"`.
        metric_length: Whether each step also measures its length in the metric g on
            the anchor batch, `sqrt(Δwᵀ g Δw)` (one extra forward-mode pass), and reports
            the running sum as `metric_length`. Defaults to `False`.
        training: The mode of the moving network's forward pass in D and L; the reference
            outputs always come from inference mode. `True` normalises BatchNormalization
            layers with batch statistics and updates their moving statistics, as `fit`
            does: a path that rescales the activations (pruning shrinks them) is then
            not fought by frozen statistics, and the statistics follow the path. It also
            turns Dropout on, and D is no longer exactly zero at the start. The
            non-finite guard restores the moving statistics with the weights. Defaults
            to `False`.
        measure_every: Measure `step_norm` and `distance_from_start` (two passes over
            the weights beside the step) only at steps that are multiples of this, and
            at the last step of a `walk`; other steps report them as NaN, and check the
            weights for non-finite values by their sum (one pass). `walk` counts steps
            as its `path` does, so with `measure_every=path.record_every` every recorded
            point (the walk's last included) carries the same values as with `1`. With
            the start reference (and no `metric_length`), the non-finite guard then
            keeps a copy of the weights only at measured steps (and the step before,
            for `step_norm`), and other steps do not read the weights at all (a weight
            that turns non-finite there makes the next step's objective non-finite,
            and `walk` checks every point it records): a failed step puts the model
            back on the last measured point (the walk's first point before the first),
            which the path keeps when `path.record_every` is `measure_every`, rather
            than on the point just before it. On small models the copies and passes
            are a tenth of the step (`python -m benchmarks.fip_step`). Defaults to `1`
            (every step).
        outputs: What `model` returns: `"logits"`, `"probabilities"`, or `"auto"` (the
            layer that makes the output decides: a softmax means probabilities;
            `keras_fip.core.outputs.output_kind`). The distance, the metric and a
            `secondary_loss` then see logits either way: a probability model is read
            through its log-probabilities, so pass `from_logits=True` losses. Defaults
            to `"auto"`.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    Examples:

        >>> import numpy as np, keras
        >>> from keras_fip.core.data_adapter import fip_dataset
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.rand(32, 4).astype("float32")
        >>> y = np.random.randint(0, 3, 32)
        >>> trainer = FIPTrainer(model, rule=keras_fip.rules.Normalized(epsilon=0.01),
        ...     secondary_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> trainer.compile()
        >>> data = fip_dataset(model, anchor=x, secondary=(x, y), batch_size=8)
        >>> history = trainer.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
        >>> round(float(history.history["step_norm"][-1]), 6)
        0.01
    """

    def __init__(
        self,
        model,
        rule="penalty",
        distance="kl",
        beta=1.0,
        secondary_loss=None,
        secondary_objective=None,
        reference="start",
        metric_length=False,
        training=False,
        measure_every=1,
        outputs="auto",
        **kwargs,
    ):
        # Validate everything before any state is created.
        if not isinstance(model, keras.Model):
            raise ValueError(f"`model` must be a `keras.Model`. Received: model={model!r}")
        if not model.built or not model.trainable_variables:
            raise ValueError(
                "`model` must be built and have trainable weights. Received: "
                f"model={model.name} with {len(model.trainable_variables)} trainable "
                "variables"
            )
        rule = rules_lib.get(rule)
        distance_fn = distances_lib.get(distance)
        if not _is_number(beta) or not math.isfinite(beta):
            raise ValueError(f"`beta` must be a finite number. Received: beta={beta!r}")
        if secondary_loss is not None and secondary_objective is not None:
            raise ValueError(
                "Pass at most one of `secondary_loss` and `secondary_objective`. "
                f"Received: secondary_loss={secondary_loss!r}, "
                f"secondary_objective={secondary_objective!r}"
            )
        loss_fn = None
        if isinstance(secondary_loss, dict):
            secondary_loss = keras.losses.deserialize(secondary_loss)
        if secondary_loss is not None:
            if not isinstance(secondary_loss, keras.losses.Loss):
                raise ValueError(
                    "`secondary_loss` must be a `keras.losses.Loss` instance (or its "
                    "config), e.g. `keras.losses.SparseCategoricalCrossentropy("
                    "from_logits=True)` for models returning logits. "
                    f"Received: secondary_loss={secondary_loss!r}"
                )
            loss_fn = secondary_loss
        if isinstance(secondary_objective, dict):
            secondary_objective = keras.saving.deserialize_keras_object(secondary_objective)
        if secondary_objective is not None and not callable(secondary_objective):
            raise ValueError(
                "`secondary_objective` must be a callable `fn(model, batch) -> scalar`. "
                f"Received: secondary_objective={secondary_objective!r}"
            )
        if reference not in REFERENCES:
            raise ValueError(
                f"`reference` must be one of {list(REFERENCES)}. Received: reference={reference!r}"
            )
        if not isinstance(training, (bool, np.bool_)):
            raise ValueError(
                f"`training` must be `True` or `False`. Received: training={training!r}"
            )
        _check_positive_integer(measure_every, "measure_every")
        outputs_lib.check_output_kind(outputs)
        if rule.needs_metric_product and secondary_loss is None and secondary_objective is None:
            warnings.warn(
                "The `Metric` rule with no secondary objective (L = 0) has a zero "
                "right-hand side: every step is zero.",
                stacklevel=2,
            )
        super().__init__(**kwargs)

        self.walked_model = model
        self.outputs_kind = outputs_lib.output_kind(model) if outputs == "auto" else outputs
        # Every output the step reads is a logit: a probability model is read through its
        # log-probabilities (a view sharing its weights).
        self.network = outputs_lib.logits_model(model, self.outputs_kind)
        self.rule = rule
        self.distance = distance
        self.beta = float(beta)
        self.secondary_loss = secondary_loss
        self.secondary_objective = secondary_objective
        self.reference = reference
        self.metric_length = bool(metric_length)
        self.walk_training = bool(training)
        self.measure_every = int(measure_every)
        self._distance_fn = distance_fn
        self._loss_fn = loss_fn

        # Start point and previous point, for ‖w − w₀‖, the local reference and the guard.
        variables = model.trainable_variables
        self._start_weights = _snapshots(variables, "start")
        self._previous_weights = _snapshots(variables, "previous")
        # With `measure_every` > 1 (and the start reference) the guard's point is only
        # snapshotted at measured steps; the point one step before a measured step is
        # kept here for its `step_norm`.
        # (`metric_length` needs every step's previous point.)
        self._sparse_guard = (
            self.measure_every > 1 and reference != "local" and not self.metric_length
        )
        self._before_measured = (
            _snapshots(variables, "before_measured") if self._sparse_guard else []
        )
        # The moving statistics change in training mode: the guard restores them too.
        self._state = list(model.non_trainable_variables) if self.walk_training else []
        self._previous_state = _snapshots(self._state, "previous_state")
        self._masks = _variable_masks(variables)
        # The walk's step count (as its path counts), for `measure_every`.
        self._step_count = _step_variable("step_count")
        # The step `walk` ends on: measured whatever `measure_every` says.
        self._last_step = _step_variable("last_step")
        self._metric_length = keras.Variable(
            0.0,
            trainable=False,
            synchronization="on_read",
            aggregation="only_first_replica",
            name="metric_length",
        )
        self._reports_accuracy = loss_fn is not None and "crossentropy" in str(
            getattr(loss_fn, "name", getattr(loss_fn, "__name__", ""))
        )
        self.built = True

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def compile(self, optimizer=None, jit_compile=False, steps_per_execution=1, **kwargs):
        """Configures the trainer; the loss is the FIP objective, so none is accepted.

        Args:
            optimizer: A Keras optimizer. `None` uses `keras.optimizers.SGD(1.0)` for the
                `Normalized` and `Metric` rules (the weights move by exactly θ) and
                `keras.optimizers.Adam(1e-3)` for `Penalty` (walks take
                `rule.optimizer(steps, variables)`). Wrapped in a
                `MaskedOptimizer` when the model carries masks. Defaults to `None`.
            jit_compile: Whether to compile the step with XLA. Defaults to `False`.
            steps_per_execution: Steps per `tf.function` call. Defaults to `1`.
            **kwargs: Other `keras.Model.compile` arguments except `loss` and `metrics`.
        """
        for name in ("loss", "metrics", "loss_weights", "weighted_metrics"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"FIPTrainer.compile does not take `{name}`: the objective is D + β·L. "
                    f"Received: {name}={kwargs[name]!r}"
                )
        if optimizer is None:
            if isinstance(self.rule, rules_lib.Penalty):
                optimizer = keras.optimizers.Adam(1e-3)
            else:
                optimizer = keras.optimizers.SGD(1.0)
        else:
            optimizer = keras.optimizers.get(optimizer)
        if any(mask is not None for mask in self._masks) and not isinstance(
            optimizer, MaskedOptimizer
        ):
            optimizer = MaskedOptimizer(optimizer)
        super().compile(
            optimizer=optimizer,
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
            **kwargs,
        )
        self._build_optimizer()

    def _build_optimizer(self):
        """Creates the optimizer's state on the walked variables before the step is traced.

        Built inside the step, as `fit` otherwise does, the state would be created in the
        first trace, and `tf.function` would trace the whole step a second time to check
        that later calls create none."""
        optimizer = self.optimizer
        if optimizer.built:
            return
        with self.distribute_strategy.scope(), keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(self.network.trainable_variables)

    def fit(self, *args, shuffle=False, **kwargs):
        """`keras.Model.fit`; `shuffle` defaults to `False` (the pipeline shuffles)."""
        return super().fit(*args, shuffle=shuffle, **kwargs)

    # The step.

    def _reference_outputs(self, inputs):
        """f(x; w_prev) from the previous-point snapshot, without touching the model."""
        outputs, _ = self.network.stateless_call(
            [v.value for v in self._previous_weights],
            [v.value for v in self.network.non_trainable_variables],
            inputs,
            training=False,
        )
        return outputs

    def _anchor_distance(self, outputs, reference_outputs):
        """D over all outputs; model outputs beyond the reference's last axis are free."""
        total = 0.0
        for output, reference in zip(tf.nest.flatten(outputs), tf.nest.flatten(reference_outputs)):
            if output.shape[-1] is not None and reference.shape[-1] is not None:
                if output.shape[-1] > reference.shape[-1]:
                    output = output[..., : reference.shape[-1]]
            total = total + self._distance_fn(output, reference)
        return tf.convert_to_tensor(total)

    def _can_fuse(self, anchor_inputs, secondary):
        """Whether anchor and secondary inputs can share one forward pass."""
        if self._loss_fn is None or not self.rule.objective_includes_distance:
            return False
        secondary_inputs = secondary[0]
        if not (tf.is_tensor(anchor_inputs) and tf.is_tensor(secondary_inputs)):
            return False
        try:
            single_output = len(self.network.outputs) == 1
        except (AttributeError, TypeError, ValueError):
            single_output = False  # Subclassed models: the outputs are not known ahead.
        if not single_output:
            return False
        return (
            anchor_inputs.dtype == secondary_inputs.dtype
            and anchor_inputs.shape[1:] == secondary_inputs.shape[1:]
            and anchor_inputs.shape[1:].is_fully_defined()
        )

    def _batch_accuracy(self, labels, outputs):
        """Accuracy on this batch (labels as class indices or one-hot), or `None`."""
        if not self._reports_accuracy:
            return None
        if labels.shape.rank == outputs.shape.rank:
            labels = tf.argmax(labels, axis=-1)
        predictions = tf.argmax(outputs, axis=-1, output_type=tf.int64)
        labels = tf.cast(tf.reshape(labels, tf.shape(predictions)), tf.int64)
        return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), "float32"))

    def _supervised_loss(self, labels, outputs):
        """The Keras loss as a per-replica batch mean (Keras divides it by the replicas)."""
        value = tf.cast(self._loss_fn(labels, outputs), "float32")
        return value * tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, "float32")

    def _secondary_value(self, secondary):
        """L on an unfused secondary batch and the accuracy (or None) on it."""
        if self._loss_fn is not None:
            inputs, labels = secondary[0], secondary[1]
            outputs = self.network(inputs, training=self.walk_training)
            accuracy = self._batch_accuracy(labels, outputs)
            return self._supervised_loss(labels, outputs), accuracy
        if self.secondary_objective is not None:
            value = self.secondary_objective(self.network, secondary)
            return tf.cast(value, "float32"), None
        return tf.constant(0.0), None

    def train_step(self, data):
        anchor_inputs, reference_outputs, secondary = self._unpack(data)
        variables = self.network.trainable_variables
        # The moving statistics (training mode only) change in the forward pass.
        before_state = self._read_state()

        # Forward pass
        with tf.GradientTape() as tape:
            distance, secondary_value, accuracy = self._terms(
                anchor_inputs, reference_outputs, secondary
            )
            objective = self.beta * secondary_value
            if self.rule.objective_includes_distance:
                objective = objective + tf.cast(distance, "float32")
            scaled = self.optimizer.scale_loss(objective / step_rules.num_replicas())
        gradients = self._gradients(tape.gradient(scaled, variables), variables)
        if not self.rule.objective_includes_distance:
            distance = self._distance_of(self._forward(anchor_inputs), reference_outputs)

        # Means over the replicas (with the gradient, for rules that need the global one)
        scalars, gradients = self._all_reduce(
            [objective, distance, secondary_value, 0.0 if accuracy is None else accuracy],
            gradients,
        )

        # The step rule's move, applied; the point measured and guarded
        updates = self._rule_update(gradients, anchor_inputs)
        step_norm, from_start, finite, before = self._apply(
            updates, variables, before_state, scalars[0]
        )
        if self.metric_length:
            self._add_metric_length(anchor_inputs, variables, before)
        return self._logs(scalars, step_norm, from_start, finite, accuracy is not None)

    # The step's parts.

    def _unpack(self, data):
        """`(anchor_inputs, reference_outputs or None, secondary batch or None)`."""
        reference_outputs = data.get("anchor_outputs")
        if self._sparse_guard and reference_outputs is None:
            raise ValueError(
                "With `reference='start'` and `measure_every` > 1 the data must carry the "
                "start point's outputs (`fip_dataset(..., reference='start')`). Received "
                f"batches without 'anchor_outputs' (measure_every={self.measure_every})."
            )
        if reference_outputs is None:
            reference_outputs = self._reference_outputs(data["anchor_inputs"])
        return data["anchor_inputs"], reference_outputs, data.get("secondary")

    def _read_state(self):
        """The moving statistics before the step, for the guard (every-step copies)."""
        if self._sparse_guard:
            return []
        return [tf.identity(v.value) for v in self._state]

    def _forward(self, inputs):
        return self.network(inputs, training=self.walk_training)

    def _distance_of(self, outputs, reference_outputs):
        return self._anchor_distance(outputs, reference_outputs)

    def _terms(self, anchor_inputs, reference_outputs, secondary):
        """`(D, L, accuracy or None)`; anchor and labelled batches share one forward pass
        when they can (`_can_fuse`). D is `None` when the rule does not differentiate it."""
        if secondary is not None and self._can_fuse(anchor_inputs, secondary):
            outputs = self._forward(tf.concat([anchor_inputs, secondary[0]], axis=0))
            # One Split (its gradient one Concat) rather than two strided slices.
            anchor_outputs, secondary_outputs = tf.split(
                outputs, [_batch_size(anchor_inputs), _batch_size(secondary[0])], axis=0
            )
            accuracy = self._batch_accuracy(secondary[1], secondary_outputs)
            secondary_value = self._supervised_loss(secondary[1], secondary_outputs)
        else:
            anchor_outputs = None
            if self.rule.objective_includes_distance:
                anchor_outputs = self._forward(anchor_inputs)
            secondary_value, accuracy = self._secondary_value(secondary)
        distance = None
        if anchor_outputs is not None:
            distance = self._distance_of(anchor_outputs, reference_outputs)
        return distance, secondary_value, accuracy

    @staticmethod
    def _gradients(gradients, variables):
        return [
            tf.zeros_like(v.value) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(gradients, variables)
        ]

    def _all_reduce(self, scalars, gradients):
        """Means the scalars (and, for rules on the global gradient, the gradient) over the
        replicas in one collective, so every later collective runs in the same order."""
        pack_dtype = gradients[0].dtype
        scalars = [tf.cast(value, pack_dtype) for value in scalars]
        if isinstance(self.rule, rules_lib.Penalty):
            reduced = step_rules.all_reduce_mean(scalars)
        else:
            replicas = step_rules.num_replicas()
            reduced = step_rules.all_reduce_mean(scalars + [g * replicas for g in gradients])
            gradients = reduced[len(scalars) :]
        return [tf.cast(value, "float32") for value in reduced[: len(scalars)]], gradients

    def _rule_update(self, gradients, anchor_inputs):
        """The rule's update for the optimizer (a replica's share of a global step)."""
        metric_product = None
        if self.rule.needs_metric_product:
            from keras_fip.geometry.metric import linearize

            # One forward pass for every CG product: g·v = (1/B) Jᵀ (J v).
            _, jvp, vjp = linearize(self.network, anchor_inputs)
            count = tf.shape(tf.nest.flatten(anchor_inputs)[0])[0]

            def metric_product(vector):
                tangent = jvp(vector)
                return vjp(tangent / tf.cast(count, tangent.dtype))

        updates = self.rule.update(
            gradients, self.beta, masks=self._masks, metric_product=metric_product
        )
        if isinstance(self.rule, rules_lib.Penalty):
            return updates
        # Every replica computed the global step; the optimizer sums the replicas' shares.
        replicas = step_rules.num_replicas()
        return [update / replicas for update in updates]

    def _apply(self, updates, variables, before_state, objective):
        """Applies the update; returns `(step_norm, distance_from_start, finite, before)`,
        `before` the weights before the step (`None` with `measure_every` > 1)."""
        if self._sparse_guard:
            step_norm, from_start, weights_finite, before = self._apply_sparse(
                updates, variables, tf.math.is_finite(objective)
            )
        else:
            step_norm, from_start, weights_finite, before = self._apply_every_step(
                updates, variables, before_state
            )
        finite = tf.logical_and(tf.math.is_finite(objective), weights_finite)
        return step_norm, from_start, finite, before

    def _add_metric_length(self, anchor_inputs, variables, before):
        """Adds the step's length in the metric, `sqrt(Δwᵀ g Δw)`, to `metric_length`."""
        from keras_fip.geometry import output_jvp

        delta = [v.value - b for v, b in zip(variables, before)]
        _, jvp = output_jvp(self.network, anchor_inputs, delta)
        speed = tf.reduce_mean(tf.reduce_sum(tf.square(jvp), axis=-1))
        (speed,) = step_rules.all_reduce_mean([speed])
        self._metric_length.assign_add(tf.sqrt(tf.cast(speed, "float32")))

    def _logs(self, scalars, step_norm, from_start, finite, has_accuracy):
        _, distance, secondary, accuracy = scalars
        logs = {
            "distance": distance,
            "secondary_loss": secondary,
            "step_norm": tf.cast(step_norm, "float32"),
            "distance_from_start": tf.cast(from_start, "float32"),
            "finite": tf.cast(finite, "float32"),
        }
        if self.metric_length:
            logs["metric_length"] = self._metric_length.value
        if has_accuracy:
            logs["accuracy"] = accuracy
        return logs

    def _apply_every_step(self, updates, variables, before_state):
        """Applies the update, snapshotting the current point as the previous one first
        (the local reference and the guard's point); measures every `measure_every`."""
        # Every read of the snapshots above (the local reference) and of the variables
        # comes first, in program order, which automatic control dependencies keep.
        before = [tf.convert_to_tensor(v.value) for v in variables]
        for snapshot, value in zip(
            self._previous_weights + self._previous_state, before + before_state
        ):
            snapshot.assign(value)
        self.optimizer.apply(updates, variables)
        # Measure (from the values read before the update: no second read).
        after = [v.value for v in variables]

        def measured():
            from_start = _distance(after, [s.value for s in self._start_weights])
            return _distance(after, before), from_start, tf.math.is_finite(from_start)

        if self.measure_every == 1:
            return (*measured(), before)
        step = self._step_count.assign_add(1)
        step_norm, from_start, finite = tf.cond(
            self._is_measured(step),
            measured,
            lambda: _unmeasured(after),
        )
        return step_norm, from_start, finite, before

    def _apply_sparse(self, updates, variables, objective_finite):
        """Applies the update; the guard's point and `step_norm` need copies of the
        weights only around measured steps, so other steps make none.

        At a measured step (a multiple of `measure_every`) the new point becomes the
        guard's point, when it and the step's objective are finite; the step before
        keeps its point for `step_norm`. Other steps make no copy and no pass over the
        weights: a weight that turns non-finite there makes the next step's objective
        non-finite (the guard stops one step later), and `walk` checks the weights of
        every point it records. Reading the weights before the update would also make
        TensorFlow copy them at the update (copy on write)."""
        step = self._step_count.assign_add(1)
        self.optimizer.apply(updates, variables)
        after = [v.value for v in variables]

        def keep_before():
            for snapshot, value in zip(self._before_measured, after):
                snapshot.assign(value)
            return tf.constant(True)

        def measured():
            before = [s.value for s in self._before_measured]
            from_start = _distance(after, [s.value for s in self._start_weights])
            finite = tf.math.is_finite(from_start)

            def keep_point():
                for snapshot, value in zip(
                    self._previous_weights + self._previous_state,
                    after + [v.value for v in self._state],
                ):
                    snapshot.assign(value)
                return tf.constant(True)

            kept = tf.cond(
                tf.logical_and(finite, objective_finite), keep_point, lambda: tf.constant(False)
            )
            with tf.control_dependencies([kept]):
                step_norm = tf.identity(_distance(after, before))
            # The walk's last step is measured too: keep its previous point.
            with tf.control_dependencies([step_norm]):
                before_last = tf.cond(
                    self._is_measured(step + 1), keep_before, lambda: tf.constant(False)
                )
            with tf.control_dependencies([before_last]):
                return tf.identity(step_norm), from_start, finite

        # Unmeasured steps do not read the weights to check them (a pass over every
        # weight, ~3% of a LeNet-300-100 step): non-finite weights make the next step's
        # objective non-finite, and the recorder checks every point it records.
        def unmeasured():
            nan = tf.constant(float("nan"), after[0].dtype)
            return nan, nan, tf.constant(True)

        def before_measured():
            keep_before()
            return unmeasured()

        branch = tf.where(self._is_measured(step), 0, tf.where(self._is_measured(step + 1), 1, 2))
        step_norm, from_start, finite = tf.switch_case(
            tf.cast(branch, "int32"),
            [measured, before_measured, unmeasured],
        )
        return step_norm, from_start, finite, None

    def _is_measured(self, step):
        """Whether `step` is measured: a multiple of `measure_every`, or the walk's last."""
        return tf.logical_or(
            tf.equal(step % self.measure_every, 0), tf.equal(step, self._last_step.value)
        )

    def _guard_point(self, failed_step, first_step):
        """The step of the point the guard returns to after a failed step."""
        if not self._sparse_guard:
            return failed_step - 1
        return max(first_step, (failed_step - 1) // self.measure_every * self.measure_every)

    def _keep_guard_point(self):
        """Makes the current point the guard's point at the start of a walk, with
        `measure_every` > 1 (with every-step copies the first step makes it)."""
        if not self._sparse_guard:
            return
        variables = self.network.trainable_variables
        for snapshot, variable in zip(self._previous_weights, variables):
            snapshot.assign(variable.value)
        for snapshot, variable in zip(self._previous_state, self._state):
            snapshot.assign(variable.value)
        for snapshot, variable in zip(self._before_measured, variables):
            snapshot.assign(variable.value)

    # Walking.

    def restore_previous_point(self):
        """Sets the model's weights back to the guard's point: the point before the last
        step, or with `measure_every` > 1 (start reference) the last measured point."""
        for variable, snapshot in zip(
            self.network.trainable_variables + self._state,
            self._previous_weights + self._previous_state,
        ):
            variable.assign(snapshot.value)

    def reset_start(self):
        """Makes the model's current weights the start point `w₀` (and previous point)."""
        for variable, start, previous in zip(
            self.network.trainable_variables, self._start_weights, self._previous_weights
        ):
            start.assign(variable.value)
            previous.assign(variable.value)
        self._metric_length.assign(0.0)

    def walk(
        self,
        data,
        steps,
        path=None,
        steps_per_epoch=None,
        callbacks=None,
        verbose="auto",
        log_dir=None,
    ):
        """Runs `steps` FIP steps with `fit`, recording every step; stops on non-finite.

        Drives `fit` (progress bar, callbacks, `tf.distribute`, `jit_compile`) and records
        each step's scalars, and the weights every `path.record_every` steps and at the
        walk's last step (also when a callback stops it early), into `path`.
        A step whose loss, step or weights are not finite stops the walk: the model is
        put back on the point before it (with `measure_every` > 1, the last measured
        point, or the walk's first) and a `FloatingPointError` naming both steps is
        raised.

        Args:
            data: The dataset from `keras_fip.core.data_adapter.fip_dataset`.
            steps: Number of steps (a positive integer).
            path: A `keras_fip.Path` started at the model's current weights, or `None`.
                Steps continue after the path's last step (so a resumed path goes on).
                Defaults to `None`.
            steps_per_epoch: Steps per `fit` epoch (must divide `steps`). Defaults to
                `None` (one epoch).
            callbacks: Keras callbacks, as `fit` accepts them. Defaults to `None`.
            verbose: `fit`'s verbosity (`"auto"`, 0, 1 or 2). Defaults to `"auto"`.
            log_dir: Directory for TensorBoard event files (every scalar, every step;
                written with `tf.summary`, no TensorBoard install needed), or `None`.
                Defaults to `None`.

        Returns:
            A dict mapping each metric name to the list of its per-step values.
        """
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"`steps` must be a positive integer. Received: steps={steps!r}")
        steps_per_epoch = steps if steps_per_epoch is None else steps_per_epoch
        if (
            not isinstance(steps_per_epoch, (int, np.integer))
            or isinstance(steps_per_epoch, bool)
            or steps_per_epoch < 1
            or steps % steps_per_epoch
        ):
            raise ValueError(
                "`steps_per_epoch` must be a positive integer dividing `steps` "
                f"({steps}). Received: steps_per_epoch={steps_per_epoch!r}"
            )
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise ValueError(
                "`callbacks` must be a list of `keras.callbacks.Callback`. "
                f"Received: callbacks={callbacks!r}"
            )
        first_step = 0 if path is None else int(path.steps[-1])
        self._step_count.assign(first_step)  # `measure_every` counts as the path does.
        self._last_step.assign(first_step + steps)
        self._keep_guard_point()
        recorder = _WalkRecorder(self, path, first_step, steps_per_epoch)
        all_callbacks = [recorder] + list(callbacks or [])
        if log_dir is not None:
            all_callbacks.append(_ScalarSummaries(log_dir, first_step, steps_per_epoch))
        self.fit(
            data,
            epochs=steps // steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=all_callbacks,
            verbose=verbose,
            shuffle=False,
        )
        if recorder.failed_step is not None:
            kept = self._guard_point(recorder.failed_step, first_step)
            raise FloatingPointError(
                f"The FIP walk hit a non-finite loss, step or weight at step "
                f"{recorder.failed_step}; it stopped there. The model holds the last "
                f"finite point it kept (step {kept}"
                + (
                    f", the last multiple of measure_every={self.measure_every}"
                    if kept != recorder.failed_step - 1
                    else ""
                )
                + "). Lower `epsilon` or the learning rate, or check the data."
            )
        return recorder.history

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.walked_model),
                "rule": rules_lib.serialize(self.rule),
                "distance": distances_lib.serialize(self._distance_fn),
                "beta": self.beta,
                "secondary_loss": (
                    None
                    if self._loss_fn is None
                    else keras.saving.serialize_keras_object(self._loss_fn)
                ),
                "secondary_objective": (
                    None
                    if self.secondary_objective is None
                    else keras.saving.serialize_keras_object(self.secondary_objective)
                ),
                "reference": self.reference,
                "metric_length": self.metric_length,
                "training": self.walk_training,
                "measure_every": self.measure_every,
                "outputs": self.outputs_kind,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)


class _WalkRecorder(keras.callbacks.Callback):
    """Records each step's scalars (and the weights into a `Path`); guards non-finite."""

    def __init__(self, trainer, path, first_step, steps_per_epoch):
        super().__init__()
        self._trainer = trainer
        self._path = path
        self._first_step = first_step
        self._steps_per_epoch = steps_per_epoch
        self._epoch = 0
        self.history = {}
        self.failed_step = None
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._first_step + self._epoch * self._steps_per_epoch + batch + 1
        metrics = {name: float(np.asarray(value)) for name, value in (logs or {}).items()}
        if metrics.get("finite", 1.0) < 1.0:
            self._fail(step)
            return
        weights = None
        if self._path is not None and self._path.should_record(step):
            weights = self._finite_weights(step)
            if weights is None:
                return
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        if self._path is not None:
            self._path.append(step, weights, metrics)
        self._last = (step, metrics)
        # The progress bar (run after this callback, on the same logs) shows the measured
        # values: between measurements it keeps the last one rather than showing NaN.
        if logs is not None:
            for name in _MEASURED:
                if name in logs and not math.isfinite(metrics.get(name, 0.0)):
                    del logs[name]

    def on_train_end(self, logs=None):
        # The path ends at the walk's last point, recorded or not (the next walk on the
        # path numbers its steps from there).
        if self._path is None or self.failed_step is not None or self._last is None:
            return
        step, metrics = self._last
        if step > int(self._path.steps[-1]):
            weights = self._finite_weights(step)
            if weights is not None:
                self._path.append(step, weights, metrics)

    def _finite_weights(self, step):
        weights = [v.numpy() for v in self._trainer.network.trainable_variables]
        if not all(np.isfinite(w).all() for w in weights):
            # Steps between measured ones do not check the weights.
            self._fail(step)
            return None
        return weights

    def _fail(self, step):
        # Go back to the guard's point (`FIPTrainer._guard_point`).
        self._trainer.restore_previous_point()
        self.failed_step = step
        self.model.stop_training = True


class _ScalarSummaries(keras.callbacks.Callback):
    """Writes each step's scalars as TensorBoard scalar summaries under `log_dir`."""

    def __init__(self, log_dir, first_step, steps_per_epoch):
        super().__init__()
        self._log_dir = log_dir
        self._first_step = first_step
        self._steps_per_epoch = steps_per_epoch
        self._epoch = 0
        self._writer = None
        metadata = tf.compat.v1.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        self._metadata = metadata.SerializeToString()

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self._log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._first_step + self._epoch * self._steps_per_epoch + batch + 1
        with self._writer.as_default():
            for name, value in (logs or {}).items():
                if not np.isfinite(np.asarray(value)) and name in _MEASURED:
                    continue  # Not measured at this step (`measure_every`).
                tf.summary.write(
                    f"fip/{name}",
                    tf.cast(np.asarray(value), tf.float32),
                    step=step,
                    metadata=self._metadata,
                )

    def on_train_end(self, logs=None):
        self._writer.flush()
        self._writer.close()
