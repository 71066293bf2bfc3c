"""How fast prepare.py tokenizes documents, against tiktoken's own single-thread
encode_ordinary_batch on the same text in the same run.

    python benchmarks/bench_tokenize.py [--mb 20] [--rounds 3] [--threads N]

The text: tiny Shakespeare ($FLAXGPT_DATA/tinyshakespeare/input.txt, else ../shared/data) cut into
documents of --doc_chars characters and repeated to --mb megabytes, written as a parquet file with
FineWeb-Edu's columns. Each round times, in turn:
- tiktoken, 1 thread: `encode_ordinary_batch(texts, num_threads=1)`, the reference;
- tiktoken, N threads: `encode_ordinary_batch(texts, num_threads=N)`;
- prepare's tokenizer, 1 and N threads: `tokenize_documents.tokenize_chunk` over CHUNK_CHARS chunks
  in a thread pool (val hash, <|endoftext|>, uint16), no file I/O;
- prepare.py text: the parquet file to train.bin, val.bin and meta.json (reading, staging, sha256).
It prints the median tokens/s of each (the reference's token count over the time: <|endoftext|> not
counted) and its ratio to the reference. N defaults to the cores this process may run on.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TQDM_DISABLE"] = "1"  # prepare's progress bar would interleave with the table
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("FLAXGPT_DATA", str(REPO.parent / "shared" / "data"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from flaxgpt.prepare import prepare, tokenize_documents  # noqa: E402
from flaxgpt.tokenizer import local_data_file  # noqa: E402


def documents(megabytes: float, doc_chars: int) -> list[str]:
    source = local_data_file("tinyshakespeare/input.txt")
    if source is None:
        sys.exit("bench_tokenize.py: set FLAXGPT_DATA to a folder holding "
                 "tinyshakespeare/input.txt")
    text = source.read_text(encoding="utf-8")
    pieces = [text[i:i + doc_chars] for i in range(0, len(text), doc_chars)]
    n = int(megabytes * 1e6 / doc_chars)
    return [pieces[i % len(pieces)] for i in range(n)]


def write_parquet(path: Path, texts: list[str]) -> None:
    n = len(texts)
    pq.write_table(pa.table({
        "text": texts, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)], "file_path": ["s3://x"] * n,
        "language": ["en"] * n, "language_score": [0.97] * n, "token_count": [0] * n,
        "score": [3.0] * n, "int_score": [3] * n}), path, row_group_size=1000)


def prepare_threads(texts: list[str], threads: int) -> None:
    chunk = max(1, len(texts) * tokenize_documents.CHUNK_CHARS // max(sum(map(len, texts)), 1))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: tokenize_documents.tokenize_chunk(texts[i:i + chunk], 0, b"seed"),
                      range(0, len(texts), chunk)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    parser.add_argument("--doc_chars", type=int, default=4500, help="characters per document")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    texts = documents(args.mb, args.doc_chars)
    encoding = tokenize_documents.gpt2().encoding
    n_tokens = sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=args.threads)))
    print(f"{len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} MB, {n_tokens:,} GPT-2 "
          "tokens; "
          f"{args.threads} threads on {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f} at the start)")
    with tempfile.TemporaryDirectory() as tmp:
        parquet = Path(tmp) / "000_00000.parquet"
        write_parquet(parquet, texts)
        runs = {
            "tiktoken encode_ordinary_batch, 1 thread": lambda: encoding.encode_ordinary_batch(
                texts, num_threads=1),
            f"tiktoken encode_ordinary_batch, {args.threads} threads": lambda: (
                encoding.encode_ordinary_batch(texts, num_threads=args.threads)),
            "prepare's tokenizer, 1 thread": lambda: prepare_threads(texts, 1),
            f"prepare's tokenizer, {args.threads} threads": lambda: prepare_threads(texts,
                                                                                   args.threads),
            f"prepare.py text, parquet to folder, {args.threads} threads": lambda: prepare(
                "text", Path(tmp) / "out", parquet, args.threads, val_fraction=0.0005),
        }
        seconds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    reference = statistics.median(next(iter(seconds.values())))
    print(f"{'':58s} {'tokens/s':>12s} {'ratio':>6s}   (median of {args.rounds} rounds, in turns)")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:58s} {n_tokens / median / 1e6:10.2f}M {reference / median:6.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
