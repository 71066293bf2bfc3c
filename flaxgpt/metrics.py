"""What a run shows and records, from process 0 only: printed lines or a progress bar,
metrics.jsonl (one JSON row per logged step and per evaluation, each naming the run), TensorBoard
scalars in `out_dir/tensorboard`, (optionally) wandb, and at the end out_dir/loss.png.

A resumed run first drops what an earlier attempt of the same run logged after the step it resumes
from, so that every step appears once per run. In a bucket (out_dir=gs://...), new rows and closed
TensorBoard event files (written to a local folder) go up in a background thread every
REMOTE_UPLOAD_S seconds, after each checkpoint and at the end.
"""

import concurrent.futures
import contextlib
import json
import os
import sys
import time

from flaxgpt import distributed, storage

TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl keys -> TensorBoard tags
TENSORBOARD_TAGS = {"loss": "train/step_loss", "train/loss": "train/loss", "val/loss": "val/loss",
                    "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s",
                    "mfu": "mfu"}
REMOTE_UPLOAD_S = 60
MAX_STEP_LINES = 250  # printed step lines of a run without a terminal, at most about
ETA_SETTLE_S = 60.0  # the ETA shows once the rate is measured over this long or over
ETA_SETTLE_FRACTION = 0.1  # this fraction of the steps left


def drop_rows_after(path: storage.Path, run_id: str, step: int) -> None:
    """Rewrite metrics.jsonl atomically without the rows of `run_id` past `step` (an interrupted
    attempt's) and without lines cut short by a crash."""
    path = storage.path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if not (row.get("run") == run_id and row.get("step", -1) > step):
                kept.append(line + "\n")
    storage.write_atomically(path, "".join(kept))


def format_seconds(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it
    is installed, only to accept torch tensors (seconds and memory a run need not spend); we log
    floats. `import torch` raises ImportError while sys.modules holds None for it, which
    tensorboardX handles (no other thread imports meanwhile: a run has started none yet)."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """The run's output: `print` for lines, `write` for metrics rows, `step_done` after each step.
    On a terminal (and with config.progress) a tqdm bar replaces the per-step lines; elsewhere (CI,
    a SLURM log) at most about MAX_STEP_LINES of them show, with the ETA once it has settled.
    resumed_at: the step a resumed run continues from (None for a new run). A context manager: on
    a clean exit after a row it draws out_dir/loss.png (when matplotlib is installed)."""

    def __init__(self, config, out_dir: storage.Path, run_id: str, *, start_step: int = 0,
                 resumed_at: int | None = None):
        self.active = distributed.is_main_process()
        self.out_dir = storage.path(out_dir)
        self.remote = storage.is_remote(self.out_dir)
        self.run_id, self.max_iters = run_id, config.max_iters
        self.tensorboard = self.wandb = self.bar = None
        self._rate_from = None  # (step, time) of the first step line: after compilation
        interval = max(config.log_interval, 1)
        self.print_every = interval * -(-config.max_iters // (interval * MAX_STEP_LINES))
        self._rows, self._tensorboard_dir, self._wrote = [], None, False
        self._folders = contextlib.ExitStack()
        self._uploader = self._upload_job = None
        self._uploaded_at = time.monotonic()
        if not self.active:
            return
        if resumed_at is not None:
            drop_rows_after(self.out_dir / "metrics.jsonl", run_id, resumed_at)
        if self.remote:
            self._uploader = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="flaxgpt-upload")
        if config.tensorboard:
            SummaryWriter = _tensorboardx_writer()
            self._tensorboard_dir = self._folders.enter_context(
                storage.local_folder(self.out_dir / TENSORBOARD_DIR))
            self._new_events = lambda purge_step=None: SummaryWriter(
                self._tensorboard_dir, filename_suffix=f".{time.time_ns()}", purge_step=purge_step)
            # purge_step: TensorBoard hides what an earlier attempt logged past the resumed step.
            self.tensorboard = self._new_events(None if resumed_at is None else resumed_at + 1)
        if config.wandb_log:
            import wandb
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                                    id=run_id, resume="allow", config=config.to_dict())
        if config.progress and sys.stdout.isatty() and not config.eval_only:
            from tqdm import tqdm
            self.bar = tqdm(total=config.max_iters, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_):
        if self._upload_job is not None:
            self._upload_job.result()
        for closable in (self.bar, self.tensorboard):
            if closable is not None:
                closable.close()
        if self._uploader is not None:
            self._uploader.shutdown()
            self._send("".join(self._rows).encode(), [])
        self._folders.close()  # uploads the TensorBoard files left in a bucket's local folder
        if self._wrote and error_type is None:
            with contextlib.suppress(ImportError):  # matplotlib: the `plot` extra
                from flaxgpt.plot import plot_runs
                plot_runs([self.out_dir], self.out_dir / "loss.png")

    def upload(self) -> None:
        """In a bucket, start uploading what was logged since the last upload (after a checkpoint:
        a run resumed from it then misses no row), unless that one still runs (a slow bucket: the
        next try takes more rows); a failed upload raises its error here."""
        if not (self.active and self.remote):
            return
        if self._upload_job is not None:
            if not self._upload_job.done():
                return
            self._upload_job.result()
        rows, self._rows, events = "".join(self._rows).encode(), [], []
        if self.tensorboard:
            self.tensorboard.close()
            events = sorted(os.listdir(self._tensorboard_dir))
            self.tensorboard = self._new_events()
        self._upload_job = self._uploader.submit(self._send, rows, events)
        self._uploaded_at = time.monotonic()

    def _send(self, rows: bytes, events: list[str]) -> None:
        if rows:
            storage.append(self.out_dir / "metrics.jsonl", rows)
        for name in events:  # closed event files: each goes up once, then leaves this disk
            local = os.path.join(self._tensorboard_dir, name)
            with open(local, "rb") as f:
                storage.write_atomically(self.out_dir / TENSORBOARD_DIR / name, f.read())
            os.unlink(local)

    def print(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar else print)(text)
            sys.stdout.flush()

    def print_step(self, text: str, step: int) -> None:
        """A per-step line: on the bar's terminal the bar itself; elsewhere every print_every-th
        step's, with the ETA at the average rate since the first step line (evaluations included)
        once that rate is measured over ETA_SETTLE_S or ETA_SETTLE_FRACTION of the steps left."""
        if not self.active or self.bar:
            return
        if self._rate_from is None:
            self._rate_from = (step, time.perf_counter())
        if step % self.print_every and step != self.max_iters:
            return
        start_step, start_time = self._rate_from
        done, elapsed = step - start_step, time.perf_counter() - start_time
        settled = elapsed >= ETA_SETTLE_S or done >= ETA_SETTLE_FRACTION * (
            self.max_iters - start_step)
        if done > 0 and settled:
            text += f", eta {format_seconds(elapsed / done * (self.max_iters - step))}"
        print(text, flush=True)

    def step_done(self, step: int, loss: float | None = None) -> None:
        if self.bar:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, step: int, **metrics) -> None:
        """One row of metrics; those that are None are left out."""
        if not self.active:
            return
        metrics = {key: value for key, value in metrics.items() if value is not None}
        self._wrote = True
        row = json.dumps({"step": step, "run": self.run_id, **metrics}) + "\n"
        if self.remote:
            self._rows.append(row)
        else:
            storage.append(self.out_dir / "metrics.jsonl", row.encode())
        if self.tensorboard:
            for key, value in metrics.items():
                if key in TENSORBOARD_TAGS:
                    self.tensorboard.add_scalar(TENSORBOARD_TAGS[key], value, step)
            self.tensorboard.flush()
        if self.remote and time.monotonic() - self._uploaded_at >= REMOTE_UPLOAD_S:
            self.upload()
        if self.wandb:
            self.wandb.log(metrics, step=step)
