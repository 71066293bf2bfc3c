"""FineWeb-Edu (HuggingFaceFW/fineweb-edu) from the Hugging Face Hub: the parquet files of one
subset, downloaded one at a time (the next one while the current one is tokenized) and deleted once
tokenized, so that the disk holds at most two of them besides the tokens.

A subset is one of the repository's configs, which its dataset card lists: sample-10BT (the
default: the 10B-token sample build-nanogpt trains GPT-2 124M on), sample-100BT, sample-350BT, a
crawl such as CC-MAIN-2024-10, or default (all of it). The files are those of the repository's
revision at the start; a resumed preparation checks that each file still has the same content.
"""

import contextlib
import fnmatch
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from flaxgpt import storage
from flaxgpt.prepare.documents import InputFile

REPO = "HuggingFaceFW/fineweb-edu"
DEFAULT_SUBSET = "sample-10BT"
_GLOB_CHARS = "*?["


def subset_patterns(configs: list[dict], subset: str) -> list[str]:
    """The train files' patterns of config `subset` in a dataset card's `configs` list
    ([{"config_name", "data_files": "glob" | ["glob", ...] | [{"split", "path"}, ...]}, ...])."""
    for config in configs:
        if config.get("config_name") != subset:
            continue
        data_files = config.get("data_files", [])
        entries = [data_files] if isinstance(data_files, (str, dict)) else data_files
        patterns = []
        for entry in entries:
            if isinstance(entry, str):
                patterns.append(entry)
            elif entry.get("split", "train") == "train":
                paths = entry["path"]
                patterns.extend([paths] if isinstance(paths, str) else paths)
        return patterns
    names = ", ".join(str(c.get("config_name")) for c in configs) or "none listed"
    raise ValueError(f"--subset {subset}: {REPO} has no such subset (its subsets: {names})")


def matches(path: str, pattern: str) -> bool:
    """Whether a repository path matches a data_files glob, whose `*` stays within one folder."""
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, p) for part, p in zip(parts, pattern_parts))


def static_prefix(pattern: str) -> str:
    """The folders of a glob before its first wildcard: "sample/10BT/*" -> "sample/10BT"."""
    folders = []
    for part in pattern.split("/")[:-1]:
        if any(c in part for c in _GLOB_CHARS):
            break
        folders.append(part)
    return "/".join(folders)


def _hub_error(e: Exception, what: str) -> ConnectionError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return ConnectionError(f"could not {what} ({type(e).__name__}: {first}): check the network and "
                           f"HF_TOKEN, or download the parquet files of {REPO} elsewhere and run "
                           "`python prepare.py text --input 'DIR/*.parquet' --name fineweb_edu`")


class HubFiles:
    """The parquet files of a FineWeb-Edu subset: `files` lists them; `open` downloads one into
    `download_dir` (and starts on the next), and deletes it after a block that read it all."""

    def __init__(self, subset: str, download_dir: str | os.PathLike):
        try:
            from huggingface_hub import HfApi, hf_hub_download
            from huggingface_hub.hf_api import RepoFile
            from huggingface_hub.repocard import metadata_load
        except ImportError:
            raise ModuleNotFoundError("fineweb_edu needs huggingface_hub: pip install "
                                      "'flaxgpt[data]'") from None
        self.subset, self.download_dir = subset, Path(download_dir)
        api = HfApi()
        try:
            info = api.dataset_info(REPO)
            card = hf_hub_download(REPO, "README.md", repo_type="dataset", revision=info.sha)
        except Exception as e:  # connection, authentication and server errors of the hub client
            raise _hub_error(e, f"list the files of {REPO}") from None
        patterns = subset_patterns((metadata_load(card) or {}).get("configs", []), subset)
        try:
            listed = {entry.path: entry for prefix in {static_prefix(p) for p in patterns}
                      for entry in api.list_repo_tree(REPO, path_in_repo=prefix or None,
                                                      recursive=True, revision=info.sha,
                                                      repo_type="dataset")}
        except Exception as e:  # as above
            raise _hub_error(e, f"list the files of {REPO}") from None
        self.revision = info.sha
        self.files = [InputFile(e.path, e.size, getattr(e.lfs, "sha256", None) or e.blob_id)
                      for _, e in sorted(listed.items())
                      if isinstance(e, RepoFile) and e.path.endswith(".parquet")
                      and any(matches(e.path, p) for p in patterns)]
        if not self.files:
            raise ValueError(f"--subset {subset}: no parquet files of {REPO} match "
                             f"{', '.join(patterns)}")
        self._downloads: dict[int, _Download] = {}

    def describe(self) -> dict:
        return {"repo": REPO, "subset": self.subset, "revision": self.revision,
                "files": len(self.files)}

    def _download(self, index: int) -> Path:
        from huggingface_hub import hf_hub_download
        name = self.files[index].name
        try:
            return Path(hf_hub_download(REPO, name, repo_type="dataset", revision=self.revision,
                                        local_dir=self.download_dir))
        except Exception as e:  # connection and server errors; the download resumes next time
            raise _hub_error(e, f"download {name} of {REPO}") from None

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[storage.Path]:
        current = self._downloads.pop(index, None) or _Download(lambda: self._download(index))
        if index + 1 < len(self.files) and index + 1 not in self._downloads:
            self._downloads[index + 1] = _Download(lambda: self._download(index + 1))
        local = current.wait()
        yield storage.path(local)
        local.unlink()  # not reached when the block fails: an interrupted run keeps it for the next


class _Download(threading.Thread):
    """A download in a daemon thread: an interrupted preparation does not wait for it to finish."""

    def __init__(self, download: Callable[[], Path]):
        super().__init__(daemon=True)
        self._download, self._result, self._error = download, None, None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._download()
        except BaseException as e:  # handed to the thread that waits for the file
            self._error = e

    def wait(self) -> Path:
        self.join()
        if self._error is not None:
            raise self._error
        return self._result
