"""Loss curves of training runs as a PNG: python -m flaxgpt.plot out_dir [out_dir ...] [-o loss.png]
[--x tokens]

Reads each out_dir's metrics.jsonl (its newest run) and draws the training loss of the logged steps
and the train/val losses of the evaluations against the step (or the tokens seen), all runs on one
figure. Needs matplotlib (`pip install -e ".[plot]"`).
"""

import argparse
import io
import json
import sys

from flaxgpt import storage


def read_run(out_dir: storage.Path) -> tuple[str, list[dict]]:
    """(run id, its rows) of the newest run in out_dir/metrics.jsonl (a local folder or a
    bucket)."""
    path = storage.path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a training run's out_dir?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    run_id = rows[-1].get("run")
    return run_id, [row for row in rows if row.get("run") == run_id]


def plot_runs(out_dirs, output: storage.Path, x: str = "step") -> storage.Path:
    """Draw the runs' loss curves into `output` (PNG); x is "step" or "tokens"."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for n, out_dir in enumerate(out_dirs):
        run_id, rows = read_run(storage.path(out_dir))
        color = f"C{n}"
        label = storage.path(out_dir).name + (f" ({run_id})" if run_id else "")

        def xs(selected):
            return [r.get("tokens", 0) if x == "tokens" else r["step"] for r in selected]

        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val/loss" in r]
        if steps:
            ax.plot(xs(steps), [r["loss"] for r in steps], color=color, alpha=0.35, linewidth=1,
                    label=f"{label} train (step)")
        if evals:
            ax.plot(xs(evals), [r["train/loss"] for r in evals], color=color, linestyle="--",
                    marker=".", label=f"{label} train (eval)")
            ax.plot(xs(evals), [r["val/loss"] for r in evals], color=color, marker="o",
                    label=f"{label} val")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    output = storage.path(output)
    storage.write_atomically(output, png.getvalue())
    return output


def main(argv=None) -> storage.Path:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("out_dirs", nargs="+", help="training runs' out_dirs")
    p.add_argument("-o", "--output", default="loss.png", help="the PNG to write (default loss.png)")
    p.add_argument("--x", choices=("step", "tokens"), default="step")
    args = p.parse_args(argv)
    try:
        output = plot_runs(args.out_dirs, storage.path(args.output), args.x)
    except ModuleNotFoundError:
        sys.exit("plot: error: needs matplotlib: pip install -e '.[plot]'")
    except (OSError, ValueError) as e:
        sys.exit(f"plot: error: {e}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
