"""A run that stops instead of hanging: a scheduler restarts a job that exits, none one that hangs.

`Watchdog` (entered by train() around the run) runs one thread in each process that
- ends this process with one line as soon as another process published that it failed;
- publishes this process's heartbeat (a beat count, its last completed step, the bucket call it
  waits in) and reads the others', to tell "process 1 stopped at step 41" from "I am stuck";
- with stall_timeout_s > 0: when no step, evaluation or checkpoint completed for that long (a first
  call, which compiles, does not count), or a bucket call has not returned for that long, writes
  every thread's stack to a file, prints one line naming the cause, and exits with
  STALL_EXIT_CODE; the other processes stop with it, and the run resumes from its checkpoint.
"""

import contextlib
import faulthandler
import json
import os
import tempfile
import threading
import time

import jax

from flaxgpt import distributed, faults, storage

STALL_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; resume the run
STALLS_DIR = "stalls"
TICK_S = 0.5  # how often the thread looks for failed peers
STACKS_UPLOAD_S = 10  # how long a stack file may take to reach a bucket out_dir


def coordination_heartbeat_s(stall_timeout_s: float) -> int:
    """jax's heartbeat time-out for a run: jax aborts every process when one is silent that long,
    without naming it; it waits twice the stall time-out (at least jax's 100 s), so that the
    watchdog, which names the silent process, comes first."""
    return max(100, int(2 * stall_timeout_s))


class Watchdog:
    """A context for the body of a run; `progress` after each completed step, evaluation and
    checkpoint, `first_call` around a call that may compile."""

    def __init__(self, stall_timeout_s: float, out_dir: storage.Path):
        self.timeout_s, self.out_dir = stall_timeout_s, out_dir
        self.beat_s = min(max(stall_timeout_s / 10, TICK_S), 5.0) if stall_timeout_s > 0 else 5.0
        self.me, self.many = jax.process_index(), jax.process_count() > 1
        self.done_last = "the start"  # what completed last, e.g. "step 41"
        self._last, self._compiling, self._compiled = None, 0, set()  # _last None: not armed
        self._peers = {}  # process -> (its last heartbeat, when it last changed here)
        self._answered = time.monotonic()  # when the coordination service last answered
        self._calls = {}  # bucket call this process waits in -> since when
        self._done = threading.Event()

    def __enter__(self):
        if self.many or self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="flaxgpt-watchdog")
            self._thread.start()
        return self

    def __exit__(self, kind, error, _tb):
        self._done.set()
        if hasattr(self, "_thread"):
            self._thread.join()
        if error is not None and self.many:
            with contextlib.suppress(Exception):
                distributed.publish("failed", faults.first_line(error))

    def progress(self, done: str) -> None:
        """`done` (e.g. "step 41", "the evaluation at step 40") completed: the stall clock starts
        over (and starts at all at the first call)."""
        self.done_last, self._last = done, time.monotonic()

    @contextlib.contextmanager
    def first_call(self, what: str):
        """A context around a call that compiles when it is the first of `what`: not a stall."""
        first = what not in self._compiled
        self._compiled.add(what)
        self._compiling += first
        try:
            yield
        finally:  # the clock first, so that the watching thread never sees an old one
            if first and self._last is not None:
                self._last = time.monotonic()
            self._compiling -= first

    def _stalled_for(self, now: float) -> float:
        return 0.0 if self._last is None or self._compiling else now - self._last

    def _watch(self):
        beats, next_beat = 0, 0.0
        while not self._done.wait(TICK_S):
            now = time.monotonic()
            if self.many:
                try:
                    self._check_failed()
                    if now >= next_beat:
                        beats, next_beat = beats + 1, now + self.beat_s
                        self._beat(beats, now)
                    self._answered = now
                except TimeoutError:  # the coordinator is frozen or overloaded: a stall says so
                    pass
                except Exception:  # the coordination service (process 0) is gone
                    if not self._done.is_set():
                        distributed.exit_program("flaxgpt: lost the coordinator (process 0): "
                                                 "stopping this process")
                    return
            if self.timeout_s > 0:
                calls = storage.waiting_calls()
                self._calls = {call: self._calls.get(call, now) for call in calls}
                if self._stalled_for(now) > self.timeout_s or any(
                        now - since > self.timeout_s for since in self._calls.values()):
                    self._stop(now)

    def _check_failed(self):
        failed = sorted((i, m) for i, m in distributed.published("failed").items() if i != self.me)
        if failed:
            process, message = failed[0]
            line, code = f"flaxgpt: stopping: process {process} failed: {message}", 1
            if message.startswith("stalled:"):
                where = self._dump_stacks(" waits for the storage: " in message)
                line, code = f"{line}; this host's stacks in {where}", STALL_EXIT_CODE
            distributed.exit_program(line, code)

    def _beat(self, beats: int, now: float):
        stalled = self._stalled_for(now) > 2 * self.beat_s
        distributed.publish("heartbeat", json.dumps({
            "beat": beats, "done": self.done_last,
            "waiting": storage.waiting_calls()[:1] if stalled else []}))
        for process, text in distributed.published("heartbeat").items():
            beat, seen = json.loads(text), self._peers.get(process)
            if process != self.me and (seen is None or seen[0]["beat"] != beat["beat"]):
                self._peers[process] = (beat, now)

    def _cause(self, now: float) -> tuple[str, bool]:
        """What this process knows of why nothing completes -> (words, whether the storage is the
        suspect)."""
        silent = now - self._answered
        if self.many and silent > self.beat_s + distributed.KV_TIMEOUT_S:
            last = f" after {self._peers[0][0]['done']}" if 0 in self._peers else ""
            return (f"process 0 (the coordinator) stopped answering{last} (silent for "
                    f"{silent:.0f} s): it is frozen, or its host is gone", False)
        quiet = [(now - seen, p, beat["done"]) for p, (beat, seen) in self._peers.items()
                 if now - seen > max(3 * self.beat_s, self.timeout_s / 2)]
        if quiet:
            age, process, done = max(quiet)
            return (f"process {process} stopped reporting after {done} (silent for "
                    f"{age:.0f} s): it is frozen, or its host is gone", False)
        never = sorted(set(range(jax.process_count())) - {self.me} - self._peers.keys())
        if self.many and never:
            return f"process {never[0]} never reported: it is frozen, or its host is gone", False
        waits = [(self.me, call) for call in sorted(self._calls, key=self._calls.get)[:1]] + [
            (p, beat["waiting"][0]) for p, (beat, _) in sorted(self._peers.items())
            if beat["waiting"]]
        if waits:
            process, call = waits[0]
            return (f"process {process} waits for the storage: {call} has not returned", True)
        if self.many:
            return ("every process reports and none waits for the storage: a collective or a "
                    "device hangs (see the stacks)", False)
        return "no bucket call is waiting: the devices or the program hang (see the stacks)", False

    def _stop(self, now: float):
        cause, storage_suspect = self._cause(now)
        where = self._dump_stacks(storage_suspect)
        age = max([self._stalled_for(now), *(now - since for since in self._calls.values())])
        line = (f"stalled: nothing completed for {age:.0f} s since {self.done_last} "
                f"(stall_timeout_s={self.timeout_s:g}): {cause}; stacks of every thread in "
                f"{where}")
        if self.many:
            with contextlib.suppress(Exception):
                distributed.publish("failed", line)
        distributed.exit_program(f"flaxgpt: {line}", STALL_EXIT_CODE)

    def _dump_stacks(self, storage_suspect: bool) -> str:
        """Every thread's Python stack into out_dir/stalls/, or a local file when out_dir is
        remote and the storage is suspect or does not take it within STACKS_UPLOAD_S -> where."""
        name = f"stacks-process{self.me}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        local = os.path.join(tempfile.gettempdir(), f"flaxgpt-{name}")
        with open(local, "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        target = storage.path(self.out_dir) / STALLS_DIR / name
        if storage.is_remote(target) and storage_suspect:
            return local
        copied = []

        def copy():
            with contextlib.suppress(Exception):  # an unreachable or unwritable out_dir
                if not storage.is_remote(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                storage.write_atomically(target, storage.path(local).read_bytes())
                copied.append(target)

        copier = threading.Thread(target=copy, daemon=True, name="flaxgpt-stacks")
        copier.start()
        copier.join(STACKS_UPLOAD_S)
        if not copied:  # the local file stays
            return local
        os.unlink(local)
        return os.fspath(target)
