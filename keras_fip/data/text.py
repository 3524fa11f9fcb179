"""Sentence-classification sets read from their distributed files, and a WordPiece tokenizer.

The seven sets of the CNN sentence-classification benchmarks (Kim 2014) are distributed as one
example a line, `LABEL sentence`. SST-5, SST-2 and TREC come with official splits; MR, CR, MPQA
and SUBJ do not, so `load` holds out a seeded 10% of them as `"test"` (`info` says which).
"""

import functools
import os

import numpy as np

from keras_fip.data import local_files
from keras_fip.data import registry

# Seed and fraction of the held-out split of the sets without an official one.
SPLIT_SEED = 0
TEST_FRACTION = 0.1
TEXT_SPLITS = ("train", "validation", "test")
# WordPiece special tokens, in BERT's order of use ([PAD] = 0).
RESERVED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCABULARY_FILE = "vocabulary.txt"


def _decode(line):
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


def read_labelled_lines(path):
    """Reads a `LABEL sentence` file into `(sentences, labels)`.

    Lines are split on `\\n` only (some files hold Latin-1 `\\x85` bytes, which Python's
    text mode would treat as line breaks); each line is decoded as UTF-8, else Latin-1.

    Args:
        path: The file.

    Returns:
        A tuple `(sentences, labels)`: a numpy array of `str` (dtype object) and int32
        labels.
    """
    sentences, labels = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f.read().split(b"\n"), start=1):
            line = _decode(raw).strip()
            if not line:
                continue
            label, _, sentence = line.partition(" ")
            if not label.isdigit():
                raise ValueError(
                    f"Expected `LABEL sentence` lines in {path}. Received line {number}: "
                    f"{line[:60]!r}"
                )
            sentences.append(" ".join(sentence.split()))
            labels.append(int(label))
    return np.asarray(sentences, dtype=object), np.asarray(labels, dtype=np.int32)


def find_text_dir(data_dir=None):
    """The first `text/` folder (or folder holding the files) among the search roots."""
    searched = []
    for root, origin in local_files.search_roots(data_dir):
        for directory in (os.path.join(root, "text"), root):
            searched.append(f"{directory} ({origin})")
            if os.path.isfile(os.path.join(directory, "stsa.fine.train")):
                return directory, searched
    return None, searched


def _check_split(name, split):
    files = registry.TEXT_DATASETS[name]["files"]
    available = [s for s in TEXT_SPLITS if s in files or ("all" in files and s != "validation")]
    if split not in available:
        raise ValueError(
            f"`split` must be one of {available} for {name!r}. Received: split={split!r}"
        )


@functools.lru_cache(maxsize=32)
def _load_text_cached(name, split, data_dir):
    directory, searched = find_text_dir(data_dir)
    if directory is None:
        places = "\n".join(f"  - {place}" for place in searched)
        raise ValueError(
            f"Could not find the text sets (`stsa.fine.train`, ...) for {name!r}. Looked "
            f"in:\n{places}\nSupply the folder with `data_dir=...` or env "
            f"{local_files.ENV_VARIABLE}."
        )
    files = registry.TEXT_DATASETS[name]["files"]
    if split in files:
        return read_labelled_lines(os.path.join(directory, files[split]))
    sentences, labels = read_labelled_lines(os.path.join(directory, files["all"]))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(sentences))
    num_test = int(round(TEST_FRACTION * len(sentences)))
    chosen = np.sort(order[:num_test] if split == "test" else order[num_test:])
    return sentences[chosen], labels[chosen]


def load_text(name, split="train", data_dir=None):
    """Loads a sentence-classification split: `(sentences, labels)`.

    Args:
        name: One of `keras_fip.data.registry.TEXT_DATASETS`: `"sst5"`, `"sst2"`, `"mr"`,
            `"cr"`, `"mpqa"`, `"subj"`, `"trec"`.
        split: `"train"`, `"test"`, or `"validation"` (SST-5 and SST-2 only). Sets without
            an official split hold out a seeded 10% (seed 0) as `"test"`. Defaults to
            `"train"`.
        data_dir: A folder holding the files (or their `text/` folder). Defaults to `None`
            (env `KERAS_FIP_DATA`, then `../shared/data`).

    Returns:
        A tuple `(x, y)`: a numpy array of sentences (`str`, dtype object) and int32 labels.

    Examples:

        >>> x, y = keras_fip.data.load("cr", "test")
        >>> len(x), int(y.max()) + 1
        (378, 2)
    """
    _check_split(name, split)
    x, y = _load_text_cached(name, split, None if data_dir is None else os.fspath(data_dir))
    return x.copy(), y.copy()


def text_info(name, data_dir=None):
    """Describes a text set: classes, description, files and how its splits are made."""
    details = {key: value for key, value in registry.TEXT_DATASETS[name].items() if key != "files"}
    files = registry.TEXT_DATASETS[name]["files"]
    directory, _ = find_text_dir(data_dir)
    details["input_shape"] = ()
    details["modality"] = "text"
    details["source"] = (
        None if directory is None else os.path.join(directory, files.get("train", files.get("all")))
    )
    details["subset"] = False
    details["splits"] = (
        "official splits"
        if "all" not in files
        else f"no official split: seeded {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} "
        f"train/test split (numpy default_rng({SPLIT_SEED}) permutation)"
    )
    return details


def _normalize(sentence):
    return " ".join(str(sentence).lower().split())


def pretraining_corpus(names=None, data_dir=None):
    """Pooled training sentences of the text sets, for the tokenizer and masked-LM pretraining.

    Every sentence that also appears (lower-cased, whitespace-normalised) in a `"test"` or
    `"validation"` split of any of the sets is left out, so held-out sentences stay unseen.
    Duplicates are removed; the order is that of the sets, then of the files.

    Args:
        names: Text set names to pool. Defaults to `None` (all seven).
        data_dir: As in `load_text`. Defaults to `None`.

    Returns:
        A numpy array of sentences (`str`, dtype object).
    """
    names = list(names or registry.TEXT_DATASETS)
    held_out = set()
    for name in registry.TEXT_DATASETS:
        for split in ("validation", "test"):
            try:
                _check_split(name, split)
            except ValueError:
                continue
            held_out.update(_normalize(s) for s in load_text(name, split, data_dir)[0])
    seen, pooled = set(), []
    for name in names:
        for sentence in load_text(name, "train", data_dir)[0]:
            key = _normalize(sentence)
            if key not in held_out and key not in seen:
                seen.add(key)
                pooled.append(sentence)
    return np.asarray(pooled, dtype=object)


def held_out_sentences(names=None, data_dir=None):
    """The pooled, de-duplicated `"test"` sentences of the text sets (never pretrained on).

    Args:
        names: Text set names. Defaults to `None` (all seven).
        data_dir: As in `load_text`. Defaults to `None`.

    Returns:
        A numpy array of sentences (`str`, dtype object).
    """
    seen, pooled = set(), []
    for name in names or registry.TEXT_DATASETS:
        for sentence in load_text(name, "test", data_dir)[0]:
            key = _normalize(sentence)
            if key not in seen:
                seen.add(key)
                pooled.append(sentence)
    return np.asarray(pooled, dtype=object)


def word_piece_vocabulary(sentences, vocabulary_size=8000):
    """Computes a lower-cased WordPiece vocabulary with KerasHub's trainer.

    Args:
        sentences: An array of sentences.
        vocabulary_size: Maximum number of tokens, special tokens included. Defaults to
            `8000`.

    Returns:
        A list of tokens: `RESERVED_TOKENS` first (`[PAD]` = 0), then the learned pieces.
    """
    import tensorflow as tf
    from keras_hub.tokenizers import compute_word_piece_vocabulary

    if not (isinstance(vocabulary_size, int) and vocabulary_size > len(RESERVED_TOKENS)):
        raise ValueError(
            f"`vocabulary_size` must be an int above {len(RESERVED_TOKENS)}. "
            f"Received: vocabulary_size={vocabulary_size!r}"
        )
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray([str(s) for s in sentences])).batch(
        1000
    )
    return list(
        compute_word_piece_vocabulary(
            dataset,
            vocabulary_size,
            lowercase=True,
            strip_accents=True,
            reserved_tokens=list(RESERVED_TOKENS),
        )
    )


def save_vocabulary(vocabulary, directory):
    """Writes a vocabulary one token a line to `directory/vocabulary.txt`; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, VOCABULARY_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocabulary) + "\n")
    return path


def load_vocabulary(path):
    """Reads a vocabulary written by `save_vocabulary` (a file or its folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, VOCABULARY_FILE)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


class TextEncoder:
    """Turns sentences into fixed-length `[CLS] pieces [SEP] [PAD]...` token id arrays.

    Wraps KerasHub's `WordPieceTokenizer` (lower-casing, accent stripping) and packs its
    output in numpy, so the same vocabulary file tokenises pretraining, tasks and queries
    the same way. Sentences longer than `sequence_length - 2` pieces are truncated.

    Args:
        vocabulary: A list of tokens or the path of a vocabulary file (or its folder).
        sequence_length: Length of the packed sequences. Defaults to `64`.

    Examples:

        >>> encoder = TextEncoder(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"], 6)
        >>> encoder(["a b", "b"]).tolist()
        [[2, 5, 6, 3, 0, 0], [2, 6, 3, 0, 0, 0]]
    """

    def __init__(self, vocabulary, sequence_length=64):
        from keras_hub.tokenizers import WordPieceTokenizer

        if isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = load_vocabulary(os.fspath(vocabulary))
        vocabulary = list(vocabulary)
        missing = [t for t in RESERVED_TOKENS if t not in vocabulary]
        if missing:
            raise ValueError(
                f"`vocabulary` must hold the special tokens {list(RESERVED_TOKENS)}. "
                f"Received: vocabulary without {missing}"
            )
        if not (isinstance(sequence_length, int) and sequence_length >= 3):
            raise ValueError(
                f"`sequence_length` must be an int >= 3. "
                f"Received: sequence_length={sequence_length!r}"
            )
        self.vocabulary = vocabulary
        self.sequence_length = sequence_length
        self.tokenizer = WordPieceTokenizer(
            vocabulary=vocabulary, lowercase=True, strip_accents=True, oov_token="[UNK]"
        )
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            vocabulary.index(t) for t in RESERVED_TOKENS
        )

    @property
    def vocabulary_size(self):
        return len(self.vocabulary)

    def pieces(self, sentences):
        """Token ids of each sentence, unpacked: a list of int lists."""
        rows = self.tokenizer(np.asarray([str(s) for s in sentences]))
        rows = rows.to_list() if hasattr(rows, "to_list") else rows
        return [[int(i) for i in (row.tolist() if hasattr(row, "tolist") else row)] for row in rows]

    def __call__(self, sentences, batch_size=4096):
        ids = np.full((len(sentences), self.sequence_length), self.pad_id, dtype=np.int32)
        for start in range(0, len(sentences), batch_size):
            rows = self.pieces(sentences[start : start + batch_size])
            for i, row in enumerate(rows, start=start):
                row = [self.cls_id] + row[: self.sequence_length - 2] + [self.sep_id]
                ids[i, : len(row)] = row
        return ids

    def decode(self, token_ids):
        """Joins the pieces of packed ids back into text (special tokens dropped)."""
        texts = []
        for row in np.asarray(token_ids):
            words = []
            for index in row:
                token = self.vocabulary[int(index)]
                if token in RESERVED_TOKENS and token != "[UNK]":
                    continue
                if token.startswith("##") and words:
                    words[-1] += token[2:]
                else:
                    words.append(token)
            texts.append(" ".join(words))
        return texts
