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

# Sentence-classification sets (files in `text/`, one `LABEL sentence` a line).
TEXT_DATASETS = {
    "sst5": {
        "num_classes": 5,
        "description": "SST-5 movie-review sentences, 5 sentiment classes "
        "(8,544 train, 1,101 validation, 2,210 test)",
        "files": {
            "train": "stsa.fine.train",
            "validation": "stsa.fine.dev",
            "test": "stsa.fine.test",
        },
    },
    "sst2": {
        "num_classes": 2,
        "description": "SST-2 movie-review sentences, 2 sentiment classes "
        "(6,920 train, 872 validation, 1,821 test)",
        "files": {
            "train": "stsa.binary.train",
            "validation": "stsa.binary.dev",
            "test": "stsa.binary.test",
        },
    },
    "mr": {
        "num_classes": 2,
        "description": "MR movie-review snippets, 2 sentiment classes (10,662)",
        "files": {"all": "rt-polarity.all"},
    },
    "cr": {
        "num_classes": 2,
        "description": "CR customer product-review sentences, 2 sentiment classes (3,775)",
        "files": {"all": "custrev.all"},
    },
    "mpqa": {
        "num_classes": 2,
        "description": "MPQA opinion phrases, 2 polarity classes (10,606)",
        "files": {"all": "mpqa.all"},
    },
    "subj": {
        "num_classes": 2,
        "description": "SUBJ movie sentences, subjective/objective (10,000)",
        "files": {"all": "subj.all"},
    },
    "trec": {
        "num_classes": 6,
        "description": "TREC questions, 6 question types (5,452 train, 500 test)",
        "files": {"train": "TREC.train.all", "test": "TREC.test.all"},
    },
}
