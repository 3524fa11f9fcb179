r"""Transformers on real text: a small KerasHub BERT compressed and taught a new task along FIPs.

Stages (each reported in `results.json`, keys prefixed by stage):

1. `pretrain/`: a WordPiece vocabulary and a small `BertBackbone` pretrained here by masked-LM
   on the pooled training sentences of the seven text sets (held-out sentences excluded),
   cached as a base network (`keras_fip.models.bert.pretrained_masked_lm`): masked-token
   accuracy (15% of the pieces `[MASK]`-ed) and pseudo-perplexity on held-out sentences.
2. `compress/`: `keras_fip.Compress` of the attention and feed-forward kernels (and the
   masked-LM head's and pooler's dense kernels; embeddings with `--language_embeddings`)
   keeping the masked-LM outputs (KL on the vocabulary logits at masked positions of
   pretraining sentences); masked-token accuracy and pseudo-perplexity against dense.
3. `continual/`: a classifier with 5 + 2 outputs (SST-5 classes 0-4, CR classes 5-6, the
   reference code's Yelp → IMDB layout; logits from the mean of the last layer over the
   pieces, `--language_pooling`) trained on SST-5 with the cross-entropy of its own five
   outputs, then taught CR by `keras_fip.ContinualLearn` (memory: SST-5 training inputs), by
   plain fine-tuning and by EWC (λ chosen among `--language_ewc_lambdas` on a held-out 10% of
   CR and the SST-5 validation split, as Kirkpatrick et al. select it); accuracies
   task-incrementally (argmax over a task's own outputs) on both test sets.
   Why mean pooling: with KerasHub's pooled `[CLS]` output, nothing learned CR (fine-tuning,
   EWC and ContinualLearn all stayed at the all-positive rate, 65.1%): a BERT pretrained by
   masked-LM alone on 34k sentences has no sentence summary in `[CLS]`, and the classifier
   sits at the class prior for the whole budget. A bag of words gets 75% on CR with the same
   pieces, so the data were not the cause; on a 1-layer toy BERT the mean-pooled classifier
   learned CR (fine-tuning 74%, ContinualLearn 81%) where the `[CLS]` one stayed at 65.1%.
4. `chain/` and `submanifold/`. Names say the order applied (the seed text's "CL Co" is
   ambiguous): `cl_then_co` = `keras_fip.chain(ContinualLearn, Compress)`, CL→Co: learn CR,
   then compress; `co_then_cl` = `keras_fip.chain(Compress, ContinualLearn)`, Co→CL:
   compress the SST-5 network, then learn CR with its mask fixed; at each
   `--language_chain_sparsities`: both accuracies and the weight distance between the
   two results. Compress keeps the outputs of the network it starts from on its anchors:
   in Co→CL the SST-5 memory; in CL→Co both tasks' inputs, the SST-5 memory and every CR
   training sentence (after SST-5, only its memory is kept, as ContinualLearn assumes;
   CR, the current task, is all there), with the KL divergence over all seven outputs (on a CR
   sentence the
   network puts 98-99% of its probability on the two CR outputs, so the KL holds CR's
   decision). Anchoring on the first 1,000 CR sentences only (the previous version) kept
   them (KL 0.003, 92.4% before and after) but not the other 2,397 (96.3% → 68.5%) nor
   CR's test sentences (KL 0.27, CR 78.0% → 71.4% at 30%); with all 3,397: KL 0.05 on
   test, CR 79.4%. CL→Co's ContinualLearn does not depend on the sparsity: it is the
   continual stage's (the same operation), run once. Every recorded point of the walks
   (every `--language_record_every` steps) joins a `keras_fip.Submanifold` (families
   `base`, `cl` — the shared ContinualLearn path —, `cl_then_co_<p>`, `co_then_cl_<p>`),
   which unseen sets query: sentiment sets (`--language_queries`, MR and SST-2) by NLL on
   the CR outputs, and any set (`--language_pppl_queries`, MR and TREC's questions)
   without labels by the pseudo-perplexity of each network's backbone under the
   pretrained masked-LM head (`keras_fip.models.bert.under_masked_lm_head`): the family
   each prefers (`best_family`, lowest mean score), the two orders pooled over
   sparsities (`order_means`), the best network, the MDS map of the weight-distance graph
   coloured by the inverse score (`submanifold.png`, Fig. 5).

Every stage writes `results.json` when it ends and logs its wall time
(`<stage>/stage_wall_time_seconds`), so a stopped run keeps what it measured.

Example (the default: seed 0, compositions at 10/30/60%, every network of the sub-manifold
queried):

    python -m apps.language

Three seeds (each pretrains its own masked LM, unless
`--language_pretrain_seed=0` shares seed 0's): `python -m apps.language --seeds=0,1,2`.

The measured figures, with their commands, are on the results page (`docs/results.md`).

`--strategy=mirrored|multi_worker|tpu` runs every stage in that strategy (pretraining,
the classifiers' `fit`, every operation and baseline, the pseudo-perplexity loops). `fit`
draws each replica's Dropout masks apart from one device's, so the SST-5 classifier, and
every network made from it, differs from a one-device run by the noise of its Dropout;
with `--language_dropout=0` a run under MirroredStrategy repeats one device's figures
(`pytest -m large tests/apps/test_language.py -k strategy` compares them on a tiny BERT).
On a host with accelerators:

    python -m apps.language --strategy=mirrored --seeds=0

Real BERT on a host with network: `keras_hub.models.BertBackbone.from_preset(
"bert_base_en_uncased")` wrapped by `keras_fip.models.bert.masked_lm` / `classifier`, with
`keras_fip.data.text.TextEncoder(keras_hub.models.BertTokenizer.from_preset(
"bert_base_en_uncased").vocabulary, 128)` (see `keras_fip/models/bert.py`).
"""

import os
import time

import keras
import numpy as np
from absl import app
from absl import flags
from absl import logging

import keras_fip
from apps import common
from keras_fip.data import text
from keras_fip.models import bert

STAGES = ("compress", "continual", "chain")
CL_METHODS = ("fip", "finetune", "ewc")
# What cannot run under a distributed `--strategy` (`common.start` refuses it by name before
# any work): nothing. With `--language_dropout=0` every stage gives one device's figures
# under MirroredStrategy (tests/apps/test_language.py, large); with Dropout, `fit` draws
# each replica's masks apart, so the SST-5 classifier and everything after it differ.
SINGLE_DEVICE = {}
OLD_CLASSES = 5  # SST-5 outputs 0-4; CR outputs 5-6.

# Model and pretraining
flags.DEFINE_integer("language_vocabulary_size", 4000, "WordPiece vocabulary size.", lower_bound=10)
flags.DEFINE_integer("language_sequence_length", 48, "Packed sequence length.", lower_bound=4)
flags.DEFINE_integer("language_num_layers", 2, "BERT encoder layers.", lower_bound=1)
flags.DEFINE_integer("language_hidden_dim", 128, "BERT hidden width.", lower_bound=2)
flags.DEFINE_integer("language_intermediate_dim", 512, "BERT feed-forward width.", lower_bound=2)
flags.DEFINE_integer("language_pretrain_epochs", 10, "Masked-LM pretraining epochs.", lower_bound=1)
flags.DEFINE_integer(
    "language_max_sentences",
    None,
    "Use only this many pretraining sentences (tests).",
    lower_bound=10,
)
flags.DEFINE_integer(
    "language_pretrain_seed",
    None,
    "Pretrain the masked LM with this "
    "seed for every `--seeds` (the seeds then vary the classifiers, the "
    "operations and the baselines, not the pretraining: about 50 min per "
    "pretrained model here). Default: each seed pretrains its own.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "language_eval_sentences", 2000, "Held-out sentences for masked-token accuracy.", lower_bound=1
)
flags.DEFINE_integer(
    "language_pppl_sentences", 300, "Held-out sentences for pseudo-perplexity.", lower_bound=1
)
# Stages
flags.DEFINE_list("language_stages", list(STAGES), f"Stages to run, among {list(STAGES)}.")
flags.DEFINE_list("language_sparsities", ["50"], "Compress sparsities of the masked LM (%).")
flags.DEFINE_string(
    "language_compress_learning_rate",
    "3e-3",
    "Compress's `learning_rate` in "
    "every stage: a number (3e-3, the rate the README's figures were measured "
    "with) or `auto` (Compress's default: 0.044 x the RMS of the prunable "
    "weights, about 1.8e-3 on the pre-trained encoder).",
)
flags.DEFINE_integer("language_compress_steps", 300, "Steps of each Compress path.", lower_bound=2)
flags.DEFINE_integer(
    "language_anchor_sentences",
    4096,
    "Pretraining sentences whose masked-LM outputs Compress keeps.",
    lower_bound=8,
)
flags.DEFINE_bool("language_embeddings", False, "Compress the embedding tables too.")
flags.DEFINE_enum(
    "language_pooling",
    "mean",
    ["mean", "cls"],
    "Classifier pooling: the mean of the last layer over the pieces, or KerasHub's pooled [CLS].",
)
flags.DEFINE_integer("language_task_epochs", 3, "Epochs of SST-5 fine-tuning.", lower_bound=1)
flags.DEFINE_float(
    "language_dropout",
    0.1,
    "Dropout rate of the SST-5 classifier (its "
    "backbone's layers and its head), which every later network inherits. "
    "Under a `--strategy` each replica draws its own Dropout masks in `fit`, "
    "so only 0 repeats one device's networks exactly.",
    lower_bound=0.0,
    upper_bound=0.9,
)
flags.DEFINE_float(
    "language_task_learning_rate",
    5e-4,
    "Peak Adam learning rate of SST-5 fine-tuning.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "language_cl_learning_rate", 1e-3, "Adam learning rate of every method on CR.", lower_bound=0.0
)
flags.DEFINE_integer("language_cl_epochs", 3, "Epochs of every method on CR.", lower_bound=1)
flags.DEFINE_bool(
    "language_cl_training",
    False,
    "Walk ContinualLearn (both compositions' "
    "too) with the moving network in training mode (Dropout on, as "
    "fine-tuning and EWC train); the reference outputs stay in inference mode.",
)
flags.DEFINE_list(
    "language_cl_methods", list(CL_METHODS), f"Methods learning CR, among {list(CL_METHODS)}."
)
flags.DEFINE_list(
    "language_ewc_lambdas",
    ["1e2", "1e4", "1e6"],
    "EWC's λ candidates: each "
    "is trained on 90% of CR and the best mean accuracy on the held-out 10% "
    "and the SST-5 validation split is kept (Kirkpatrick et al.'s selection).",
)
flags.DEFINE_integer(
    "language_memory", 1000, "SST-5 training inputs ContinualLearn keeps.", lower_bound=1
)
flags.DEFINE_integer(
    "language_max_task_examples",
    None,
    "Cap on each task's training and test examples (tests).",
    lower_bound=4,
)
flags.DEFINE_list(
    "language_chain_sparsities", ["10", "30", "60"], "Sparsities (%) of the two compositions."
)
flags.DEFINE_integer(
    "language_record_every",
    20,
    "Steps between the path points of the "
    "walks that join the sub-manifold (20: about 120 networks at three "
    "sparsities).",
    lower_bound=1,
)
flags.DEFINE_list(
    "language_queries",
    ["mr", "sst2"],
    "Unseen two-class sentiment sets that "
    "query the sub-manifold (scored by NLL on the CR outputs).",
)
flags.DEFINE_integer(
    "language_query_examples", 200, "Test examples of each query set.", lower_bound=1
)
flags.DEFINE_list(
    "language_pppl_queries",
    ["mr", "trec"],
    "Unseen sets that query the "
    "sub-manifold by pseudo-perplexity (no labels): each network's backbone "
    "under the pretrained masked-LM head.",
)
flags.DEFINE_integer(
    "language_pppl_query_sentences",
    25,
    "Test sentences of each pseudo-perplexity query.",
    lower_bound=1,
)

FLAGS = flags.FLAGS


def _cap(x, y, limit):
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _task_accuracy(model, x, y, first, count):
    """Task-incremental accuracy: argmax over outputs `first`..`first + count - 1`."""
    logits = np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + 512], training=False))
            for i in range(0, len(x), 512)
        ]
    )
    return float(np.mean(np.argmax(logits[:, first : first + count], axis=-1) == y))


def _weights_distance(a, b):
    return float(
        np.sqrt(
            sum(
                np.sum((v.numpy() - w.numpy()) ** 2)
                for v, w in zip(a.trainable_variables, b.trainable_variables)
            )
        )
    )


def pretrain(seed):
    """The cached pretrained masked LM of `seed` (or of `--language_pretrain_seed`)."""
    if FLAGS.language_pretrain_seed is not None:
        seed = FLAGS.language_pretrain_seed
    model, encoder, results = bert.pretrained_masked_lm(
        vocabulary_size=FLAGS.language_vocabulary_size,
        sequence_length=FLAGS.language_sequence_length,
        num_layers=FLAGS.language_num_layers,
        hidden_dim=FLAGS.language_hidden_dim,
        intermediate_dim=FLAGS.language_intermediate_dim,
        epochs=FLAGS.language_pretrain_epochs,
        seed=seed,
        max_sentences=FLAGS.language_max_sentences,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir,
    )
    return model, encoder, results


def mlm_metrics(model, held_out):
    evaluation = bert.masked_token_accuracy(model, held_out[: FLAGS.language_eval_sentences])
    return {
        "masked_token_accuracy": evaluation["accuracy"],
        "masked_token_loss": evaluation["loss"],
        "pseudo_perplexity": bert.pseudo_perplexity(
            model, held_out[: FLAGS.language_pppl_sentences]
        ),
    }


def compress_stage(model, encoder, held_out, seed):
    results = {}
    corpus = text.pretraining_corpus(data_dir=FLAGS.data_dir)
    order = np.random.default_rng(seed).permutation(len(corpus))
    anchor_ids = encoder(corpus[order[: FLAGS.language_anchor_sentences]])
    num_predictions = model.input_shape[1] - FLAGS.language_sequence_length
    anchor, _, _ = bert.mask_tokens(
        anchor_ids, num_predictions, encoder.mask_id, encoder.vocabulary_size, seed=seed + 7
    )
    dense = mlm_metrics(model, held_out)
    results.update({f"dense/{k}": v for k, v in dense.items()})
    for percent in FLAGS.language_sparsities:
        start = time.perf_counter()
        operation = keras_fip.Compress(
            float(percent) / 100,
            data=anchor,
            prunable=keras_fip.compress.Prunable(embeddings=FLAGS.language_embeddings),
            walk=keras_fip.Walk(
                steps=FLAGS.language_compress_steps,
                rule=keras_fip.rules.Penalty(_compress_rate()),
                batch_size=64,
                seed=seed,
                verbose=0,
            ),
        )
        sparse = operation(model)
        metrics = mlm_metrics(sparse, held_out)
        results.update({f"{percent}/{k}": v for k, v in metrics.items()})
        results[f"{percent}/measured_sparsity"] = keras_fip.core.projection.prunable_sparsity(
            sparse, include_embeddings=FLAGS.language_embeddings
        )
        results[f"{percent}/wall_time_seconds"] = time.perf_counter() - start
        results[f"{percent}/masked_token_accuracy_drop_pp"] = 100 * (
            dense["masked_token_accuracy"] - metrics["masked_token_accuracy"]
        )
    return results


def _tasks(encoder):
    limit = FLAGS.language_max_task_examples
    tasks = {}
    for name in ("sst5", "cr"):
        x, y = _cap(*keras_fip.data.load(name, "train", FLAGS.data_dir), limit)
        x_test, y_test = _cap(*keras_fip.data.load(name, "test", FLAGS.data_dir), limit)
        tasks[name] = (encoder(x), y, encoder(x_test), y_test)
    x, y = _cap(*keras_fip.data.load("sst5", "validation", FLAGS.data_dir), limit)
    tasks["sst5_validation"] = (encoder(x), y)
    return tasks


def _evaluate_both(model, tasks):
    return {
        "sst5/accuracy": _task_accuracy(model, tasks["sst5"][2], tasks["sst5"][3], 0, OLD_CLASSES),
        "cr/accuracy": _task_accuracy(model, tasks["cr"][2], tasks["cr"][3], OLD_CLASSES, 2),
    }


@keras.saving.register_keras_serializable(package="apps.language")
class OwnOutputsCrossEntropy(keras.losses.Loss):
    """Cross-entropy over outputs `first`..`first + count - 1` only (labels 0..count-1).

    The SST-5 classifier learns on its own five outputs, so the two CR outputs keep their
    initialisation until CR is learned (a task's head untouched by the other task, as in
    the multi-head layout of task-incremental learning). Training on all seven outputs
    instead drives the CR logits far below the others on every input, and the first CR
    steps then spend the whole budget undoing that.
    """

    def __init__(self, first=0, count=OLD_CLASSES, name="own_outputs_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.first = first
        self.count = count

    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred[:, self.first : self.first + self.count], from_logits=True
        )

    def get_config(self):
        return {**super().get_config(), "first": self.first, "count": self.count}


def sst5_classifier(mlm, tasks, seed):
    """A 5 + 2 output BERT classifier from the pretrained backbone, trained on SST-5.

    Adam with the learning rate cosine-decayed over the run, cross-entropy on the SST-5
    outputs only (`OwnOutputsCrossEntropy`).
    """
    keras.utils.set_random_seed(seed)
    config = keras.saving.serialize_keras_object(bert.find_backbone(mlm))
    config["config"]["dropout"] = FLAGS.language_dropout
    backbone = keras.saving.deserialize_keras_object(config)
    backbone.set_weights(bert.find_backbone(mlm).get_weights())
    model = bert.classifier(
        backbone,
        OLD_CLASSES + 2,
        FLAGS.language_sequence_length,
        dropout=FLAGS.language_dropout,
        pooling=FLAGS.language_pooling,
    )
    x, y = tasks["sst5"][:2]
    batch_size = 64
    steps = FLAGS.language_task_epochs * int(np.ceil(len(x) / batch_size))
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(FLAGS.language_task_learning_rate, steps)
        ),
        loss=OwnOutputsCrossEntropy(),
    )
    model.fit(x, y, epochs=FLAGS.language_task_epochs, batch_size=batch_size, verbose=0)
    return model


def _learn_cr(method, base, tasks, seed):
    if method == "fip":
        operation = _learn_operation(tasks, seed)
        return operation, operation(base)
    memory = _memory(tasks, seed)
    new_task = (tasks["cr"][0], tasks["cr"][1] + OLD_CLASSES)
    budget = dict(epochs=FLAGS.language_cl_epochs, batch_size=64, verbose=0)
    common_args = dict(head="shared", learning_rate=FLAGS.language_cl_learning_rate)
    if method == "finetune":
        operation = keras_fip.baselines.FineTune(
            new_task, walk=keras_fip.Walk(**budget), **common_args
        )
    else:
        operation = keras_fip.baselines.EWC(
            new_task,
            fisher_data=memory,
            ewc_lambda="auto",
            lambda_grid=[float(v) for v in FLAGS.language_ewc_lambdas],
            validation_tasks=[tasks["sst5_validation"]],
            walk=keras_fip.Walk(**budget, seed=seed),
            **common_args,
        )
    return operation, operation(base)


def continual_stage(base, tasks, seed):
    """SST-5 → CR by each method; returns `(results, (fip_operation, fip_model))` (the
    latter `None` without `fip`), which the chain stage reuses as its first operation."""
    results = {f"before/{k}": v for k, v in _evaluate_both(base, tasks).items()}
    fip = None
    for method in FLAGS.language_cl_methods:
        start = time.perf_counter()
        operation, learned = _learn_cr(method, base, tasks, seed)
        if method == "fip":
            fip = (operation, learned)
        results.update({f"{method}/{k}": v for k, v in _evaluate_both(learned, tasks).items()})
        results[f"{method}/wall_time_seconds"] = time.perf_counter() - start
        if method == "ewc":
            results["ewc/lambda"] = operation.history["lambda"]
            results["ewc/lambda_validation_scores"] = {
                str(k): v for k, v in operation.history["lambda_scores"].items()
            }
    if "fip" in FLAGS.language_cl_methods:
        results["fip/sst5_drop_pp"] = 100 * (
            results["before/sst5/accuracy"] - results["fip/sst5/accuracy"]
        )
        if "finetune" in FLAGS.language_cl_methods:
            results["fip/cr_gap_to_finetune_pp"] = 100 * (
                results["finetune/cr/accuracy"] - results["fip/cr/accuracy"]
            )
    return results, fip


def _memory(tasks, seed):
    """The SST-5 training inputs ContinualLearn keeps (`--language_memory`, seeded)."""
    x_old = tasks["sst5"][0]
    return x_old[np.random.default_rng(seed).permutation(len(x_old))[: FLAGS.language_memory]]


def _learn_operation(tasks, seed):
    """ContinualLearn of CR (labels 5-6 on the shared 7-output head), as in `_learn_cr`."""
    return keras_fip.ContinualLearn(
        (tasks["cr"][0], tasks["cr"][1] + OLD_CLASSES),
        memory=_memory(tasks, seed),
        head="shared",
        walk=keras_fip.Walk(
            epochs=FLAGS.language_cl_epochs,
            rule=keras_fip.rules.Penalty(FLAGS.language_cl_learning_rate),
            batch_size=64,
            training=FLAGS.language_cl_training,
            record_every=FLAGS.language_record_every,
            seed=seed,
            verbose=0,
        ),
    )


def _compress_rate():
    return common.compress_learning_rate(
        FLAGS.language_compress_learning_rate, "language_compress_learning_rate"
    )


def _compress_operation(sparsity, data, seed):
    walk = keras_fip.Walk(
        steps=FLAGS.language_compress_steps,
        rule=keras_fip.rules.Penalty(_compress_rate()),
        batch_size=64,
        seed=seed,
        verbose=0,
        record_every=FLAGS.language_record_every,
    )
    return keras_fip.Compress(sparsity, data=data, walk=walk)


def chain_stage(base, tasks, seed, learned=None, report=None):
    """The two compositions at each sparsity; `report(results)` after each sparsity.

    Names (the seed text's "CL Co" is ambiguous; here the name is the order applied):
    `cl_then_co` = `keras_fip.chain(ContinualLearn, Compress)`: learn CR, then compress;
    `co_then_cl` = `keras_fip.chain(Compress, ContinualLearn)`: compress the SST-5
    network, then learn CR with its mask fixed.

    Compress keeps the outputs of the network it starts from on its anchor inputs. In
    `co_then_cl` that network knows SST-5 only, and its anchors are the SST-5 memory. In
    `cl_then_co` it already knows both tasks, so its anchors cover both tasks' inputs:
    the SST-5 memory and every CR training sentence (what ContinualLearn learned from),
    and D, the KL divergence over all seven outputs, keeps both heads (on a CR sentence
    the network puts 98-99% of its probability on the two CR outputs, so the KL holds
    their ratio, CR's decision). The ContinualLearn of `cl_then_co` does not depend on
    the sparsity: it runs once (or is `learned`, the continual stage's `(operation,
    model)`, the same operation) and each Compress starts from its result, which is
    `chain(ContinualLearn, Compress)(base)` = `Compress(ContinualLearn(base))`.

    Every recorded point joins a `keras_fip.Submanifold`: `base` (the SST-5 network),
    `cl` (the shared ContinualLearn path), `cl_then_co_<p>` (the Compress path from it)
    and `co_then_cl_<p>` (the Compress path, then the ContinualLearn path).
    """
    results = {}
    manifold = keras_fip.Submanifold(base, dtype="float16")
    manifold.add(base, "base")
    memory = _memory(tasks, seed)
    start = time.perf_counter()
    if learned is None:
        operation = _learn_operation(tasks, seed)
        learned = (operation, operation(base))
    learn_op, learned_model = learned
    manifold.add_path(learn_op.path, "cl", skip_first=True)
    results["cl/wall_time_seconds"] = time.perf_counter() - start
    both = np.concatenate([memory, tasks["cr"][0]])
    for percent in FLAGS.language_chain_sparsities:
        sparsity = float(percent) / 100
        start = time.perf_counter()
        # CL then Co: compress the network that learned CR, keeping both tasks' outputs.
        compress = _compress_operation(sparsity, both, seed)
        cl_then_co = compress(learned_model)
        manifold.add_path(compress.path, f"cl_then_co_{percent}", skip_first=True)
        # Co then CL: compress the SST-5 network on its inputs, then learn CR (mask fixed).
        (co_then_cl,) = manifold.grow(
            base,
            [
                keras_fip.chain(
                    _compress_operation(sparsity, memory, seed), _learn_operation(tasks, seed)
                )
            ],
            [f"co_then_cl_{percent}"],
        )
        for name, model in (("cl_then_co", cl_then_co), ("co_then_cl", co_then_cl)):
            results.update(
                {f"{percent}/{name}/{k}": v for k, v in _evaluate_both(model, tasks).items()}
            )
            results[f"{percent}/{name}/measured_sparsity"] = (
                keras_fip.core.projection.prunable_sparsity(model)
            )
        results[f"{percent}/weight_distance"] = _weights_distance(cl_then_co, co_then_cl)
        results[f"{percent}/weight_distance_cl_then_co_to_base"] = _weights_distance(
            cl_then_co, base
        )
        results[f"{percent}/weight_distance_co_then_cl_to_base"] = _weights_distance(
            co_then_cl, base
        )
        for task in ("sst5", "cr"):
            results[f"{percent}/{task}_gap_pp"] = 100 * abs(
                results[f"{percent}/cl_then_co/{task}/accuracy"]
                - results[f"{percent}/co_then_cl/{task}/accuracy"]
            )
        results[f"{percent}/wall_time_seconds"] = time.perf_counter() - start
        logging.info(
            "chain %s%%: %s (%.0f s)",
            percent,
            {k: v for k, v in results.items() if k.startswith(f"{percent}/")},
            results[f"{percent}/wall_time_seconds"],
        )
        if report is not None:
            report(results)
    return results, manifold


def _query_results(manifold, query, name, results):
    results[f"{name}/family_means"] = query["family_means"]
    results[f"{name}/best_family"] = min(
        query["family_means"],  # both: lower is better
        key=query["family_means"].get,
    )
    best = query["ranking"][0]
    results[f"{name}/best_network"] = {
        "index": best,
        "family": manifold.families[best],
        "score": query["scores"][best],
    }
    top = [manifold.families[i] for i in query["ranking"][:10]]
    results[f"{name}/top10_families"] = {f: top.count(f) for f in set(top)}
    # The two orders pooled over sparsities (the paper's CLCo / CoCL comparison).
    scores = np.asarray(query["scores"])
    for order in ("cl_then_co", "co_then_cl"):
        chosen = [f.startswith(order) for f in manifold.families]
        if any(chosen):
            results[f"{name}/order_means/{order}"] = float(np.mean(scores[chosen]))


def submanifold_stage(manifold, encoder, mlm, output_dir):
    """Queries the sub-manifold with unseen sets: NLL on the CR outputs (sentiment sets
    with labels) and pseudo-perplexity of each network's backbone under the pretrained
    masked-LM head (no labels: any set, TREC's questions included)."""
    results = {"networks": len(manifold)}
    families = sorted(set(manifold.families))
    results["families"] = {f: manifold.families.count(f) for f in families}
    queries = {}
    for name in FLAGS.language_queries:
        x, y = keras_fip.data.load(name, "test", FLAGS.data_dir)
        x, y = x[: FLAGS.language_query_examples], y[: FLAGS.language_query_examples]
        start = time.perf_counter()
        query = manifold.query((encoder(x), y), score="nll", outputs=(OLD_CLASSES, 2))
        queries[f"{name} (1 / NLL on the CR outputs)"] = (query, 1.0 / np.asarray(query["scores"]))
        _query_results(manifold, query, f"nll/{name}", results)
        results[f"nll/{name}/wall_time_seconds"] = time.perf_counter() - start
    as_scored = bert.under_masked_lm_head(mlm)
    for name in FLAGS.language_pppl_queries:
        x, _ = keras_fip.data.load(name, "test", FLAGS.data_dir)
        start = time.perf_counter()
        query = manifold.query(
            encoder(x[: FLAGS.language_pppl_query_sentences]),
            score="pseudo_perplexity",
            as_scored=as_scored,
        )
        queries[f"{name} (1 / pseudo-perplexity)"] = (query, 1.0 / np.asarray(query["scores"]))
        _query_results(manifold, query, f"pseudo_perplexity/{name}", results)
        results[f"pseudo_perplexity/{name}/wall_time_seconds"] = time.perf_counter() - start
    embedding = manifold.embedding()
    graph = manifold.graph(num_neighbors=4)
    results["graph/edges"] = len(graph)
    plot_submanifold(manifold, embedding, graph, queries, output_dir)
    return results


def plot_submanifold(manifold, embedding, graph, queries, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("family", None)] + list(queries.items())
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    axes = axes[0]
    families = sorted(set(manifold.families))
    for axis, (title, query) in zip(axes, panels):
        for i, j, _ in graph:
            axis.plot(embedding[[i, j], 0], embedding[[i, j], 1], color="0.85", lw=0.5, zorder=0)
        if query is None:
            for family in families:
                chosen = [k for k, f in enumerate(manifold.families) if f == family]
                axis.scatter(embedding[chosen, 0], embedding[chosen, 1], s=12, label=family)
            axis.legend(fontsize=6)
            axis.set_title("networks by family")
        else:
            points = axis.scatter(
                embedding[:, 0], embedding[:, 1], s=12, c=query[1], cmap="viridis"
            )
            figure.colorbar(points, ax=axis, label=title.split("(")[-1].rstrip(")"))
            axis.set_title(f"query: {title}")
        axis.set(xlabel="MDS 1 (weights)", ylabel="MDS 2")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "submanifold.png"))
    plt.close(figure)


def plot(results, seed, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = f"seed{seed}/"
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    chain_percents = [
        p
        for p in FLAGS.language_chain_sparsities
        if f"{prefix}chain/{p}/cl_then_co/sst5/accuracy" in results
    ]
    for task, axis in zip(("sst5", "cr"), axes):
        for name in ("cl_then_co", "co_then_cl"):
            axis.plot(
                [float(p) for p in chain_percents],
                [results[f"{prefix}chain/{p}/{name}/{task}/accuracy"] for p in chain_percents],
                "o-",
                label=name,
            )
        axis.set(xlabel="sparsity (%)", ylabel=f"{task} test accuracy", title=task)
        axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "compositions.png"))
    plt.close(figure)
    percents = [
        p
        for p in FLAGS.language_sparsities
        if f"{prefix}compress/{p}/masked_token_accuracy" in results
    ]
    if percents:
        figure, axis = plt.subplots(figsize=(5, 4))
        axis.plot(
            [0] + [float(p) for p in percents],
            [results[f"{prefix}compress/dense/masked_token_accuracy"]]
            + [results[f"{prefix}compress/{p}/masked_token_accuracy"] for p in percents],
            "o-",
        )
        axis.set(xlabel="sparsity (%)", ylabel="held-out masked-token accuracy")
        figure.tight_layout()
        figure.savefig(os.path.join(output_dir, "mlm_sparsity.png"))
        plt.close(figure)


def main(argv):
    del argv  # Unused.
    stages = [common.check_choice(s, "language_stages", STAGES) for s in FLAGS.language_stages]
    for method in FLAGS.language_cl_methods:
        common.check_choice(method, "language_cl_methods", CL_METHODS)
    _compress_rate()  # A bad rate is refused before any work.
    run = common.start(
        "language", unsupported=common.single_device_parts(["pretrain"] + stages, SINGLE_DEVICE)
    )
    try:
        with run.scope():
            _main(stages, run)
    finally:
        run.close()


def _main(stages, run):
    output_dir = run.output_dir
    results = {}
    start = time.perf_counter()

    def timed(name, begin):
        """Records and logs a stage's wall time; writes results.json."""
        results[f"{prefix}{name}/stage_wall_time_seconds"] = time.perf_counter() - begin
        logging.info(
            "stage %s%s: %.0f s (%.0f s since start)",
            prefix,
            name,
            time.perf_counter() - begin,
            time.perf_counter() - start,
        )
        common.write_json(output_dir, "results.json", results)

    for seed in [int(s) for s in FLAGS.seeds]:
        prefix = f"seed{seed}/"
        begin = time.perf_counter()
        mlm, encoder, pretrained = pretrain(seed)
        results.update(
            {
                f"{prefix}pretrain/{k}": v
                for k, v in pretrained.items()
                if k not in ("train/history", "config")
            }
        )
        held_out = encoder(text.held_out_sentences(data_dir=FLAGS.data_dir))
        held_out = held_out[np.random.default_rng(seed).permutation(len(held_out))]
        timed("pretrain", begin)
        if "compress" in stages:
            begin = time.perf_counter()
            stage = compress_stage(mlm, encoder, held_out, seed)
            results.update({f"{prefix}compress/{k}": v for k, v in stage.items()})
            timed("compress", begin)
        if "continual" in stages or "chain" in stages:
            begin = time.perf_counter()
            tasks = _tasks(encoder)
            base = sst5_classifier(mlm, tasks, seed)
            timed("sst5_classifier", begin)
            learned = None
            if "continual" in stages:
                begin = time.perf_counter()
                stage, learned = continual_stage(base, tasks, seed)
                results.update({f"{prefix}continual/{k}": v for k, v in stage.items()})
                timed("continual", begin)
            if "chain" in stages:

                def report(stage):
                    results.update({f"{prefix}chain/{k}": v for k, v in stage.items()})  # noqa: B023
                    common.write_json(output_dir, "results.json", results)

                begin = time.perf_counter()
                stage, manifold = chain_stage(base, tasks, seed, learned, report)
                results.update({f"{prefix}chain/{k}": v for k, v in stage.items()})
                timed("chain", begin)
                begin = time.perf_counter()
                stage = submanifold_stage(manifold, encoder, mlm, output_dir)
                results.update({f"{prefix}submanifold/{k}": v for k, v in stage.items()})
                timed("submanifold", begin)
        plot(results, seed, output_dir)
    results["wall_time_seconds"] = time.perf_counter() - start
    config = {
        name: FLAGS[name].value
        for name in FLAGS
        if name.startswith("language_") or name in ("seeds", "data_dir")
    }
    common.write_json(output_dir, "config.json", config)
    run.scalars(results, prefix="language")
    common.write_json(output_dir, "results.json", results)
    for key in sorted(results):
        logging.info("%s: %s", key, results[key])


if __name__ == "__main__":
    # One seed by default: three do not fit in the hour (see the module docstring for the
    # three-seed command). Set here, not at import, so other apps keep `--seeds=0,1,2`.
    FLAGS.set_default("seeds", ["0"])
    app.run(main)
