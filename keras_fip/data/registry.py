"""What each dataset is: classes, input shape, local file layouts."""

DATASETS = {
    "digits": {
        "num_classes": 10,
        "input_shape": (8, 8, 1),
        "description": "scikit-learn's bundled handwritten digits (1,797 real 8x8 images)",
    },
    "mnist": {
        "num_classes": 10,
        "input_shape": (28, 28, 1),
        "description": "MNIST handwritten digits (60,000 train, 10,000 test)",
    },
    "fashion_mnist": {
        "num_classes": 10,
        "input_shape": (28, 28, 1),
        "description": "Fashion-MNIST (60,000 train, 10,000 test)",
    },
    "cifar10": {
        "num_classes": 10,
        "input_shape": (32, 32, 3),
        "description": "CIFAR-10 (50,000 train, 10,000 test)",
    },
    "cifar100": {
        "num_classes": 100,
        "input_shape": (32, 32, 3),
        "description": "CIFAR-100, fine labels (50,000 train, 10,000 test)",
    },
}

SPLITS = ("train", "test")

# The official file names, as distributed by their authors.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_PARTIAL_FILE = "fashion_mnist_partial_official_order.npz"
CIFAR10_SUBSET_FILE = "cifar10_convnetjs_subset.npz"
CIFAR10_PICKLE_DIR = "cifar-10-batches-py"
CIFAR100_PICKLE_DIR = "cifar-100-python"
