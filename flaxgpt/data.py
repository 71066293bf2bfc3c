"""Reading prepared token files (`prepare.py`'s output) and sampling training batches from them.

A prepared dataset is a folder `data/<name>/` holding `train.bin` and `val.bin` (flat token arrays,
uint16 or uint32) and `meta.json` (or nanoGPT's `meta.pkl`: `tokenizer.read_meta`). Batches are
random windows, as in nanoGPT, drawn from an RNG keyed by (seed, step, split) alone: a resumed run
sees the same batches, and every host draws the same offsets and reads only its own rows. A folder
in a bucket (gs://...) is not copied: each batch fetches its windows as concurrent range reads.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os

import numpy as np

from flaxgpt import distributed, sharding, storage, tokenizer

SPLIT_CODES = {"train": 0, "val": 1}
FINGERPRINT_SAMPLES = 16  # windows of each split read into a dataset's fingerprint
FINGERPRINT_WINDOW = 1024  # tokens per window


def _missing(path: storage.Path, data_dir: storage.Path) -> FileNotFoundError:
    """The error for a dataset that was not prepared: names the path and the command to write it."""
    from flaxgpt.prepare import DATASETS
    name = data_dir.name if storage.is_remote(data_dir) else data_dir.resolve().name
    out_dir = "" if data_dir == storage.path("data") / name else f" --out_dir {data_dir}"
    known = [d for d in DATASETS if d != "text"]  # "text" prepares a dataset from your files
    if name in known:
        return FileNotFoundError(f"{path} not found: prepare the dataset first with "
                                 f"`python prepare.py {name}{out_dir}`")
    named = (f"{', '.join(known)} (python prepare.py NAME{out_dir}), or your own text as this "
             f"dataset (python prepare.py text --input 'FILES' --name {name}{out_dir})")
    return FileNotFoundError(f"{path} not found: no dataset {name!r} was prepared there. "
                             f"prepare.py makes {named}; or point --config.data_dir at a prepared "
                             "folder")


def dataset_dir(config) -> storage.Path:
    """The folder of a training config's dataset: config.data_dir, else data/<config.dataset>."""
    return storage.path(config.data_dir or f"data/{config.dataset}")


def model_vocab_size(config, *, unprepared_is_gpt2: bool = False) -> int:
    """The vocabulary train() gives a model of the config's dataset (`tokenizer.model_vocab_size`);
    for a dataset not prepared here, GPT-2's when unprepared_is_gpt2, else FileNotFoundError; a
    data_dir in a bucket that is missing or unreachable is an OSError of one line either way."""
    directory = dataset_dir(config)
    storage.check_reachable(directory, "data_dir")
    if unprepared_is_gpt2 and not directory.is_dir():
        return tokenizer.model_vocab_size(tokenizer.GPT2_META)
    return tokenizer.model_vocab_size(load_meta(directory))


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The dataset's vocabulary and token dtype (`tokenizer.read_meta`); a missing folder says how
    to make it."""
    data_dir = storage.path(data_dir)
    storage.check_reachable(data_dir, "data_dir")
    if not data_dir.is_dir():
        raise _missing(data_dir, data_dir) if not data_dir.exists() else NotADirectoryError(
            f"data_dir {data_dir} is a file, not a dataset folder")
    return tokenizer.read_meta(data_dir)


class RemoteTokens:
    """A token file in an object store, as a flat array [n_tokens] (`read_windows` reads it)."""

    def __init__(self, path: storage.Path, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.n_tokens = storage.size(path) // self.dtype.itemsize

    def __len__(self) -> int:
        return self.n_tokens


def open_split(data_dir: str | os.PathLike, split: str,
               meta: dict | None = None) -> np.memmap | RemoteTokens:
    """`<data_dir>/<split>.bin` [n_tokens] as a read-only memmap (a `RemoteTokens` in a bucket),
    checked against meta.json's count (an interrupted copy or prepare is an error)."""
    data_dir = storage.path(data_dir)
    meta = meta or load_meta(data_dir)
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        raise _missing(path, data_dir)
    tokens = RemoteTokens(path, meta["dtype"]) if storage.is_remote(path) else np.memmap(
        path, dtype=meta["dtype"], mode="r")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and len(tokens) != expected:
        raise ValueError(f"{path} holds {len(tokens):,} tokens but {data_dir / 'meta.json'} says "
                         f"{expected:,}: the copy is incomplete or from another preparation; "
                         "prepare the dataset again")
    return tokens


def read_windows(tokens: np.ndarray | RemoteTokens, offsets: np.ndarray, length: int) -> np.ndarray:
    """Tokens [len(offsets), length] starting at each offset: a memmap reads just those pages, a
    RemoteTokens fetches them all concurrently."""
    if isinstance(tokens, RemoteTokens):
        size = tokens.dtype.itemsize
        pieces = storage.read_ranges(tokens.path, offsets * size, (offsets + length) * size)
        return np.frombuffer(b"".join(pieces), tokens.dtype).reshape(len(offsets), length)
    return np.asarray(tokens[offsets[:, None] + np.arange(length)])


def fingerprint(meta: dict, splits: dict) -> str:
    """A short hash of a dataset as one host sees it: its meta.json, each split's length and
    FINGERPRINT_SAMPLES windows spread over it. Hosts compare theirs before training together."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for split, tokens in sorted(splits.items()):
        window = min(FINGERPRINT_WINDOW, len(tokens))
        offsets = np.linspace(0, len(tokens) - window, FINGERPRINT_SAMPLES).astype(np.int64)
        digest.update(f"{split}:{len(tokens)}:".encode())
        digest.update(read_windows(tokens, offsets, window).tobytes())
    return digest.hexdigest()[:16]


def get_batch(tokens: np.ndarray | RemoteTokens, *, seed: int, step: int, batch_size: int,
              block_size: int, split: str = "train",
              rows: slice | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x and targets y (x shifted by one), int32 [rows, block_size], from `tokens`. The
    offsets of all `batch_size` rows are drawn from (seed, step, split) alone; `rows` (a slice or
    index array, default all) picks the rows this process reads (only those windows are read)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if len(tokens) < block_size + 1:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, but a window of "
                         f"block_size={block_size} needs {block_size + 1}: lower block_size (or "
                         "use more data)")
    rng = np.random.default_rng((seed, step, SPLIT_CODES[split]))
    # High is exclusive: the last window ends on the last token (its y needs offset + block_size).
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        offsets = offsets[rows]
    windows = read_windows(tokens, offsets, block_size + 1).astype(np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


@dataclasses.dataclass
class Dataset:
    """A prepared dataset: its folder, its vocabulary (`tokenizer.read_meta`) and its splits."""
    directory: storage.Path
    meta: dict
    splits: dict[str, np.memmap | RemoteTokens]

    @classmethod
    def open(cls, config) -> "Dataset":
        directory = dataset_dir(config)
        meta = dict(load_meta(directory))
        if meta.pop("assumed", False) and distributed.is_main_process():
            print(f"{directory} has no meta.json or meta.pkl: assuming GPT-2 BPE tokens (uint16), "
                  "as nanoGPT's openwebtext and shakespeare folders hold", flush=True)
        return cls(directory, meta, {s: open_split(directory, s, meta) for s in SPLIT_CODES})

    def check_same_on_every_host(self) -> None:
        """Stop every process in one line unless all read the same tokens (their fingerprints)."""
        prints = distributed.all_values("dataset", fingerprint(self.meta, self.splits))
        if len(set(prints)) > 1:
            groups = {f: [str(i) for i, p in enumerate(prints) if p == f] for f in prints}
            seen = "; ".join(f"process(es) {', '.join(p)} see {f}" for f, p in groups.items())
            raise ValueError(f"the hosts read different datasets from {self.directory} ({seen}; a "
                             "fingerprint hashes meta.json, the lengths and samples of the "
                             "tokens): give every host the same copy, or prepare it once into a "
                             "bucket: --config.data_dir=gs://BUCKET/data/NAME")


class Batches:
    """The global batch [n, B, T] (x and y) of (split, seed, step) as sharded arrays, of which this
    process reads only the rows its devices hold; `prefetch` reads one in a background thread while
    the current step runs. A context manager (the thread ends on exit)."""

    def __init__(self, dataset: Dataset, batch_sharding, seed: int, batch_size: int,
                 block_size: int):
        self.dataset, self.sharding, self.seed = dataset, batch_sharding, seed
        self.B, self.T = batch_size, block_size
        self.rows = sharding.process_rows(self.sharding, (1, self.B, self.T), batch_axis=1)
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flaxgpt-data")
        self._pending = {}  # (split, step, n) -> the future of this process's rows

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._reader.shutdown(cancel_futures=True)

    def read(self, split: str, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of x and y: int32 [n, len(rows), T]."""
        local_rows = (np.arange(n)[:, None] * self.B + self.rows[None]).ravel()
        x, y = get_batch(self.dataset.splits[split], seed=self.seed, step=step,
                         batch_size=n * self.B, block_size=self.T, split=split, rows=local_rows)
        return x.reshape(n, -1, self.T), y.reshape(n, -1, self.T)

    def prefetch(self, split: str, step: int, n: int) -> None:
        """Start reading the batch a later call will ask for."""
        self._pending[(split, step, n)] = self._reader.submit(self.read, split, step, n)

    def __call__(self, split: str, step: int, n: int) -> tuple:
        """x, y: int32 [n, B, T] global arrays; all processes call this together."""
        pending = self._pending.pop((split, step, n), None)
        x, y = pending.result() if pending else self.read(split, step, n)
        shape = (n, self.B, self.T)
        return tuple(sharding.global_batch(a, self.rows, self.sharding, shape, batch_axis=1)
                     for a in (x, y))
