"""The result of `top_eigenpairs`: eigenvalues and eigenvectors of the metric g."""

import numpy as np


class Eigenpairs(tuple):
    """Top eigenpairs of the metric g; unpacks as `(values, vectors)`.

    A tuple `(values, vectors)` with extra attributes: `values` holds the
    eigenvalues in descending order, `vectors` the matching unit eigenvectors
    as the columns of a `(num_params, k)` array, `variable_vectors` the same
    eigenvectors as lists of arrays shaped like the model's trainable
    variables (one list per eigenvector; `None` when the operator has no
    model), and `num_matvecs` the number of products with g spent.

    Args:
        values: eigenvalues, shape `(k,)`, descending.
        vectors: unit eigenvectors, shape `(num_params, k)`.
        variable_vectors: per-variable eigenvectors, a list of `k` lists.
            Defaults to `None`.
        num_matvecs: products with g used to compute them. Defaults to `0`.

    Examples:

        >>> pairs = Eigenpairs(np.array([2.0, 1.0]), np.eye(2))
        >>> values, vectors = pairs
        >>> float(pairs.values[0])
        2.0
    """

    def __new__(cls, values, vectors, variable_vectors=None, num_matvecs=0):
        values = np.asarray(values)
        vectors = np.asarray(vectors)
        instance = super().__new__(cls, (values, vectors))
        instance.values = values
        instance.vectors = vectors
        instance.variable_vectors = variable_vectors
        instance.num_matvecs = int(num_matvecs)
        return instance

    def __getnewargs__(self):
        return (self.values, self.vectors, self.variable_vectors, self.num_matvecs)

    def get_config(self):
        return {
            "values": self.values,
            "vectors": self.vectors,
            "variable_vectors": self.variable_vectors,
            "num_matvecs": self.num_matvecs,
        }
