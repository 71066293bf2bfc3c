"""Train a GPT: python train.py --config=configs/shakespeare_char.py:cpu [--config.key=value ...]

Check a config for a Cloud TPU slice on any machine, without the slice: add --compile_for=v5e-8 (see
flaxgpt/tpu_compile.py); it compiles the train step and prints memory per chip and a fits verdict.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from flaxgpt import config as config_lib
from flaxgpt.trainer import train

CONFIG = config_flags.DEFINE_config_file("config", None, "a config file in configs/, e.g. configs/owt.py",
                                         lock_config=True)
COMPILE_FOR = flags.DEFINE_string("compile_for", None, "compile the train step for a Cloud TPU slice (e.g. "
                                  "v5e-8, v4-32, v5p-128) on this machine, report memory per chip, and exit")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings are --config.key=value")
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every checkpoint write at INFO
    config = CONFIG.value
    try:
        config_lib.validate(config)
        if COMPILE_FOR.value:
            sys.exit(0 if compile_for(config, COMPILE_FOR.value) else 1)
        train(config)
    except (FileNotFoundError, ValueError, FloatingPointError, RuntimeError) as e:  # what a user can fix
        sys.exit(f"train.py: error: {e}")


def compile_for(config, slice_name: str) -> bool:
    import jax
    from flaxgpt import tpu_compile
    jax.config.update("jax_platforms", "cpu")  # the TPU devices are compile-only; nothing runs
    return tpu_compile.plan(config, slice_name)


def parse_flags(argv):
    """absl's parser, with one line instead of a traceback for an unknown --config.key."""
    config_file = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")), None)
    if config_file and not Path(config_file).is_file():
        choices = ", ".join(sorted(str(p) for p in Path("configs").glob("*.py")))
        sys.exit(f"train.py: error: no config file {config_file} (configs here: {choices or 'none'})")
    try:
        return flags.FLAGS(argv)
    except AttributeError as e:  # ml_collections' error for a key the config does not have
        key = str(e).strip("\"'")
        arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
        sys.exit(f"train.py: error: {arg}: the config has no key {key!r} (python train.py "
                 "--config=<file> --helpfull lists them)")
    except flags.Error as e:
        reason = str(e).strip().splitlines()[-1]  # a config file's own exception comes last
        sys.exit(f"train.py: error: {reason}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
