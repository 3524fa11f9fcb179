r"""Trains a zoo network on a dataset: the base networks every FIP experiment starts from.

Writes `<output_dir>/model.keras`, `config.json` and `results.json` (keys like
`"test/accuracy"`). The same configuration is cached (see `--cache_dir`) so later apps reuse
the network instead of training it again.

Example:

    python -m apps.train --model=lenet_300_100 --dataset=mnist --epochs=10 \
        --output_dir=runs/lenet_mnist

On a GPU/TPU host add `--strategy=mirrored` (or `tpu`) and raise `--batch_size`.
"""

import os
import shutil

from absl import app
from absl import flags

from apps import common
from keras_fip import models

# Caching
flags.DEFINE_bool("use_cache", True, "Reuse a cached network trained with the same "
                  "configuration instead of training again.")

FLAGS = flags.FLAGS

CONFIG_FLAGS = ("model", "dataset", "epochs", "batch_size", "learning_rate", "seed",
                "data_dir", "strategy")


def main(argv):
    del argv  # Unused.
    config = common.flag_values(CONFIG_FLAGS)
    strategy = common.get_strategy(FLAGS.strategy)
    model, results = models.base_network(
        model=FLAGS.model,
        dataset=FLAGS.dataset,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed,
        data_dir=FLAGS.data_dir,
        cache_dir=FLAGS.cache_dir if FLAGS.use_cache else False,
        verbose=2,
        strategy=strategy,
    )
    output_dir = common.output_dir("train")
    os.makedirs(output_dir, exist_ok=True)
    model_path = os.path.join(output_dir, "model.keras")
    if results.get("cache/path"):
        shutil.copyfile(os.path.join(results["cache/path"], "model.keras"), model_path)
    else:
        model.save(model_path)
    common.write_json(output_dir, "config.json", config)
    common.write_json(output_dir, "results.json", results)
    print(
        f"{FLAGS.model} on {FLAGS.dataset}: test accuracy {results['test/accuracy']:.4f}, "
        f"trained in {results['train/wall_time_seconds']:.1f} s -> {model_path}"
    )


if __name__ == "__main__":
    app.run(main)
