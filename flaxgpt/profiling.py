"""`config.profile_steps = "START:STOP"`: a jax.profiler trace of train steps START..STOP-1 in
out_dir/profile.

Open it with `tensorboard --logdir out_dir/profile` (the Profile tab; `pip install
tensorboard-plugin-profile`), with xprof, or load the `*.trace.json.gz` file into
https://ui.perfetto.dev. With out_dir in a bucket, the trace is written to a local temporary folder
and uploaded when it stops.
"""

import contextlib

import jax

from flaxgpt import storage

PROFILE_DIR = "profile"


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """"START:STOP" -> (START, STOP); "" -> None. ValueError naming the key for anything else."""
    if not text:
        return None
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"config.profile_steps={text!r}: use START:STOP, e.g. 10:15 (steps 10 to "
                         "14)") from None
    if not 0 <= start < stop:
        raise ValueError(f"config.profile_steps={text!r}: START must be >= 0 and less than STOP")
    return start, stop


class StepProfiler:
    """Starts the trace before step START and stops it once step STOP - 1 has finished; a context
    manager that stops it on exit."""

    def __init__(self, profile_steps: str, out_dir: storage.Path, log=print):
        self.steps = parse_profile_steps(profile_steps)
        self.directory, self.log = storage.path(out_dir) / PROFILE_DIR, log
        self._folder = None  # the trace's local folder (storage.local_folder) while tracing

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()

    @property
    def tracing(self) -> bool:
        return self._folder is not None

    def before_step(self, step: int) -> None:
        if self.steps and step == self.steps[0] and self._folder is None:
            self._folder = contextlib.ExitStack()
            folder = self._folder.enter_context(storage.local_folder(self.directory))
            jax.profiler.start_trace(folder)

    def after_step(self, step: int, result) -> None:
        if self._folder is not None and step >= self.steps[1]:
            jax.block_until_ready(result)
            self.stop()
            self.log(f"profiled steps {self.steps[0]} to {self.steps[1] - 1} into {self.directory}")

    def stop(self) -> None:
        if self._folder is not None:
            jax.profiler.stop_trace()
            self._folder.close()
            self._folder = None
