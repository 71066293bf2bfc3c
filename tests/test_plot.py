"""Loss-curve pictures (flaxgpt/plot.py)."""

import json

import pytest

from flaxgpt import plot

pytest.importorskip("matplotlib")


def write_run(out_dir, run_id, scale):
    out_dir.mkdir(parents=True)
    # another run: not drawn
    rows = [{"step": 0, "run": "older", "val/loss": 9.0, "train/loss": 9.0}]
    for step in range(0, 101, 10):
        rows.append({"step": step, "run": run_id, "loss": scale * (4 - step / 40),
                     "tokens": step * 768})
        if step % 50 == 0:
            rows.append({"step": step, "run": run_id, "train/loss": scale * (4 - step / 40),
                         "val/loss": scale * (4.1 - step / 45), "tokens": step * 768})
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_writes_a_png_of_several_runs(tmp_path):
    write_run(tmp_path / "a", "run-a", 1.0)
    write_run(tmp_path / "b", "run-b", 0.8)
    output = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "loss.png")])
    data = output.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert plot.read_run(tmp_path / "a")[0] == "run-a"
    plot.main([str(tmp_path / "a"), "-o", str(tmp_path / "tokens.png"), "--x", "tokens"])
    assert (tmp_path / "tokens.png").stat().st_size > 10_000


def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        plot.main([str(tmp_path / "nothing")])
