"""`Submanifold`: a stored, path-connected set of networks, queried with unseen data."""

import json
import os

import keras
import numpy as np

from keras_fip.core.copy import strip_masks

SCORES = ("pseudo_perplexity", "nll", "accuracy")
WEIGHTS_FILE = "weights.npy"
INDEX_FILE = "networks.json"
TEMPLATE_FILE = "template.keras"


class Submanifold:
    """Networks grown from chains of operations and their path points, stored compactly.

    All networks share one architecture: it is kept once (a template model), and each
    network is one row of a `(num_networks, num_weights)` float array of its trainable
    weights (with a `directory`, a memory-mapped `.npy` file, like a `Path` store), tagged
    with a family name and free-form info. Masked weights are stored as their zeros. A
    network is materialised only when needed (`network(i)`), by assigning its row to the
    template's variables, so a query over hundreds of networks holds one model at a time.

    Args:
        template: A built `keras.Model` with the architecture of every network (copied
            without masks; its weights are not a member unless added).
        dtype: Storage dtype of the weights (`"float32"` or `"float16"`, half the space).
            Defaults to `"float32"`.

    Examples:

        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> manifold = Submanifold(model)
        >>> manifold.add(model, family="base")
        0
        >>> len(manifold), manifold.distances().shape
        (1, (1, 1))
    """

    def __init__(self, template, dtype="float32"):
        if not isinstance(template, keras.Model) or not template.built:
            raise ValueError(
                f"`template` must be a built `keras.Model`. Received: template={template!r}"
            )
        if dtype not in ("float32", "float16"):
            raise ValueError(f"`dtype` must be 'float32' or 'float16'. Received: dtype={dtype!r}")
        self.template = strip_masks(template)
        self.dtype = dtype
        self.shapes = [tuple(v.shape) for v in self.template.trainable_variables]
        self.num_weights = int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))
        self._rows = []
        self._stored = None
        self.families = []
        self.info = []

    # Growing

    def _flatten(self, weights):
        shapes = [tuple(np.shape(w)) for w in weights]
        if shapes != self.shapes:
            raise ValueError(
                "Every network must have the template's trainable weights. Expected "
                f"shapes {self.shapes[:4]}... Received: {shapes[:4]}..."
            )
        return np.concatenate([np.ravel(w) for w in weights]).astype(self.dtype)

    def add(self, network, family, info=None):
        """Adds a network (a model or a list of trainable weight arrays); returns its index.

        Args:
            network: A `keras.Model` of the template's architecture, or its trainable
                weights as a list of arrays.
            family: Family name (for example the chain that grew it).
            info: Optional JSON-ready dict stored with it. Defaults to `None`.

        Returns:
            The new network's index.
        """
        if isinstance(network, keras.Model):
            network = [v.numpy() for v in network.trainable_variables]
        self._rows.append(self._flatten(network))
        self.families.append(str(family))
        self.info.append(dict(info or {}))
        return len(self) - 1

    def add_path(self, path, family, every=1, skip_first=False):
        """Adds points of a `keras_fip.Path` (e.g. `operation.path`); returns their indices.

        Args:
            path: A `keras_fip.Path`.
            family: Family name of the points.
            every: Keep every this many recorded points (the last is always kept).
                Defaults to `1`.
            skip_first: Leave out point 0 (the walk's start). Defaults to `False`.

        Returns:
            A list of indices.
        """
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"`every` must be a positive int. Received: every={every!r}")
        points = list(range(1 if skip_first else 0, len(path), every))
        if len(path) - 1 not in points:
            points.append(len(path) - 1)
        steps = path.steps
        return [self.add(path.weights(i), family, {"step": int(steps[i])}) for i in points]

    def grow(self, model, operations, family_names=None, every=1):
        """Applies each operation (or chain) to `model` and adds its walks' points.

        For a chain, the points of every operation of the chain are added, in order.

        Args:
            model: The starting `keras.Model`.
            operations: A list of `keras_fip.Operation`s.
            family_names: One family name per operation. Defaults to `None` (the
                operations' names).
            every: As in `add_path`. Defaults to `1`.

        Returns:
            The list of the operations' resulting models.
        """
        family_names = family_names or [op.name for op in operations]
        if len(family_names) != len(operations):
            raise ValueError(
                "`family_names` must have one name per operation. Received: "
                f"{len(family_names)} names for {len(operations)} operations"
            )
        results = []
        for operation, family in zip(operations, family_names):
            result = operation(model)
            parts = getattr(operation, "operations", [operation])
            for part in parts:
                if part.path is not None:
                    self.add_path(part.path, family, every=every, skip_first=True)
            results.append(result)
        return results

    # Reading

    def __len__(self):
        return len(self.families)

    def weights_matrix(self):
        """The `(num_networks, num_weights)` array of stored weights."""
        if self._stored is not None and not self._rows:
            return self._stored
        rows = [] if self._stored is None else [np.asarray(self._stored)]
        if self._rows:
            rows.append(np.stack(self._rows))
        return np.concatenate(rows) if rows else np.zeros((0, self.num_weights), self.dtype)

    def _row(self, index):
        if not -len(self) <= index < len(self):
            raise ValueError(
                f"`index` must be in [{-len(self)}, {len(self)}). Received: index={index}"
            )
        index %= len(self)
        stored = 0 if self._stored is None else len(self._stored)
        return self._stored[index] if index < stored else self._rows[index - stored]

    def network(self, index):
        """Network `index` as a `keras.Model` (the template, re-assigned: not a copy)."""
        row = np.asarray(self._row(index), dtype="float32")
        offset = 0
        for variable, shape in zip(self.template.trainable_variables, self.shapes):
            size = int(np.prod(shape, dtype=np.int64))
            variable.assign(row[offset : offset + size].reshape(shape))
            offset += size
        return self.template

    def distances(self, chunk_size=65536):
        """Pairwise Euclidean weight distances, `(N, N)` float64 (the graph's weights).

        Computed from the Gram matrix of the mean-centred weights, accumulated in float64
        over chunks of `chunk_size` weights, so memory stays O(N² + N·chunk_size).
        """
        matrix = self.weights_matrix()
        mean = np.mean(matrix, axis=0, dtype=np.float64)
        gram = np.zeros((len(matrix), len(matrix)))
        for start in range(0, matrix.shape[1], chunk_size):
            block = np.asarray(matrix[:, start : start + chunk_size], np.float64)
            block = block - mean[start : start + chunk_size]
            gram += block @ block.T
        squares = np.diag(gram)
        distances = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0))
        np.fill_diagonal(distances, 0.0)
        return distances

    def embedding(self, num_components=2):
        """Classical multidimensional scaling of the distances (= PCA of the weights)."""
        squared = self.distances() ** 2
        count = len(squared)
        centering = np.eye(count) - np.ones((count, count)) / count
        values, vectors = np.linalg.eigh(-0.5 * centering @ squared @ centering)
        order = np.argsort(values)[::-1][:num_components]
        return vectors[:, order] * np.sqrt(np.maximum(values[order], 0.0))

    def graph(self, num_neighbors=5):
        """The k-nearest-neighbour graph of the weight distances.

        Args:
            num_neighbors: Edges from each network to its nearest others. Defaults to
                `5`.

        Returns:
            A list of `(i, j, distance)` edges with `i < j`, without duplicates.
        """
        distances = self.distances()
        edges = set()
        for i, row in enumerate(distances):
            others = [int(j) for j in np.argsort(row, kind="stable") if j != i]
            for j in others[:num_neighbors]:
                edges.add((min(i, j), max(i, j)))
        return [(i, j, float(distances[i, j])) for i, j in sorted(edges)]

    # Querying

    def query(self, data, score="pseudo_perplexity", outputs=None, batch_size=256, as_scored=None):
        """Scores every network on unseen data and ranks them (best first).

        Args:
            data: For `"pseudo_perplexity"`: packed token ids `(N, sequence_length)` and
                networks that are `keras_fip.models.bert.masked_lm` wrappers (no labels
                needed). For `"nll"` / `"accuracy"`: an `(x, y)` tuple.
            score: `"pseudo_perplexity"` (lower is better), `"nll"` (mean negative
                log-likelihood, lower is better) or `"accuracy"` (higher is better).
                Defaults to `"pseudo_perplexity"`.
            outputs: For `"nll"`/`"accuracy"`, `(first, count)`: score on the softmax
                over these outputs only (a task's own head in a multi-task layout).
                Defaults to `None` (all outputs).
            batch_size: Examples per forward pass. Defaults to `256`.
            as_scored: A callable taking each network (a `keras.Model`) and returning
                the model that is scored, or `None` (the network itself). For example
                `keras_fip.models.bert.under_masked_lm_head(mlm)` scores classifier
                networks by the pseudo-perplexity of their BERT backbone under a
                pretrained masked-LM head. Defaults to `None`.

        Returns:
            A dict with `scores` (one float per network, in index order), `ranking`
            (indices, best first), `families` (each network's family) and
            `family_means` (mean score per family).
        """
        if score not in SCORES:
            raise ValueError(f"`score` must be one of {list(SCORES)}. Received: score={score!r}")
        if as_scored is not None and not callable(as_scored):
            raise ValueError(
                f"`as_scored` must be a callable or None. Received: as_scored={as_scored!r}"
            )
        if len(self) == 0:
            raise ValueError("The sub-manifold is empty: add networks before querying.")
        as_scored = as_scored or (lambda network: network)
        if score == "pseudo_perplexity":
            from keras_fip.models import bert

            scores = [
                bert.pseudo_perplexity(as_scored(self.network(i)), np.asarray(data), batch_size)
                for i in range(len(self))
            ]
        else:
            if not (isinstance(data, tuple) and len(data) == 2):
                raise ValueError(
                    f"`data` must be an `(x, y)` tuple for score={score!r}. "
                    f"Received: data of type {type(data).__name__}"
                )
            scores = [
                _label_score(as_scored(self.network(i)), data, score, outputs, batch_size)
                for i in range(len(self))
            ]
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-scores if score == "accuracy" else scores, kind="stable")
        family_means = {
            family: float(np.mean(scores[[f == family for f in self.families]]))
            for family in dict.fromkeys(self.families)
        }
        return {
            "scores": scores.tolist(),
            "ranking": order.tolist(),
            "families": list(self.families),
            "family_means": family_means,
        }

    # Storage

    def save(self, directory):
        """Writes the template, the weights (`.npy`) and the index (`networks.json`)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, WEIGHTS_FILE), self.weights_matrix())
        self.template.save(os.path.join(directory, TEMPLATE_FILE))
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"families": self.families, "info": self.info, "dtype": self.dtype}, f)

    @classmethod
    def load(cls, directory, mmap=True):
        """Reads a sub-manifold written by `save` (weights memory-mapped by default)."""
        template = keras.saving.load_model(os.path.join(directory, TEMPLATE_FILE))
        with open(os.path.join(directory, INDEX_FILE)) as f:
            index = json.load(f)
        manifold = cls(template, dtype=index["dtype"])
        manifold._stored = np.load(
            os.path.join(directory, WEIGHTS_FILE), mmap_mode="r" if mmap else None
        )
        manifold.families = list(index["families"])
        manifold.info = list(index["info"])
        return manifold


def _label_score(model, data, score, outputs, batch_size):
    x, y = data
    # `predict` traces one function per model and reuses it: the query re-assigns one
    # template's weights for every network, so it is traced once.
    logits = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), np.float64)
    if outputs is not None:
        first, count = outputs
        logits = logits[:, first : first + count]
    y = np.asarray(y)
    if score == "accuracy":
        return float(np.mean(np.argmax(logits, axis=-1) == y))
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(y)), y]))
