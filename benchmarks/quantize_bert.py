"""Quantize on the language app's BERT encoder against Keras's int8/int4 PTQ and GPTQ.

Pretrains (or reads from the cache) a masked-LM BERT as the language app does
(`keras_fip.models.bert.pretrained_masked_lm`; by default a smaller one, on 8,000 sentences;
the app's model with the flags of the second example) for each seed and quantises it at
each of `--bits` with:

- `fip`: `keras_fip.Quantize(bits, data=anchor)`, its defaults, with the walk's seed and
  `--fip_epochs` of budget (or exactly `--fip_steps`); `anchor` is `--anchor_sentences`
  pretraining sentences with 15% of their pieces masked (as the app's Compress stage keeps
  the masked-LM outputs on);
- `keras_int8`, `keras_int4`: Keras's `model.quantize` (`keras_int4` at 4 bits and below,
  the lowest width Keras has);
- `gptq`: Keras's GPTQ at `bits` (`keras_fip.baselines.quantization.keras_gptq`: the
  encoder's transformer layers as blocks, calibrated on the anchor sentences' pieces,
  `--gptq_samples` windows).

Reports, per seed, method and bit width, the masked-token accuracy and loss on
`--eval_sentences` held-out sentences (15% of their pieces `[MASK]`-ed,
`keras_fip.models.bert.masked_token_accuracy`), the drop from float in points, and the
layers each method quantised; one JSON line each, then a summary line per method and width
(mean over seeds). `--output` also writes them as `results.json` (with provenance).

Example (a 2-layer BERT of width 64 pretrained on 8,000 sentences for 5 epochs):

    python -m benchmarks.quantize_bert

The language app's BERT (vocabulary 4,000, width 128, all 34k pretraining sentences, 10
epochs; Quantize keeps the outputs on the app's 4,096 anchor sentences):

    python -m benchmarks.quantize_bert --vocabulary_size=4000 --hidden_dim=128 \
        --intermediate_dim=512 --max_sentences=0 --pretrain_epochs=10 \
        --anchor_sentences=4096 --eval_sentences=2000 --gptq_samples=128 \
        --output=results/quantize_bert
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_fip
from keras_fip.baselines import quantization as baselines
from keras_fip.core import layers as layers_lib
from keras_fip.data import text
from keras_fip.models import bert

METHODS = ("fip", "keras_int8", "keras_int4", "gptq")


def held_out_sentences(seed):
    """The held-out sentences shuffled by `seed` (in the language app's order)."""
    sentences = text.held_out_sentences()
    return sentences[np.random.default_rng(seed).permutation(len(sentences))]


def anchor_inputs(model, encoder, count, seed):
    """`count` pretraining sentences, shuffled by `seed`, 15% of their pieces masked."""
    corpus = text.pretraining_corpus()
    order = np.random.default_rng(seed).permutation(len(corpus))
    token_ids = encoder(corpus[order[:count]])
    num_predictions = model.input_shape[1] - token_ids.shape[1]
    packed, _, _ = bert.mask_tokens(
        token_ids, num_predictions, encoder.mask_id, encoder.vocabulary_size, seed=seed + 7
    )
    return packed


def quantized_layers(model):
    """Names of the layers `model` holds in a Keras quantised form, by mode."""
    modes = {}
    for layer in layers_lib.all_layers(model):
        mode = getattr(layer, "quantization_mode", None)
        if mode == "gptq" and not getattr(layer, "is_gptq_calibrated", False):
            continue  # Prepared by `model.quantize("gptq")` but outside GPTQ's blocks: float.
        if mode is not None:
            modes.setdefault(mode, []).append(layer.name)
    return modes


def run_seed(args, seed):
    model, encoder, pretrained = bert.pretrained_masked_lm(
        vocabulary_size=args.vocabulary_size,
        sequence_length=args.sequence_length,
        num_layers=args.num_layers,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        epochs=args.pretrain_epochs,
        seed=seed,
        max_sentences=args.max_sentences or None,
        cache_dir=args.cache_dir or None,
    )
    held_out = encoder(held_out_sentences(seed)[: args.eval_sentences])
    anchor = anchor_inputs(model, encoder, args.anchor_sentences, seed)
    rows = []

    def record(method, bits, quantized, seconds, extra=None):
        evaluation = bert.masked_token_accuracy(quantized, held_out)
        row = {
            "seed": seed,
            "method": method,
            "bits": bits,
            "accuracy": evaluation["accuracy"],
            "loss": evaluation["loss"],
            "wall_time_seconds": seconds,
            **(extra or {}),
        }
        if rows:
            row["drop_pp"] = 100 * (rows[0]["accuracy"] - row["accuracy"])
        print(json.dumps({"benchmark": "quantize_bert", **row}), flush=True)
        rows.append(row)

    record("float", 32, model, pretrained["train/wall_time_seconds"])

    def timed(build):
        start = time.perf_counter()
        return build(), time.perf_counter() - start

    for bits in args.bits:
        if "fip" in args.methods:
            budget = {"steps": args.fip_steps} if args.fip_steps else {"epochs": args.fip_epochs}
            walk = keras_fip.Walk(**budget, seed=seed, verbose=0)
            op = keras_fip.Quantize(bits, data=anchor, walk=walk)
            quantized, seconds = timed(lambda op=op: op(model))
            record(
                "fip",
                bits,
                quantized,
                seconds,
                {
                    "steps": op.history["steps"],
                    "keras_layers": op.history["keras_layers"],
                    "layer_error": op.history["layer_error"],
                },
            )
        for method, mode in (("keras_int8", "int8"), ("keras_int4", "int4")):
            if method in args.methods and (bits == 8) == (mode == "int8"):
                quantized, seconds = timed(lambda mode=mode: baselines.keras_ptq(model, mode))
                record(method, bits, quantized, seconds, {"layers": quantized_layers(quantized)})
        if "gptq" in args.methods:
            quantized, seconds = timed(
                lambda bits=bits: baselines.keras_gptq(
                    model, bits, anchor, num_samples=args.gptq_samples
                )
            )
            record("gptq", bits, quantized, seconds, {"layers": quantized_layers(quantized)})
    return rows


def summarize(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault((row["method"], row["bits"]), []).append(row)
    lines = []
    for (method, bits), group in sorted(grouped.items(), key=lambda item: -item[0][1]):
        accuracies = [row["accuracy"] for row in group]
        line = {
            "method": method,
            "bits": bits,
            "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)),
            "drop_pp_mean": float(np.mean([row.get("drop_pp", 0.0) for row in group])),
            "seeds": len(group),
        }
        printed = {
            "benchmark": "quantize_bert",
            "summary": True,
            "method": method,
            "bits": bits,
            "accuracy/mean": line["accuracy_mean"],
            "accuracy/std": line["accuracy_std"],
            "drop_pp/mean": line["drop_pp_mean"],
            "seeds": line["seeds"],
        }
        print(json.dumps(printed), flush=True)
        lines.append(line)
    return lines


NAMES = {
    "float": "float32",
    "fip": "Quantize (defaults)",
    "keras_int8": "Keras int8 PTQ",
    "keras_int4": "Keras int4 PTQ",
    "gptq": "Keras GPTQ",
}


def summary_page(args, lines):
    """The results page's summary: masked-token accuracy per method and width."""
    seeds = ", ".join(str(seed) for seed in args.seeds)
    rows = [
        [
            NAMES[line["method"]],
            line["bits"],
            f"{100 * line['accuracy_mean']:.2f} ± {100 * line['accuracy_std']:.2f}",
            f"{line['drop_pp_mean']:+.2f}",
        ]
        for line in lines
    ]
    return {
        "title": "Quantize: the language app's BERT masked LM",
        "description": (
            f"Masked-token accuracy (%) on {args.eval_sentences} held-out sentences (15% of "
            f"the pieces masked), mean ± std over seeds {seeds}; a {args.num_layers}-layer "
            f"BERT (hidden {args.hidden_dim}) pretrained for {args.pretrain_epochs} epochs "
            f"on {args.max_sentences or 'all'} pretraining sentences. Quantize walks "
            f"{args.fip_epochs} epochs of {args.anchor_sentences} masked sentences, inputs "
            "only; GPTQ quantises the encoder blocks (embeddings and head float)."
        ),
        "tables": [
            {
                "caption": "Masked-token accuracy (%)",
                "columns": ["method", "bits", "accuracy", "drop from float (pp)"],
                "rows": rows,
            }
        ],
    }


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vocabulary_size", type=int, default=2000)
    parser.add_argument("--sequence_length", type=int, default=48)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--hidden_dim", type=int, default=64)
    parser.add_argument("--intermediate_dim", type=int, default=256)
    parser.add_argument("--pretrain_epochs", type=int, default=5)
    parser.add_argument("--max_sentences", type=int, default=8000, help="0: all of them.")
    parser.add_argument("--anchor_sentences", type=int, default=512)
    parser.add_argument("--eval_sentences", type=int, default=1000)
    parser.add_argument("--fip_epochs", type=int, default=3)
    parser.add_argument("--fip_steps", type=int, default=0, help="0: --fip_epochs decides.")
    parser.add_argument("--gptq_samples", type=int, default=32)
    parser.add_argument("--cache_dir", default="", help="Pretrained models' cache.")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"`--methods` must be among {list(METHODS)}. Received: {unknown}")
    return args


def main(argv=None):
    args = parse(argv)
    keras.utils.set_random_seed(args.seeds[0])
    rows = []
    for seed in args.seeds:
        rows.extend(run_seed(args, seed))
    summary = summarize(rows)
    if args.output:
        from apps.provenance import write_results

        write_results(
            args.output,
            {"rows": rows, "summary": summary, "flags": vars(args)},
            page=summary_page(args, summary),
        )
    return rows, summary


if __name__ == "__main__":
    main()
