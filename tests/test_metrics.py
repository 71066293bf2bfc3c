"""What a run records (flaxgpt/metrics.py): metrics.jsonl, TensorBoard, ETA lines, resuming."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flaxgpt import metrics
from flaxgpt.config import base_config
from flaxgpt.metrics import MetricsLog, drop_rows_after, format_seconds


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them, read from the TFRecord event files in
    log_dir (length, crc, event proto, crc); a session start at step S (a resumed writer's
    purge_step) hides earlier steps >= S."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            started = event.session_log.status == event_pb2.SessionLog.START
            if event.HasField("session_log") and started:
                scalars = {tag: [(s, v) for s, v in points if s < event.step]
                           for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def config(**overrides):
    c = base_config()
    c.max_iters = 10
    for key, value in overrides.items():
        c[key] = value
    return c


def test_rows_name_the_run_and_tensorboard_gets_the_scalars(tmp_path):
    with MetricsLog(config(), tmp_path, "run-a") as log:
        log.write(0, **{"train/loss": 4.0, "val/loss": 4.1})
        for step in (1, 2):
            log.write(step, loss=3.0 - step * 0.5, lr=1e-3, grad_norm=0.5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["run"]) for r in rows] == [(0, "run-a"), (1, "run-a"), (2, "run-a")]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["val/loss"] == [(0, pytest.approx(4.1))]
    assert scalars["train/step_loss"] == [(1, 2.5), (2, 2.0)] and scalars["lr"][0][0] == 1


def test_resume_drops_what_an_interrupted_attempt_logged_past_its_checkpoint(tmp_path):
    with MetricsLog(config(), tmp_path, "run-a") as log:
        for step in range(1, 6):  # crashed after step 5, the checkpoint was at 3
            log.write(step, loss=1.0 / step)
    with MetricsLog(config(), tmp_path, "run-a", start_step=3, resumed_at=3) as log:
        for step in (4, 5):
            log.write(step, loss=0.0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows[3:]] == [0.0, 0.0]
    points = tensorboard_scalars(tmp_path / "tensorboard")["train/step_loss"]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5] and [v for _, v in points[3:]] == [0.0, 0.0]


def test_drop_rows_after_keeps_other_runs_and_skips_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "run": "old"}\n{"step": 5, "run": "new"}\n{"step": 2, "run": '
                    '"new"}\n{"ste')
    drop_rows_after(path, "new", 3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 5, "run": "old"}, {"step": 2, "run": "new"}]


def test_without_a_terminal_step_lines_show_the_eta_once_it_has_settled(tmp_path, capsys,
                                                                         monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    with MetricsLog(config(max_iters=1000, log_interval=10), tmp_path, "run-a") as log:
        assert log.bar is None  # pytest's stdout is not a TTY
        for step in range(10, 120, 10):  # 0.1 s a step, the first line after compilation
            clock[0] += 1
            log.print_step(f"iter {step}: loss 1.0", step)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "iter 10: loss 1.0" and "eta" not in lines[-2]  # 90 steps: not yet 10%
    assert lines[-1] == "iter 110: loss 1.0, eta 1m29s"  # 890 steps left at 0.1 s each


def test_without_a_terminal_a_run_prints_a_bounded_number_of_step_lines(tmp_path, capsys):
    with MetricsLog(config(max_iters=600_000, log_interval=10), tmp_path, "run-a") as log:
        for step in range(10, 600_001, 10):
            log.print_step(f"iter {step}", step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= metrics.MAX_STEP_LINES and lines[-1].startswith("iter 600000")
    with MetricsLog(config(max_iters=2000, log_interval=10), tmp_path, "run-b") as log:
        assert log.print_every == 10  # the CPU config: every log_interval, as nanoGPT


def test_on_a_terminal_a_progress_bar_replaces_step_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with MetricsLog(config(), tmp_path, "run-a", start_step=2) as log:
        assert log.bar is not None and log.bar.n == 2 and log.bar.total == 10
        log.step_done(3, 1.25)
        log.print_step("iter 3: loss 1.25", 3)
        assert log.bar.n == 3
    assert "iter 3" not in capsys.readouterr().out


def test_tensorboard_can_be_switched_off(tmp_path):
    with MetricsLog(config(tensorboard=False), tmp_path, "run-a") as log:
        log.write(1, loss=1.0)
    assert not (tmp_path / "tensorboard").exists()


def test_format_seconds():
    assert format_seconds(75) == "1m15s" and format_seconds(3 * 3600 + 120) == "3h02m"


def test_tensorboard_logging_does_not_import_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed; a run's MetricsLog must not (its import
    is slow and large: docs/performance.md)."""
    pytest.importorskip("torch")
    code = ("import sys; from flaxgpt.config import base_config; from flaxgpt.metrics import "
            "MetricsLog\nwith MetricsLog(base_config(), "
            f"__import__('pathlib').Path({str(tmp_path)!r}), 'run-a') as log:\n    log.write(1, "
            "loss=2.5)\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/step_loss"] == [(1, 2.5)]


def test_a_run_in_a_bucket_uploads_its_metrics_and_tensorboard_files(gcs_dir, tmp_path):
    from flaxgpt import storage
    run = storage.path(gcs_dir)
    with MetricsLog(config(), run, "run-a") as log:
        log.write(1, loss=4.0)
        log.upload()  # in the background: the row, and the event file closed for it
        log._upload_job.result()
        assert (run / "metrics.jsonl").read_text().count("\n") == 1
        assert len(list((run / "tensorboard").iterdir())) == 1
        assert len(list(Path(log._tensorboard_dir).iterdir())) == 1  # a new one; the sent one left
        for step in (2, 3):
            log.write(step, loss=5.0 - step)
    assert len(list((run / "tensorboard").iterdir())) == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    # resumed from step 2
    with MetricsLog(config(), run, "run-a", start_step=2, resumed_at=2) as log:
        log.write(3, loss=1.5)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 4.0), (2, 3.0), (3, 1.5)]
    local = tmp_path / "tensorboard"
    local.mkdir()
    for event_file in (run / "tensorboard").iterdir():
        (local / event_file.name).write_bytes(event_file.read_bytes())
    assert tensorboard_scalars(local)["train/step_loss"] == [(1, 4.0), (2, 3.0), (3, 1.5)]
