"""Faults read as one line (flaxgpt/faults.py): the root cause stated, one line per decision, and
none of the libraries' background tracebacks, for the faults a user meets: a full disk during a
save, checkpoints that cannot be read (all of them, one truncated file, a stray folder), a stopped
sample, bad arguments."""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import one_device_env, program_lines
from flaxgpt import faults

REPO = Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO / 'configs' / 'shakespeare_char.py'}:cpu"
MAX_LINES = 5  # what a fault may print, its root cause in the last line


def run(*argv, cwd=REPO, **kw):
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=one_device_env(),
                            capture_output=True, text=True, timeout=600, **kw)
    return result.returncode, program_lines(result.stdout), program_lines(result.stderr)


def test_describe_finds_the_root_cause_in_a_chain():
    disk = ValueError('RESOURCE_EXHAUSTED: Error writing "h.kernel/0.0" in OCDBT database at '
                      'local file "/x/": Failed to write 3416034 bytes to file 11: No space left '
                      "on device [os_error_code='28']")
    try:
        try:
            raise disk
        except ValueError as e:
            raise RuntimeError("Failed to run 5 Handler Commit operations") from e
    except RuntimeError as chained:
        assert faults.is_disk_full(chained)
        assert faults.describe(chained) == "the disk is full (No space left on device)"
    assert faults.is_disk_full(OSError(errno.ENOSPC, "nope"))
    truncated = ValueError('OUT_OF_RANGE: Error reading "h_0.attn.c_proj.kernel/0.0.0" in OCDBT '
                           'database at local file "/r/300/params/": Requested byte range '
                           '[2490299, 2551008) is not valid for value of size 0 '
                           '[tensorstore_spec=\'{"driver": "zarr"}\']')
    assert faults.describe(truncated) == ("array h_0.attn.c_proj.kernel: its data file is "
                                          "truncated (Requested byte range [2490299, 2551008) is "
                                          "not valid for value of size 0)")
    assert faults.describe(KeyError("params")) == "KeyError: 'params'"


def test_library_reports_are_dropped_and_flaxgpts_own_kept(caplog, monkeypatch):
    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "future.py")

    def report(logger, pathname, message):
        record = logging.LogRecord(logger, logging.ERROR, pathname, 1, message, None, None)
        logging.getLogger(logger).handle(record)

    monkeypatch.delenv(faults.VERBOSE_VARIABLE, raising=False)
    for name in ("absl", "gcsfs"):  # filters a CLI's main() run in this process left for good
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", [f for f in logger.filters
                                                if not isinstance(f, faults._LibraryReports)])
    gcsfs_file = os.path.join(os.sep, "site-packages", "gcsfs", "retry.py")
    with caplog.at_level(logging.WARNING), faults.quiet_library_reports():
        report("absl", orbax_file, "_SignalingThread.run() raised an exception")
        logging.getLogger("flaxgpt.checkpoint").warning(
            "checkpoint 3 is unreadable: using the one before")
        logging.getLogger("gcsfs").handle(logging.LogRecord(
            "gcsfs", logging.WARNING, gcsfs_file, 1, "retrying after 503", None, None))
    assert "SignalingThread" not in caplog.text and "checkpoint 3 is unreadable" in caplog.text
    assert "retrying after 503" in caplog.text  # a library's warning always shows
    report("absl", orbax_file, "after the block: shown")
    assert "after the block: shown" in caplog.text
    monkeypatch.setenv(faults.VERBOSE_VARIABLE, "1")
    with faults.quiet_library_reports():
        report("absl", orbax_file, "verbose: shown")
    assert "verbose: shown" in caplog.text


def test_a_read_error_left_in_a_coroutine_is_dropped(monkeypatch, capsys):
    """An orbax read still in flight when its event loop closed: Python reports the coroutine (whose
    frames are gone) and TensorStore's error at exit, not the caller."""
    monkeypatch.delenv(faults.VERBOSE_VARIABLE, raising=False)
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    async def _read_array_index_and_device_put():
        pass

    leftover = _read_array_index_and_device_put()
    truncated = ValueError('OUT_OF_RANGE: Error reading "h_0.mlp.c_fc.kernel/0.0" in OCDBT '
                           'database at local file "/r/6/params/": Requested byte range [7, 9) is '
                           'not valid')
    ours = RuntimeError("flaxgpt's own")
    with faults.quiet_library_reports(hooks=True):
        for error in (truncated, ours):
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                                     exc_traceback=None, err_msg=None,
                                                     object=leftover))
    leftover.close()
    assert [u.exc_value for u in seen] == [ours]


def test_a_library_thread_that_dies_is_dropped(monkeypatch):
    monkeypatch.delenv(faults.VERBOSE_VARIABLE, raising=False)
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "wte/0" in OCDBT database: No space left '
                      'on device')
    with faults.quiet_library_reports(hooks=True):
        for error in (full, KeyError("ours")):
            thread = threading.Thread(target=lambda e=error: (_ for _ in ()).throw(e))
            thread.start()
            thread.join()
    assert [str(args.exc_value) for args in seen] == ["'ours'"]


@pytest.fixture(scope="module")
def data_dir(shakespeare_char_dir) -> str:
    return f"--config.data_dir={shakespeare_char_dir}"


@pytest.fixture(scope="module")
def trained(shakespeare_char_dir, tmp_path_factory) -> Path:
    """The README's CPU model, 6 steps, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("faults") / "run"
    rc, _, err = run("train.py", CONFIG, f"--config.data_dir={shakespeare_char_dir}",
                     f"--config.out_dir={out}", "--config.max_iters=6", "--config.eval_interval=2",
                     "--config.eval_iters=2", "--config.always_save_checkpoint=True",
                     "--config.compilation_cache_dir=")
    assert rc == 0, err
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def data_files(step_dir: Path) -> list[Path]:
    files = (p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d")
    return sorted(files, key=lambda p: -p.stat().st_size)


def test_a_full_disk_during_a_save_is_one_line_that_says_so(shakespeare_char_dir, tmp_path):
    """out_dir on a 14 MB tmpfs (in a mount namespace of this process's own): the checkpoint of step
    5 fits, step 10's does not."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small filesystem")
    disk = tmp_path / "disk"
    disk.mkdir()
    train = (f"{sys.executable} train.py {CONFIG} --config.data_dir={shakespeare_char_dir} "
             f"--config.out_dir={disk}/out --config.max_iters=10 --config.eval_interval=5 "
             "--config.eval_iters=2 --config.log_interval=1000 "
             "--config.always_save_checkpoint=True --config.compilation_cache_dir=")
    # then resumed at step 5 with nothing to do: the half-written step 10 is removed
    script = (f"mount -t tmpfs -o size=14m tmpfs {disk} && "
              f"({train}; echo rc=$?; ls {disk}/out/checkpoints; "
              f"{train.replace('max_iters=10', 'max_iters=5')} --config.init_from=resume "
              f"> /dev/null 2>&1; echo after resume; ls {disk}/out/checkpoints)")
    result = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=REPO,
                            env=one_device_env(), capture_output=True, text=True, timeout=600)
    if "mount:" in result.stderr and "rc=" not in result.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    stdout, stderr = program_lines(result.stdout), program_lines(result.stderr)
    # step 5 intact (listed last, after what is left of the failed save of step 10)
    failed = stdout[:stdout.index("after resume")]
    assert "rc=1" in failed and failed[-1] == "5" and len(failed) > 2, result.stdout
    assert stdout[stdout.index("after resume") + 1:] == ["5"], result.stdout
    assert len(stderr) <= MAX_LINES and "Traceback" not in result.stderr, result.stderr
    assert stderr[-1].startswith("train.py: error: disk full: saving checkpoint "
                                 f"{disk}/out/checkpoints/10 needs about "), stderr[-1]
    assert "Nothing was lost" in stderr[-1]


def test_resume_with_every_checkpoint_unreadable(trained, data_dir, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    for step in (2, 4, 6):
        for data_file in data_files(run_dir / "checkpoints" / str(step)):
            data_file.write_bytes(data_file.read_bytes()[:100])
    rc, _, err = run("train.py", CONFIG, data_dir, f"--config.out_dir={run_dir}",
                     "--config.init_from=resume", "--config.max_iters=8",
                     "--config.compilation_cache_dir=")
    assert rc == 1 and len(err) <= MAX_LINES and "Traceback" not in "\n".join(err), err
    assert err[-1] == ("train.py: error: none of the checkpoints [6, 4, 2] in "
                       f"{run_dir}/checkpoints could be read; restore an earlier copy of them, or "
                       "train a new run in another out_dir")
    truncated = [line for line in err
                 if "is unreadable (array " in line and "its data file is truncated" in line]
    assert len(truncated) == 3, err


def test_sample_falls_back_past_a_truncated_file_in_one_line(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    data_files(run_dir / "checkpoints" / "6")[0].write_bytes(b"")
    rc, out, err = run("sample.py", f"--out_dir={run_dir}", "--num_samples=1", "--max_new_tokens=5",
                       "--compilation_cache_dir=")
    assert rc == 0 and len(err) <= MAX_LINES, err
    assert f"checkpoint {run_dir}/checkpoints/6 is unreadable (array " in err[0], err
    assert err[0].endswith("): using the one before") and "at step 4" in err[-2], err
    assert err[-1] == "generating 1 sample x 5 tokens = 5 new tokens", err


def test_a_stray_step_folder_is_reported_once_and_set_aside(trained, data_dir, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    (run_dir / "checkpoints" / "9").mkdir()
    rc, out, err = run("train.py", CONFIG, data_dir, f"--config.out_dir={run_dir}",
                       "--config.init_from=resume", "--config.max_iters=7",
                       "--config.eval_interval=100", "--config.compilation_cache_dir=")
    assert rc == 0, err
    assert [line.split("] ", 1)[-1] for line in err] == [
        f"checkpoint {run_dir}/checkpoints/9 is unreadable (FileNotFoundError: File "
        f"{run_dir}/checkpoints/9/meta/metadata not found.): using the one before",
        f"set aside unreadable checkpoint {run_dir}/checkpoints/9 as 9.unreadable"], err


def test_a_stopped_sample_says_so_in_one_line(trained):
    process = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={trained}",
                                "--num_samples=1", "--max_new_tokens=100000000",
                                "--compilation_cache_dir="], cwd=REPO,
                               env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while process.stdout.read(1) == "" and time.monotonic() < deadline:  # sampling has begun
            time.sleep(0.1)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    lines = program_lines(stderr)
    assert process.returncode == 130 and lines[-1] == "sample.py: interrupted", stderr
    assert len(lines) <= MAX_LINES and "Traceback" not in stderr and "Fatal" not in stderr, stderr


@pytest.mark.parametrize("argv, code, last", [
    ([CONFIG, "extra"], 2, "train.py: error: unexpected arguments extra: settings are "
                           "--config.key=value"),
    ([], 2, "train.py: error: give a config: --config=configs/shakespeare_char.py:cpu (or "
            "configs/*.py)"),
    ([CONFIG, "--config.dataset=nosuch"], 1, "train.py: error: data/nosuch not found: no dataset "
                                          "'nosuch' was prepared there. prepare.py makes "
                                          "shakespeare_char, shakespeare, openwebtext, fineweb_edu "
                                          "(python prepare.py NAME), or your own text as this "
                                          "dataset (python prepare.py text --input 'FILES' --name "
                                          "nosuch); or point --config.data_dir at a prepared "
                                          "folder"),
])
def test_bad_arguments_are_one_line(argv, code, last, tmp_path):
    rc, out, err = run(REPO / "train.py", *argv, cwd=tmp_path)
    assert rc == code and err == [last], err


def test_importing_flaxgpt_and_building_a_train_step_change_no_process_state():
    """No unraisable hook, log filter or malloc setting until a program (train(), a CLI) asks."""
    code = """
import logging, sys, jax
hook = sys.unraisablehook
filters = {name: list(logging.getLogger(name).filters) for name in ("asyncio", "absl")}
import flaxgpt
from flaxgpt import checkpoint, host_memory, optim, sharding
from flaxgpt.config import base_config
from flaxgpt.model import GPTConfig
from flaxgpt.train_step import TrainStep
TrainStep(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8),
          optim.make_optimizer(base_config()), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
assert sys.unraisablehook is hook, "unraisablehook replaced"
assert {n: list(logging.getLogger(n).filters) for n in filters} == filters, "a logging filter added"
assert host_memory.keep_freed_memory.cache_info().currsize == 0, "malloc tuned"
print("untouched")
"""
    rc, out, err = run("-c", code)
    assert rc == 0 and out == ["untouched"], err


def test_a_users_mistake_is_one_line_and_anything_else_keeps_its_traceback(capsys, monkeypatch):
    from flaxgpt.tokenizer import CharTokenizer
    monkeypatch.delenv(faults.VERBOSE_VARIABLE, raising=False)
    assert faults.report("x.py", faults.UserError("do this")) == ("x.py: error: do this", 1)
    usage = faults.UsageError("--n: give 1")
    assert faults.report("x.py", usage) == ("x.py: error: --n: give 1", 2)
    try:
        CharTokenizer(["a"]).encode("b")  # a check of flaxgpt's: a ValueError raised there
    except ValueError as e:
        assert faults.report("x.py", e)[0].startswith("x.py: error: characters not in this model")

    def buggy():
        return {}["key"] + int("not a number")

    for error_type in (KeyError, ValueError):  # a bug's, a library's: not flaxgpt's checks
        try:
            buggy() if error_type is KeyError else int("not a number")
        except error_type as e:
            line, code, unexpected = *faults.report("x.py", e), e
        where = line.split("its traceback: ")[1].split(";")[0]
        assert code == 1 and line.startswith(f"x.py: error: unexpected {error_type.__name__}")
        assert "Traceback" in Path(where).read_text() and "--verbose prints it" in line
        Path(where).unlink()
    assert capsys.readouterr().err == ""
    line, _ = faults.report("x.py", unexpected, verbose_=True)
    assert "Traceback" in capsys.readouterr().err and "its traceback" not in line


def test_an_os_error_says_what_to_do_instead_of_its_errno():
    import errno
    read_only = PermissionError(errno.EPERM, "Operation not permitted", "/ro/meta.json")
    assert faults.explain(read_only) == "/ro/meta.json: no permission: choose a folder you can " \
                                        "write to"
    in_the_way = FileExistsError(errno.EEXIST, "File exists", "fx/outfile")
    assert "a file is in the way" in faults.explain(in_the_way)
    assert "Errno" not in faults.report("prepare.py", in_the_way)[0]


def test_errors_reported_ends_the_program_with_one_line_and_its_code(capsys):
    with pytest.raises(SystemExit) as e, faults.errors_reported("x.py"):
        raise faults.UsageError("--steps: give a positive number")
    assert e.value.code == 2 and capsys.readouterr().err == \
        "x.py: error: --steps: give a positive number\n"
    with pytest.raises(SystemExit) as e, faults.errors_reported("x.py", interrupted="stopped"):
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "x.py: stopped"


def test_importing_flaxgpt_prints_nothing_from_plugins_that_cannot_start():
    """CPU-only machines with the CUDA plugin and libtpu installed (the test extras): plain jax
    prints their failed start-ups; after `import flaxgpt` they print nothing, and jax still
    chooses its platforms itself."""
    from flaxgpt.distributed import accelerators_attached
    if accelerators_attached():
        pytest.skip("accelerators attached: their plugins start")
    env = {k: v for k, v in one_device_env().items() if k != "JAX_PLATFORMS"}
    plain = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, text=True, timeout=300)
    if not plain.stderr.strip():
        pytest.skip("no plugin prints anything here")
    code = ("import flaxgpt, jax, logging; "
            "print(jax.config.jax_platforms, jax.devices()[0].platform); "
            "logging.getLogger('mine').warning('a warning of my own')")
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["None", "cpu"], quiet.stderr
    assert quiet.stderr == "a warning of my own\n", quiet.stderr


@pytest.mark.parametrize("argv", [["train.py"], ["sample.py", "--nosuch"], ["prepare.py", "nosuch"],
                                  ["bench.py", "--steps=x"], ["eval_hellaswag.py", "--limit=x"]])
def test_every_cli_ends_a_command_line_mistake_in_one_line_with_code_2(argv):
    """Nothing else on stderr: no usage block, and no plugin lines (raw stderr, unfiltered)."""
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=one_device_env(),
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{argv[0]}: error: "), result.stderr
