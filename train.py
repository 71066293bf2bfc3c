"""Train a GPT: python train.py --config=configs/shakespeare_char.py:cpu [--config.key=value ...]"""

from absl import app, flags, logging
from ml_collections import config_flags

from flaxgpt import config as config_lib
from flaxgpt.trainer import train

CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/, e.g. configs/owt.py",
                                         lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings are --config.key=value")
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every checkpoint write at INFO
    config = CONFIG.value
    config_lib.validate(config)
    train(config)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
