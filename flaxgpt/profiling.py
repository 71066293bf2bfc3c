"""`config.profile_steps = "START:STOP"`: a jax.profiler trace of train steps START..STOP-1 in
out_dir/profile.

Open it with `tensorboard --logdir out_dir/profile` (the Profile tab; `pip install
tensorboard-plugin-profile`), with xprof, or load the `*.trace.json.gz` file into
https://ui.perfetto.dev. With out_dir in a bucket, the trace is written to a local temporary folder
and uploaded when it stops.
"""

import shutil
import tempfile

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
    """Starts the trace before step START and stops it once step STOP - 1 has finished."""

    def __init__(self, profile_steps: str, out_dir: storage.Path, log=print):
        self.steps = parse_profile_steps(profile_steps)
        self.directory, self.log, self.tracing = storage.path(out_dir) / PROFILE_DIR, log, False
        self._local = None  # the temporary folder of a trace bound for a bucket

    def before_step(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.tracing:
            if storage.is_remote(self.directory):
                self._local = tempfile.mkdtemp(prefix="flaxgpt-profile-")
            jax.profiler.start_trace(self._local or str(self.directory))
            self.tracing = True

    def after_step(self, step: int, result) -> None:
        if self.tracing and step >= self.steps[1]:
            jax.block_until_ready(result)
            self.stop()
            self.log(f"profiled steps {self.steps[0]} to {self.steps[1] - 1} into {self.directory}")

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            if self._local:
                storage.upload_folder(self._local, self.directory)
                shutil.rmtree(self._local, ignore_errors=True)
                self._local = None
