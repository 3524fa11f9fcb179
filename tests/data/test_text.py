import os

import numpy as np
import pytest

from keras_fip import data
from keras_fip.data import local_files
from keras_fip.data import text

# The first place the library looks for the dataset files (env KERAS_FIP_DATA, else
# `../shared/data` beside the checkout).
SHARED = local_files.search_roots()[0][0]
needs_text = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED, "text", "stsa.fine.train")),
    reason="../shared/data/text not present",
)


@needs_text
@pytest.mark.parametrize(
    "name, split, count, num_classes",
    [
        ("sst5", "train", 8544, 5),
        ("sst5", "validation", 1101, 5),
        ("sst2", "test", 1821, 2),
        ("trec", "train", 5452, 6),
        ("trec", "test", 500, 6),
        ("cr", "train", 3397, 2),
        ("cr", "test", 378, 2),
        ("mr", "train", 9596, 2),
        ("mr", "test", 1066, 2),
        ("subj", "test", 1000, 2),
        ("mpqa", "test", 1061, 2),
    ],
)
def test_text_sets_have_their_documented_sizes_and_classes(name, split, count, num_classes):
    x, y = data.load(name, split)
    assert len(x) == len(y) == count and y.dtype == np.int32
    assert sorted(np.unique(y).tolist()) == list(range(num_classes))
    assert all(isinstance(s, str) and s for s in x[:50])
    assert data.info(name)["num_classes"] == num_classes


@needs_text
def test_seeded_split_is_disjoint_complete_stated_and_repeatable():
    x_train, _ = data.load("cr", "train")
    x_test, y_test = data.load("cr", "test")
    assert len(x_train) + len(x_test) == 3775
    again, y_again = data.load("cr", "test")
    assert list(again) == list(x_test) and list(y_again) == list(y_test)
    assert "seeded 90%/10%" in data.info("cr")["splits"]
    assert data.info("sst5")["splits"] == "official splits"


@needs_text
def test_latin1_lines_are_decoded_and_not_split_on_nel():
    x, _ = data.load("mr", "train")
    x_test, _ = data.load("mr", "test")
    assert len(x) + len(x_test) == 10662  # NEL (\x85) bytes do not break lines


def test_bad_text_split_names_the_argument():
    with pytest.raises(ValueError, match="split"):
        data.load("cr", "validation")
    with pytest.raises(ValueError, match="name"):
        data.load("imdb")


@needs_text
def test_pretraining_corpus_excludes_every_held_out_sentence():
    corpus = text.pretraining_corpus()
    held_out = {" ".join(s.lower().split()) for s in text.held_out_sentences()}
    pooled = {" ".join(s.lower().split()) for s in corpus}
    assert len(pooled) == len(corpus) > 30000
    assert not pooled & held_out


def test_tokenizer_round_trip_and_saved_vocabulary(tmp_path):
    pytest.importorskip("keras_hub")  # the `text` extra
    sentences = np.asarray(
        [
            "the movie is good",
            "the film was not good at all",
            "a great great movie",
            "what a waste of time",
            "the plot is thin but the actors are good",
        ]
        * 20,
        dtype=object,
    )
    vocabulary = text.word_piece_vocabulary(sentences, 60)
    assert vocabulary[:5] == list(text.RESERVED_TOKENS)
    encoder = text.TextEncoder(vocabulary, sequence_length=32)
    ids = encoder(sentences[:5])
    assert ids.shape == (5, 32) and ids.dtype == np.int32
    assert (ids[:, 0] == encoder.cls_id).all()
    assert encoder.decode(ids) == [str(s) for s in sentences[:5]]
    # Saved beside the model, the vocabulary tokenises identically.
    path = text.save_vocabulary(vocabulary, str(tmp_path))
    np.testing.assert_array_equal(text.TextEncoder(path, 32)(sentences[:5]), ids)
    # Unknown words map to [UNK]; long sentences are truncated but keep [SEP].
    unknown = encoder(["zzz movie", "the " * 40])
    assert unknown[0, 1] == encoder.unk_id or encoder.vocabulary[unknown[0, 1]] != "zzz"
    assert unknown[1, -1] == encoder.sep_id


def test_text_encoder_validates_its_arguments():
    pytest.importorskip("keras_hub")
    with pytest.raises(ValueError, match="vocabulary"):
        text.TextEncoder(["a", "b"])
    with pytest.raises(ValueError, match="sequence_length"):
        text.TextEncoder(list(text.RESERVED_TOKENS) + ["a"], sequence_length=2)
