"""Train a GPT: python train.py --config=configs/shakespeare_char.py:cpu [--config.key=value ...]

Check a config for a Cloud TPU slice or GPUs on any machine, without them: add --compile_for=v5e-8
or --compile_for=h100-8 (see flaxgpt/compile_for.py); it compiles the train step and prints memory
per device and a fits verdict.
"""

import difflib
import os
import re
import runpy
import sys
import traceback
from pathlib import Path

from flaxgpt import compile_for, distributed, faults  # first: jax's import without plugin noise
from flaxgpt.config import validate
from flaxgpt.loop import train

import jax
from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a config file in configs/, e.g. configs/owt.py", lock_config=True)
COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "compile the train step for a Cloud TPU slice (e.g. v5e-8, v4-32) or "
    "NVIDIA GPUs (h100-8, a100-1, h200-16) on this machine, report memory per device, and exit")
VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "print the libraries' own reports of a failure (orbax's tracebacks from its "
    "threads) too; the same as FLAXGPT_VERBOSE=1")


def main(argv):
    if len(argv) > 1:
        faults.exit_with(f"train.py: error: unexpected arguments {' '.join(argv[1:])}: "
                         "settings are --config.key=value")
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every checkpoint write at INFO
    if VERBOSE.value:
        os.environ[faults.VERBOSE_VARIABLE] = "1"
    faults.quiet_until_exit()
    with faults.errors_reported("train.py", exit_program=distributed.exit_program,
                                interrupted="interrupted (a second Ctrl-C): nothing was saved "
                                "since the last checkpoint"):
        config = CONFIG.value
        if COMPILE_FOR.value:
            validate(config)
            jax.config.update("jax_platforms", "cpu")  # the target's devices only compile
            sys.exit(0 if compile_for.plan(config, COMPILE_FOR.value).fits else 1)
        train(config)


def _load_config(config_arg: str):
    """The ConfigDict of `path[:variant]`, as ml_collections builds it; a file that does not load
    ends the program with one line: its file:line and message."""
    path, *variant = config_arg.split(":", 1)
    if not Path(path).is_file():
        choices = ", ".join(sorted(str(p) for p in Path("configs").glob("*.py")))
        faults.exit_with(f"train.py: error: no config file {path} "
                         f"(configs here: {choices or 'none'})")
    try:
        return runpy.run_path(path)["get_config"](*variant)
    except SyntaxError as e:
        error = f"{e.filename}:{e.lineno}: {e.msg}"
    except Exception as e:
        frame = next((f for f in reversed(traceback.extract_tb(e.__traceback__))
                      if Path(f.filename).resolve() == Path(path).resolve()), None)
        error = f"{f'{frame.filename}:{frame.lineno}' if frame else path}: {type(e).__name__}: {e}"
    faults.exit_with(f"train.py: error: the config file does not load: {error}")


def _config_keys(config, prefix=""):
    """Every key of a ConfigDict, dotted, sections ("mesh") as well as their keys ("mesh.data")."""
    for key, value in config.items():
        yield prefix + key
        if hasattr(value, "items"):
            yield from _config_keys(value, f"{prefix}{key}.")


def parse_flags(argv):
    """absl's parser, with one line instead of a traceback for a bad config file or an unknown
    --config.key (with the config's keys closest to it)."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    config = _load_config(config_arg) if config_arg else None
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections': a key, a section's key
        match = re.search(r"'([^'\\]+)", str(e))
        key = match.group(1) if match else str(e)
        arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
        keys = [] if config is None else list(_config_keys(config))
        close = difflib.get_close_matches(arg.removeprefix("--config."), keys, n=3, cutoff=0.5)
        hint = (f"; did you mean {' or '.join('--config.' + k for k in close)}?" if close else
                "; the keys are in flaxgpt/config.py" if keys else "")
        faults.exit_with(f"train.py: error: {arg}: the config has no key {key!r}{hint}")
    except flags.Error as e:
        reason = str(e).strip().splitlines()[-1]  # a config file's own exception comes last
        if "--config must have a value" in reason:
            reason = "give a config: --config=configs/shakespeare_char.py:cpu (or configs/*.py)"
        faults.exit_with(f"train.py: error: {reason}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
