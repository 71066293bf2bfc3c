"""SIGTERM (a preempted VM, a cluster's time limit) or Ctrl-C: save after the current step, then
stop; a second Ctrl-C stops at once. With several processes, SIGTERM is left to JAX's preemption
service, which stops every process at the same step (orbax's `reached_preemption`), and Ctrl-C
sends this process a SIGTERM. Off the main thread (a notebook's worker) only orbax's check remains.
"""

import os
import signal
import threading

import jax

from flaxgpt import distributed


class StopRequest:
    """A context manager that catches the signals; `reached(step, manager)` asks whether to stop."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._together = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT,) if self._together else (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, _frame):
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._together:  # JAX's handler tells every process to stop at the same step
            os.kill(os.getpid(), signal.SIGTERM)
        if distributed.is_main_process():
            again = " (Ctrl-C again stops at once, without saving)" * (signum == signal.SIGINT)
            print(f"\n{self.signal_name}: saving a checkpoint after this step, then "
                  f"stopping{again}", flush=True)

    def reached(self, step: int, manager) -> bool:
        """Whether to save and stop before `step` (manager: orbax's CheckpointManager); every
        process must ask at every step."""
        alone_stopped = not self._together and self.signal_name is not None
        return alone_stopped or manager.reached_preemption(step)
