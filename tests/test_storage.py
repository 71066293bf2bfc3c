"""One path type for local folders and buckets (flaxgpt/storage.py), against a real GCS emulator."""

import os
import pathlib

import gcsfs
import pytest

from flaxgpt import storage


def test_local_paths_behave_as_pathlib(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = storage.path("out/run")
    assert not storage.is_remote(p) and os.fspath(p) == "out/run"  # relative stays relative
    p.mkdir(parents=True)
    storage.write_atomically(p / "meta.json", '{"a": 1}')
    assert pathlib.Path("out/run/meta.json").read_text() == '{"a": 1}'
    storage.move(p, storage.path("out/moved"))
    assert sorted(os.listdir("out")) == ["moved"] and storage.size("out/moved/meta.json") == 8


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, gcs_dir, where):
    folder = storage.path(tmp_path if where == "local" else gcs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_atomically(folder / "train.bin", b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_output(folder / "train.bin") as f:
            f.write(b"new, but only half of it")
            raise RuntimeError("interrupted")
    assert (folder / "train.bin").read_bytes() == b"old"
    assert [p.name for p in folder.iterdir()] == ["train.bin"]


def test_a_bucket_round_trip(gcs_dir):
    run = storage.path(gcs_dir) / "run"
    assert storage.is_remote(run) and os.fspath(run) == f"{gcs_dir}/run"
    storage.write_atomically(run / "checkpoints" / "3" / "meta", "{}")
    storage.write_atomically(run / "tokens.bin", bytes(range(256)) * 4)
    assert storage.size(run / "tokens.bin") == 1024
    assert storage.read_ranges(run / "tokens.bin", [0, 256, 1020], [3, 260, 1024]) == [
        bytes([0, 1, 2]), bytes([0, 1, 2, 3]), bytes([252, 253, 254, 255])]
    storage.move(run / "checkpoints" / "3", run / "checkpoints" / "3.unreadable")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["3.unreadable"]
    assert (run / "checkpoints" / "3.unreadable" / "meta").read_text() == "{}"


def test_a_listing_sees_what_another_host_wrote_since(gcs_dir):
    """fsspec caches listings by default: a host that listed a folder would not see a checkpoint
    another host wrote after that. Another host here is another client of the same bucket."""
    folder = storage.path(gcs_dir) / "shared"
    storage.write_atomically(folder / "a", "1")
    assert [p.name for p in folder.iterdir()] == ["a"]
    other_host = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    other_host.pipe(f"{gcs_dir.removeprefix('gs://')}/shared/b", b"2")
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"] and (folder / "b").exists()


def test_a_missing_bucket_is_one_line_that_says_what_to_do(gcs_bucket):
    with pytest.raises(OSError) as error:
        storage.check_reachable("gs://no-such-bucket-here/run", "out_dir")
    message = str(error.value)
    assert message.startswith("out_dir=gs://no-such-bucket-here/run: the bucket "
                              "gs://no-such-bucket-here does not exist")
    assert "gcloud storage buckets create" in message and "\n" not in message
    storage.check_reachable(f"{gcs_bucket}/anything", "out_dir")  # the bucket exists: no error
    storage.check_reachable("relative/local/folder", "out_dir")


def test_an_unknown_scheme_says_what_to_install():
    with pytest.raises(OSError, match="nosuchfs://.*needs a filesystem that is not installed"):
        storage.check_reachable("nosuchfs://bucket/run", "out_dir")


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_append_adds_only_the_new_bytes(tmp_path, gcs_dir, where):
    log = storage.path(tmp_path if where == "local" else gcs_dir) / "metrics.jsonl"
    storage.append(log, b"1\n")  # created
    storage.append(log, b"2\n")  # in a bucket: an object of its own, composed with the file
    assert log.read_bytes() == b"1\n2\n"
    assert [p.name for p in log.parent.iterdir()] == ["metrics.jsonl"]  # no part left behind


def test_no_bucket_call_is_waiting_while_another_thread_still_imports_fsspec(monkeypatch):
    """The watchdog asks while the main thread imports gcsfs: fsspec.asyn is in sys.modules
    without its `sync` yet. A watchdog thread that raised there would never stop a stall."""
    import sys
    import types
    monkeypatch.setitem(sys.modules, "fsspec.asyn", types.ModuleType("fsspec.asyn"))
    assert storage.waiting_calls() == []


def test_a_bucket_call_that_does_not_return_is_named_with_its_path(gcs_dir, frozen_storage):
    """What a stall line names (flaxgpt/watchdog.py): the call and its gs:// path, from any thread;
    the requests carry time-outs."""
    import threading
    import time
    storage.write_atomically(f"{gcs_dir}/train.bin", b"tokens")
    fs, _ = storage._remote_fs(gcs_dir)
    assert fs.requests_timeout.sock_read == storage.READ_TIMEOUT_S
    with frozen_storage():
        reader = threading.Thread(target=storage.read_ranges,
                                  args=(f"{gcs_dir}/train.bin", [0], [3]))
        reader.start()
        deadline = time.monotonic() + 30
        while not storage.waiting_calls() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert storage.waiting_calls() == [f"cat_ranges {gcs_dir}/train.bin"]
    reader.join(timeout=60)
    assert not reader.is_alive() and storage.waiting_calls() == []
