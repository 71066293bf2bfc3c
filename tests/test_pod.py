"""A Cloud TPU pod slice, simulated (tests/simulated_pod.py): 4 processes of 4 CPU devices on
127.0.0.1, their mesh ordered by host as a v4-32's is (hosts interleaved along the data axis), each
in its own working directory, with a real GCS emulator as the bucket. Through train.py's command
line, as on the slice: prepare into the bucket, train there, SIGTERM every host mid-run (a
maintenance event), resume, sample. Also what a pod must refuse or survive: a local out_dir, hosts
with different datasets, one failing host, a checkpoint one host cannot read, a bucket that stops
answering and a frozen host.
"""

import json
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxgpt import sharding, storage
from flaxgpt.checkpoint import Checkpoints, load_params
from flaxgpt.loop import train
from flaxgpt.prepare import prepare
from flaxgpt.watchdog import STALL_EXIT_CODE
from conftest import corpus_text, tiny_run_config
from simulated_pod import CONFIG, REPO, Pod, report as report_of

# one xdist worker runs the pods and the watchdog cases, one after another (setup.cfg)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pods")]
HOSTS, DEVICES = 4, 4
# A tiny model on a data-parallel mesh of all 16 devices; 16 sequences, one per device.
RUN = ["--config.n_layer=2", "--config.n_head=4", "--config.n_embd=32", "--config.block_size=16",
       "--config.batch_size=16", "--config.gradient_accumulation_steps=1", "--config.eval_iters=2",
       "--config.log_interval=1", "--config.warmup_iters=2", "--config.progress=False"]


@pytest.fixture(scope="module")
def v4_32_host_order() -> list[int]:
    """The process at each position of a data-parallel mesh over a real v4-32 (libtpu topology)."""
    pytest.importorskip("libtpu", reason='the v4-32 topology comes from libtpu: pip install '
                                         '"flaxgpt[tpu]"')
    from flaxgpt import compile_for
    mesh = sharding.make_mesh({"data": -1}, compile_for.target_named("v4-32").devices)
    order = [device.process_index for device in mesh.devices.flat]
    assert sorted(order) == sorted(list(range(HOSTS)) * DEVICES)
    assert order[:HOSTS] == list(range(HOSTS))
    return order


@pytest.fixture(scope="module")
def bucket_data(gcs_bucket, tmp_path_factory) -> str:
    """shakespeare_char prepared once into the bucket, as every host of the pod reads it."""
    source = tmp_path_factory.mktemp("corpus") / "input.txt"
    source.write_text(corpus_text(100_000))
    data_dir = f"{gcs_bucket}/pod/data/shakespeare_char"
    prepare("shakespeare_char", out_dir=data_dir, input_path=source)
    return data_dir


def assert_all_succeeded(outputs):
    assert all(rc == 0 for rc, _, _ in outputs), report_of(outputs)


def params_of(out_dir: str):
    _, params = load_params(out_dir)
    return jax.tree.map(np.asarray, params)


def test_a_pod_trains_on_a_bucket_stops_on_sigterm_and_resumes_exactly(
        tmp_path, gcs_bucket, bucket_data, v4_32_host_order):
    runs = f"{gcs_bucket}/pod/runs"
    common = [CONFIG, *RUN, f"--config.data_dir={bucket_data}", "--config.max_iters=8",
              "--config.eval_interval=4"]
    # JAX_COMPILATION_CACHE_DIR unset: the processes use flaxgpt's default for a pod,
    # <out_dir>/compilation_cache.
    pod = Pod(tmp_path, HOSTS, DEVICES, host_order=v4_32_host_order, JAX_COMPILATION_CACHE_DIR=None)

    pod.start(*common, f"--config.out_dir={runs}/stopped")
    pod.wait_for(r"^iter 3:")
    pod.signal(signal.SIGTERM)  # a maintenance event signals every host
    stopped = pod.wait()
    assert_all_succeeded(stopped)
    stop_line = next(line for line in stopped[0][1].splitlines()
                     if line.startswith("stopping at step"))
    saved = int(stop_line.split()[3])
    assert 3 <= saved < 8 and Checkpoints(f"{runs}/stopped").steps() == [saved], stop_line
    assert all("Traceback" not in out + err for _, out, err in stopped), report_of(stopped)

    resumed = pod.train(*common, f"--config.out_dir={runs}/stopped", "--config.init_from=resume")
    assert_all_succeeded(resumed)
    assert "resuming run" in resumed[0][1], report_of(resumed)
    assert f"at step {saved}" in resumed[0][1], report_of(resumed)
    # the programs the stopped run compiled into its bucket serve this run too
    straight = pod.train(*common, f"--config.out_dir={runs}/straight",
                         f"--config.compilation_cache_dir={runs}/stopped/compilation_cache")
    assert_all_succeeded(straight)

    # Stopped and resumed vs never stopped: the same params, bit for bit, and losses after the stop.
    chex_equal = jax.tree.map(np.array_equal, params_of(f"{runs}/stopped"),
                              params_of(f"{runs}/straight"))
    assert all(jax.tree.leaves(chex_equal)), chex_equal

    def rows(run):
        lines = storage.path(f"{runs}/{run}/metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def after(run):
        return [(r["step"], r.get("loss"), r.get("val/loss"))
                for r in rows(run) if r["step"] > saved]

    assert after("stopped") == after("straight") and after("stopped")
    assert len({r["run"] for r in rows("stopped")}) == 1  # one run, continued

    # The same global batches as one process with all its devices (8 here), within float rounding.
    config = tiny_run_config(bucket_data, tmp_path / "single", max_iters=8, eval_interval=4,
                             batch_size=16, gradient_accumulation_steps=1, warmup_iters=2,
                             lr_decay_iters=600000)
    config.mesh.data = -1
    train(config)
    single = params_of(tmp_path / "single")
    for got, want in zip(jax.tree.leaves(params_of(f"{runs}/straight")), jax.tree.leaves(single)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # Adam magnifies rounding

    # Everything went to the bucket: the hosts' own disks hold nothing; host 0 cached its compiled
    # programs there.
    assert pod.local_files() == []
    assert list((storage.path(f"{runs}/stopped") / "compilation_cache").iterdir())
    names = {p.name for p in storage.path(f"{runs}/stopped").iterdir()}
    assert {"checkpoints", "metrics.jsonl", "meta.json", "tensorboard", "loss.png"} <= names, names
    assert list((storage.path(f"{runs}/stopped") / "tensorboard").iterdir())

    sample = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={runs}/stopped",
                             "--num_samples=1", "--max_new_tokens=20", "--compilation_cache_dir="],
                            cwd=tmp_path / "host0", capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert f"at step 8 ({runs}/stopped/checkpoints/8)" in sample.stderr, sample.stderr
    assert len(sample.stdout.split("---------------")[0]) >= 20


def test_a_local_out_dir_on_a_pod_is_refused_in_one_line(tmp_path, bucket_data):
    pod = Pod(tmp_path, 2, 1)
    outputs = pod.train(CONFIG, *RUN, f"--config.data_dir={bucket_data}", "--config.out_dir=out",
                        "--config.batch_size=2", timeout=180)
    for rc, out, err in outputs:
        assert rc == 1, report_of(outputs)
        assert err.strip().splitlines()[-1] == (
            "train.py: error: out_dir=out is not the same storage on every host: process(es) 1 "
            "cannot see the file process 0 wrote there. Every host of a pod needs to see the same "
            "files: use a gs:// bucket (or a folder all hosts mount)"), report_of(outputs)


def test_hosts_with_different_datasets_are_refused_in_one_line(tmp_path, gcs_dir):
    pod = Pod(tmp_path, 2, 1)
    # each host's own copy on its own disk: here not the same text
    for i, host in enumerate(pod.hosts):
        (host / "input.txt").write_text(corpus_text(20_000 + 1000 * i))
        prepare("shakespeare_char", out_dir=host / "data" / "chars", input_path=host / "input.txt")
    outputs = pod.train(CONFIG, *RUN, "--config.data_dir=data/chars", f"--config.out_dir={gcs_dir}",
                        "--config.batch_size=2", timeout=180)
    for rc, out, err in outputs:
        last = err.strip().splitlines()[-1]
        assert rc == 1 and last.startswith("train.py: error: the hosts read different datasets "
                                           "from data/chars (process(es) 0 see "), (
            report_of(outputs))
        assert "prepare it once into a bucket: --config.data_dir=gs://" in last


def test_one_failing_host_stops_every_host_within_seconds(tmp_path, bucket_data, gcs_dir):
    pod = Pod(tmp_path, 2, 2)
    outputs = pod.train(CONFIG, *RUN, f"--config.data_dir={bucket_data}",
                        f"--config.out_dir={gcs_dir}", "--config.batch_size=4",
                        "--config.max_iters=1000", "--config.eval_interval=1000",
                        fail={"process": 1, "step": 3}, timeout=240)
    (rc0, _, err0), (rc1, _, err1) = outputs
    assert rc1 == 1, report_of(outputs)
    assert err1.strip().splitlines()[-1] == "train.py: error: injected failure at step 3", (
        report_of(outputs))
    assert rc0 == 1 and err0.strip().splitlines()[-1] == (
        "flaxgpt: stopping: process 1 failed: injected failure at step 3"), report_of(outputs)


def test_a_checkpoint_one_host_cannot_read_is_passed_over_by_every_host(tmp_path, bucket_data,
                                                                        gcs_dir):
    """FSDP over both hosts: each reads only its own shards. Host 1's shards of the newest step are
    damaged: both hosts pass over that step, say why, and resume from the one before."""
    pod = Pod(tmp_path, 2, 2)
    common = [CONFIG, *RUN, f"--config.data_dir={bucket_data}", f"--config.out_dir={gcs_dir}",
              "--config.batch_size=4", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
              "--config.eval_interval=3", "--config.max_to_keep=5"]
    assert_all_succeeded(pod.train(*common, "--config.max_iters=6"))
    assert Checkpoints(gcs_dir).steps() == [3, 6]
    step_6 = storage.path(gcs_dir) / "checkpoints" / "6"
    shards = [p for p in (step_6 / "params" / "ocdbt.process_1" / "d").iterdir()]
    for shard in shards:
        storage.write_atomically(shard, b"")  # truncated to nothing
    outputs = pod.train(*common, "--config.max_iters=9", "--config.init_from=resume")
    assert_all_succeeded(outputs)
    for _, out, err in outputs:
        unreadable = f"checkpoint {gcs_dir}/checkpoints/6 on process 1 is unreadable (array "
        assert unreadable in err, report_of(outputs)
    assert "at step 3" in outputs[0][1]
    assert "6.unreadable" in {p.name for p in (storage.path(gcs_dir) / "checkpoints").iterdir()}


def test_a_pretrained_model_is_read_on_host_0_alone_and_reaches_every_host(tmp_path,
                                                                           tiny_hf_gpt2, gcs_dir):
    """Fine-tuning from a Hugging Face folder that only host 0 has on its disk (as a download would
    be): the other hosts receive the weights, and the run's first evaluation is the model's own
    loss."""
    pod = Pod(tmp_path, 2, 2)
    (pod.hosts[0] / "gpt2-tiny").symlink_to(tiny_hf_gpt2, target_is_directory=True)
    text = tmp_path / "input.txt"
    text.write_text(corpus_text(20_000))
    prepare("shakespeare", out_dir=f"{gcs_dir}/data", input_path=text)
    argv = [CONFIG, f"--config.data_dir={gcs_dir}/data", f"--config.out_dir={gcs_dir}/run",
            "--config.init_from=gpt2-tiny", "--config.block_size=32", "--config.batch_size=8",
            "--config.gradient_accumulation_steps=1", "--config.max_iters=2",
            "--config.eval_interval=2", "--config.eval_iters=2", "--config.progress=False"]
    outputs = pod.train(*argv)
    assert_all_succeeded(outputs)
    pod_loss = float(outputs[0][1].split("step 0: train loss ")[1].split(",")[0])
    config = tiny_run_config(f"{gcs_dir}/data", tmp_path / "single", init_from=str(tiny_hf_gpt2),
                             block_size=32, batch_size=8, gradient_accumulation_steps=1,
                             max_iters=0, eval_only=True, eval_iters=2)
    config.mesh.data = -1
    assert abs(train(config)["train"] - pod_loss) < 1e-3, (pod_loss, outputs[0][1])


def losses_by_step(stdout: str) -> dict[str, str]:
    """{"iter N" or "step N" (an evaluation): the losses process 0 printed}."""
    return dict(re.findall(r"^((?:iter|step) \d+): ((?:train )?loss [^,]+(?:, val loss \S+)?)",
                           stdout, re.MULTILINE))


DONE = r"(step|checkpoint|the evaluation at step) \d+"  # what a stall line says completed last


def assert_same_where_both_ran(resumed, uninterrupted):
    ran, reference = losses_by_step(resumed[0][1]), losses_by_step(uninterrupted[0][1])
    both = ran.keys() & reference.keys()
    assert both and all(ran[k] == reference[k] for k in both), (ran, reference)


def test_a_stalled_bucket_or_a_frozen_host_stops_the_pod_in_one_line_and_it_resumes_exactly(
        tmp_path, bucket_data, gcs_dir, frozen_storage):
    """The bucket stops answering mid-run: every host exits within the stall time-out (and a
    minute), in one line naming the bucket call. The run resumes; then host 1 freezes: host 0 exits
    naming it. Resumed again, the run ends. Each resumed attempt computes the steps it repeats as
    the attempt before computed them uninterrupted (bit-exact resumption of a pod: the SIGTERM
    test)."""
    stall_s = 5
    pod = Pod(tmp_path, 2, 2)
    common = [CONFIG, *RUN, f"--config.data_dir={bucket_data}", "--config.batch_size=4",
              "--config.max_iters=16", "--config.eval_interval=4",
              "--config.async_checkpointing=False", "--config.always_save_checkpoint=True",
              f"--config.stall_timeout_s={stall_s}"]
    run = [*common, f"--config.out_dir={gcs_dir}/run"]

    pod.start(*run)
    pod.wait_for(r"^iter 5:")
    with frozen_storage():
        start = time.monotonic()
        stalled = pod.wait(timeout=stall_s + 90)
        seconds = time.monotonic() - start
    assert seconds < stall_s + 60, report_of(stalled)
    for rc, _, err in stalled:
        assert rc == STALL_EXIT_CODE, report_of(stalled)
        line = err.strip().splitlines()[-1]
        assert re.fullmatch(r"flaxgpt: (stopping: process \d failed: )?stalled: nothing completed "
                            rf"for \d+ s since {DONE} \(stall_timeout_s=5\): process \d waits "
                            r"for the storage: \w+ gs://flaxgpt-test/\S+ has not returned; "
                            r"stacks of every thread in /\S+(; this host's stacks in /\S+)?",
                            line), (
            report_of(stalled))

    pod.start(*run, "--config.init_from=resume")
    pod.wait_for(r"^iter 9:")
    pod.procs[1].send_signal(signal.SIGSTOP)
    frozen = pod.wait(timeout=stall_s + 90)
    resumed_at = int(re.search(r"resuming run \S+ at step (\d+)", frozen[0][1]).group(1))
    assert resumed_at == 4, report_of(frozen)
    assert_same_where_both_ran(frozen, stalled)
    rc, _, err = frozen[0]
    line = err.strip().splitlines()[-1]
    assert rc == STALL_EXIT_CODE and re.fullmatch(
        rf"flaxgpt: stalled: nothing completed for \d+ s since {DONE} \(stall_timeout_s=5\): "
        rf"process 1 stopped reporting after {DONE} \(silent for \d+ s\): it is frozen, or its "
        r"host is gone; stacks of every thread in "
        + re.escape(f"{gcs_dir}/run/stalls/") + r"stacks-process0-\S+\.txt", line), (
        report_of(frozen))
    assert "watchdog.py" in storage.path(line.rsplit(" ", 1)[1]).read_text()  # every thread's

    finished = pod.train(*run, "--config.init_from=resume")
    assert_all_succeeded(finished)
    assert "resuming run" in finished[0][1] and "at step 8" in finished[0][1], report_of(finished)
    assert_same_where_both_ran(finished, frozen)
    assert "iter 16:" in finished[0][1]
