r"""Trains a zoo network on a dataset: the base networks every FIP experiment starts from.

Writes `<output_dir>/model.keras`, `config.json` and `results.json` (keys like
`"test/accuracy"`). The same configuration is cached (see `--cache_dir`) so later apps reuse
the network instead of training it again.

Example:

    python -m apps.train --model=lenet_300_100 --dataset=mnist --epochs=10 \
        --output_dir=runs/lenet_mnist

On a GPU/TPU host add `--strategy=mirrored` (or `--strategy=tpu --tpu=<address>`) and
raise `--batch_size` (it is global: split across the replicas). Across hosts, run the same
command with `--strategy=multi_worker` on every host, each with its `TF_CONFIG` (see
`keras_fip.distribute`); only the chief writes `--output_dir` and the cache. TensorBoard
scalars (train/test accuracy and loss) go to `<output_dir>/logs`: `tensorboard --logdir runs`.
"""

import os
import shutil

from absl import flags

from apps import common

# Caching
flags.DEFINE_bool(
    "use_cache",
    True,
    "Reuse a cached network trained with the same configuration instead of training again.",
)

FLAGS = flags.FLAGS

CONFIG_FLAGS = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
    "data_dir",
    "strategy",
    "tpu",
)


def main(argv):
    del argv  # Unused.
    config = common.flag_values(CONFIG_FLAGS)
    run = common.start("train")
    model, results = run.base_network(
        model=FLAGS.model,
        dataset=FLAGS.dataset,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir if FLAGS.use_cache else False,
        verbose=2,
    )
    output_dir = run.output_dir
    model_path = os.path.join(output_dir, "model.keras")
    if results.get("cache/path"):
        shutil.copyfile(os.path.join(results["cache/path"], "model.keras"), model_path)
    else:
        model.save(model_path)
    common.write_json(output_dir, "config.json", config)
    common.write_json(output_dir, "results.json", results)
    run.scalars(results, step=FLAGS.epochs, prefix=FLAGS.model)
    run.close()
    print(
        f"{FLAGS.model} on {FLAGS.dataset}: test accuracy {results['test/accuracy']:.4f}, "
        f"trained in {results['train/wall_time_seconds']:.1f} s -> {model_path}"
    )


if __name__ == "__main__":
    common.run(
        main,
        shared=(*common.TRAINING_FLAGS, "model"),
    )
