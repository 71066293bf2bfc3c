"""Multi-host training with jax.distributed, simulated by processes on 127.0.0.1.

Two processes with 4 simulated CPU devices each (gloo collectives) train through `train(config)` on
a data 2 x fsdp 2 x tensor 2 mesh; the losses, the metrics file and the checkpoint must be those of
one process with all 8 devices (this test process, see tests/conftest.py). A process whose peer
never starts must end with an error, not hang.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import shakespeare_char
from flaxgpt.checkpoint import load_params
from flaxgpt.loop import train
from simulated_pod import REPO, finish, free_port, process_env, report
TIMEOUT_S = 120  # for a whole two-process run
LOCAL_DEVICES = 4
MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # tensor within a process, data x fsdp across/within
LOSS_TOL = dict(rtol=2e-6, atol=0)
PARAM_TOL = dict(rtol=1e-5, atol=1e-7)

# Runs train() in a fresh process: argv[1] is JSON
# {"config": {...}, "distributed": {...}, "result": path}.
RUNNER = """
import json, sys
args = json.loads(sys.argv[1])
import jax
from configs import shakespeare_char
from flaxgpt.loop import train

c = shakespeare_char.get_config("cpu")
for key, value in args["config"].items():
    c[key] = value
for key, value in args["distributed"].items():
    c.distributed[key] = value
result = train(c)
with open(args["result"], "w") as f:
    json.dump({**result, "process_index": jax.process_index(),
               "process_count": jax.process_count(), "device_count": jax.device_count(),
               "local_device_count": jax.local_device_count()}, f)
"""


@pytest.fixture(scope="module")
def data_dir(alphabet64_dir) -> Path:
    return alphabet64_dir


def run_config(data_dir: Path, out_dir: Path) -> dict:
    """Overrides of the shakespeare_char cpu config (AdamW, warm-up, dropout 0): a tiny model."""
    return dict(data_dir=str(data_dir), out_dir=str(out_dir), mesh=MESH, n_layer=2, n_head=4,
                n_embd=32, block_size=16, batch_size=8, gradient_accumulation_steps=2, max_iters=3,
                eval_interval=3, eval_iters=2, log_interval=1, always_save_checkpoint=True,
                async_checkpointing=False)


def test_two_processes_train_like_one(data_dir, tmp_path):
    assert jax.device_count() == 2 * LOCAL_DEVICES, (
        "tests/conftest.py should give this process 8 devices")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    port = free_port()
    overrides = run_config(data_dir, tmp_path / "multi")
    procs = []
    start = time.monotonic()
    for i in range(2):
        args = {"config": overrides, "result": str(tmp_path / f"result{i}.json"),
                "distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                "process_id": i}}
        procs.append(subprocess.Popen([sys.executable, str(runner), json.dumps(args)], cwd=tmp_path,
                                      env=process_env(port, LOCAL_DEVICES), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:  # the single-process reference, here, while the two start up
        config = shakespeare_char.get_config("cpu")
        for key, value in run_config(data_dir, tmp_path / "single").items():
            config[key] = value
        expected = train(config)
    finally:
        outputs = finish(procs, start + TIMEOUT_S)
    assert all(rc == 0 for rc, _, _ in outputs), report(outputs)

    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["device_count"],
                r["local_device_count"]) == \
            (i, 2, 8, LOCAL_DEVICES), report(outputs)
        assert r["step"] == expected["step"] == 3
        np.testing.assert_allclose([r["train"], r["val"]], [expected["train"], expected["val"]],
                                   **LOSS_TOL)

    # Only process 0 prints and writes metrics: one writer's lines in the shared out_dir.
    assert "step 0: train loss" in outputs[0][1] and "iter 3:" in outputs[0][1], report(outputs)
    assert "loss" not in outputs[1][1], report(outputs)
    lines, reference = ([json.loads(line) for line in path.read_text().splitlines()]
                        for path in (tmp_path / "multi" / "metrics.jsonl",
                                     tmp_path / "single" / "metrics.jsonl"))
    steps = [line["step"] for line in lines]
    assert steps == [line["step"] for line in reference] == [0, 1, 2, 3, 3]
    for key in ("loss", "grad_norm", "train/loss", "val/loss"):
        pairs = [(a[key], b[key]) for a, b in zip(lines, reference) if key in a]
        np.testing.assert_allclose(*zip(*pairs), err_msg=key, **LOSS_TOL)

    # Both processes wrote their shards of one checkpoint; it holds the single-process params.
    _, params = load_params(tmp_path / "multi")
    _, want = load_params(tmp_path / "single")
    for (path, w), p in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(p), np.asarray(w), err_msg=jax.tree_util.keystr(path),
                                   **PARAM_TOL)


# A process alone, told there are 2: process 0 (its peer never starts), process 1 (no coordinator).
LONE = """
import sys
from flaxgpt import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), timeout=5)
print("initialize returned")
"""


@pytest.fixture(scope="module")
def lone_processes(tmp_path_factory):
    """(returncode, stdout, stderr, seconds) for process 0 and process 1, each without its peer."""
    procs, start = [], time.monotonic()
    for process_id in (0, 1):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", LONE, f"127.0.0.1:{port}",
                                       str(process_id)],
                                      cwd=tmp_path_factory.mktemp("lone"), env=process_env(port, 1),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = finish(procs, start + 60)
    return [(rc, out, err, time.monotonic() - start) for rc, out, err in outputs]


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_missing_peer_fails_instead_of_hanging(lone_processes, process_id):
    rc, out, err, seconds = lone_processes[process_id]
    assert rc is not None, (
        f"still waiting after {seconds:.0f}s (initialize timeout 5s)\n{err[-3000:]}")
    assert rc != 0 and "initialize returned" not in out, err[-3000:]
    assert "DEADLINE_EXCEEDED" in err or "could not connect" in err, err[-3000:]


def test_a_missing_peer_gives_a_clear_error(lone_processes):
    """Process 1 finds no coordinator: a RuntimeError. Process 0 (the coordinator) says what it
    waits for before jax's client aborts it: jax 0.10 offers no way to catch that time-out."""
    rc, _, err, _ = lone_processes[1]
    assert "RuntimeError: jax.distributed could not connect process 1 of 2" in err, err[-3000:]
    assert "within 5s" in err
    rc, _, err, _ = lone_processes[0]
    joining = "flaxgpt: joining process 0 of 2 through the coordinator at 127.0.0.1:"
    assert joining in err, err[-3000:]
    assert "a peer never joined" in err


def test_libtpu_alone_is_not_a_multiprocess_launch(monkeypatch, tmp_path):
    """CPU machines install libtpu to compile for TPU topologies; only attached chips or a TPU
    cluster's variables make a launch multi-process."""
    from flaxgpt import distributed
    for name in (*distributed.TPU_CLUSTER_ENV, "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                 "TPU_SKIP_MDS_QUERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: 0)
    assert not distributed.is_multiprocess_launch()
    monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: 4)
    assert distributed.is_multiprocess_launch()
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert not distributed.is_multiprocess_launch()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.is_multiprocess_launch()
    monkeypatch.undo()
    device = tmp_path / "0000:00:04.0"
    device.mkdir()
    (device / "vendor").write_text("0x1ae0\n")
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x8086\n")
    assert distributed.tpu_chips_attached(str(tmp_path)) == 1


def fake_machine(root: Path, vendors=(), driver_files=()) -> dict:
    """accelerators_attached's arguments for a PCI tree of these vendors' devices and these driver
    files."""
    root.mkdir()
    for i, vendor in enumerate(vendors):
        (root / f"0000:00:0{i}.0").mkdir()
        (root / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    for name in driver_files:
        (root / name).touch()
    return {"pci_root": str(root),
            "driver_files": [str(root / name) for name in ("nvidiactl", "kfd")]}


def test_accelerators_are_tpu_chips_nvidia_devices_or_gpu_drivers(monkeypatch, tmp_path):
    from flaxgpt import distributed
    for name in distributed.TPU_CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    cpu_only = fake_machine(tmp_path / "cpu", ["0x8086", "0x1af4"])  # Intel, virtio
    assert not distributed.accelerators_attached(**cpu_only)
    assert distributed.accelerators_attached(**fake_machine(tmp_path / "tpu", ["0x8086", "0x1ae0"]))
    assert distributed.accelerators_attached(**fake_machine(tmp_path / "nvidia", ["0x10de"]))
    assert distributed.accelerators_attached(**fake_machine(tmp_path / "rocm", [], ["kfd"]))
    assert distributed.accelerators_attached(**fake_machine(tmp_path / "driver", [], ["nvidiactl"]))
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.accelerators_attached(**fake_machine(tmp_path / "pod", []))


def test_a_run_without_accelerators_starts_jax_on_cpu_alone(tmp_path):
    """A CPU machine with libtpu or the CUDA plugin installed: no platform chosen, the CPU backend
    alone starts (no plugin's failed start-up in the output); a chosen platform is left alone."""
    code = ("import jax; from flaxgpt import distributed; "
            "distributed.use_cpu_without_accelerators(); "
            "print(repr(jax.config.jax_platforms), jax.default_backend())")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    from flaxgpt import distributed
    if not distributed.accelerators_attached():
        assert result.stdout.split() == ["'cpu'", "cpu"], result.stdout
        assert "Jax plugin configuration error" not in result.stderr
        assert "TPU" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    chosen = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**env, "JAX_PLATFORMS": ""})  # "": every platform
    assert chosen.stdout.split()[0] == "''", chosen.stdout + chosen.stderr[-3000:]


def test_agreement_keys_name_what_is_agreed_not_how_many_came_before():
    """An agreement one process makes alone (e.g. a retry) shifts no other agreement's key."""
    from flaxgpt import distributed
    assert distributed._key("save 12") == "flaxgpt/agree/save 12/1"
    distributed._key("a check on this host alone")
    assert distributed._key("save 16") == "flaxgpt/agree/save 16/1"
    assert distributed._key("save 12") == "flaxgpt/agree/save 12/2"  # the same agreement again
