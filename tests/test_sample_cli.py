"""sample.py end to end, in process: a tiny Hugging Face folder, a tiny character-level training
run, streaming, and the one-line errors (exit code 2)."""

import importlib
import json
import pickle
import re

import jax
import numpy as np
import pytest

import sample
from flaxgpt.checkpoint import Checkpoints
from flaxgpt.model import GPTConfig, init_params


CHARS = list("\n abcdefghij")
CHAR_CONFIG = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A training run's out_dir: one checkpoint and the meta.json of a character vocabulary."""
    out_dir = tmp_path_factory.mktemp("out-char")
    checkpoints = Checkpoints(out_dir, async_save=False)
    params = init_params(CHAR_CONFIG, jax.random.key(0))
    checkpoints.save(100, params, {"count": np.zeros((), np.int32)},
                     {"model": CHAR_CONFIG.to_dict()})
    checkpoints.close()
    (out_dir / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": CHARS,
                                                   "vocab_size": len(CHARS)}))
    return out_dir


def run_cli(capsys, *argv):
    sample.main([str(a) for a in argv])
    return capsys.readouterr()


def samples(stdout):
    *texts, tail = stdout.split(sample.SEPARATOR + "\n")
    assert tail == ""
    return texts


@pytest.fixture
def decoder_calls(monkeypatch):
    """[(method name, window_shift)] of every Decoder.stream and Decoder.generate call of
    sample.py."""
    calls = []
    for name in ("stream", "generate"):
        method = getattr(sample.Decoder, name)

        def spy(self, *args, method=method, **kw):
            calls.append((method.__name__, kw["window_shift"]))
            return method(self, *args, **kw)

        monkeypatch.setattr(sample.Decoder, name, spy)
    return calls


def test_hf_folder_streams_the_same_text_it_prints_whole(capsys, tiny_hf_gpt2, decoder_calls):
    """Streamed token by token and sampled whole by the compiled loop (two paths), the same text."""
    argv = ["--init_from", tiny_hf_gpt2, "--start", "Hello", "--num_samples", 2,
            "--max_new_tokens", 8, "--top_p", 0.9]
    streamed = run_cli(capsys, *argv).out
    texts = samples(streamed)
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts)
    assert texts[0] != texts[1]  # each sample draws its own random numbers
    assert [name for name, _ in decoder_calls] == ["stream"] * 2
    assert run_cli(capsys, *argv, "--no-stream").out == streamed
    assert [name for name, _ in decoder_calls[2:]] == ["generate"] * 2
    assert run_cli(capsys, *argv, "--seed", 1).out != streamed


def test_training_run_with_a_character_vocabulary(capsys, char_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ab cab\n" * 4)  # 28 characters > block_size 16: cropped, with a warning
    out = run_cli(capsys, "--out_dir", char_run, "--start", f"FILE:{prompt}", "--num_samples", 3,
                  "--max_new_tokens", 20, "--temperature", 0)
    texts = samples(out.out)
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy
    assert texts[0].startswith("ab cab\n" * 4) and set(texts[0]) <= set(CHARS)
    assert len(texts[0]) == 28 + 20 + 1  # prompt, new characters, the newline that ends a sample
    assert out.err.count("warning") == 1 and "last 16" in out.err


def test_the_weights_are_laid_out_once_for_all_samples(capsys, char_run, monkeypatch):
    """The checkpoint's scanned layers are unstacked for decoding once, not once per sample."""
    # the module (flaxgpt.generate is the function)
    decoding = importlib.import_module("flaxgpt.generate")
    calls = []
    convert = decoding.convert_layers
    monkeypatch.setattr(decoding, "convert_layers",
                        lambda *a, **k: calls.append(1) or convert(*a, **k))
    for stream in ("--stream", "--no-stream"):
        calls.clear()
        texts = samples(run_cli(capsys, "--out_dir", char_run, "--start", "ab", "--num_samples", 3,
                                "--max_new_tokens", 4, stream).out)
        assert len(texts) == 3 and len(calls) == 1


def test_window_shift_reaches_the_decoder_streamed_and_whole(capsys, char_run, decoder_calls):
    """--window_shift past block_size (16): streamed and whole (the compiled loop), the same text,
    sampled with that shift."""
    argv = ["--out_dir", char_run, "--start", "ab", "--num_samples", 2, "--max_new_tokens", 40,
            "--window_shift", 8]
    streamed = run_cli(capsys, *argv).out
    assert run_cli(capsys, *argv, "--no-stream").out == streamed
    texts = samples(streamed)
    assert len(texts) == 2 and all(len(t) == 2 + 40 + 1 and set(t) <= set(CHARS) for t in texts)
    assert decoder_calls == [("stream", 8)] * 2 + [("generate", 8)] * 2


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_says_how_much_it_will_generate_and_shows_progress(capsys, char_run, monkeypatch, stream):
    """Up front, one line with samples x tokens; then a progress bar on stderr (tokens, tok/s) once
    sampling takes longer than PROGRESS_DELAY_S (here 0): per sample streamed, over whole samples
    with --no-stream; stdout holds only text."""
    argv = ["--out_dir", char_run, "--start", "ab", "--num_samples", 2, "--max_new_tokens", 30,
            stream]
    monkeypatch.setattr(sample, "LOG_PROGRESS_DELAY_S", 1e6)  # no bar before that, however slow
    quiet = run_cli(capsys, *argv)
    assert "generating 2 samples x 30 tokens = 60 new tokens" in quiet.err
    assert "tok/s" not in quiet.err
    monkeypatch.setattr(sample, "PROGRESS_DELAY_S", 0)
    monkeypatch.setattr(sample, "LOG_PROGRESS_DELAY_S", 0)  # capsys's stderr is not a terminal
    shown = run_cli(capsys, *argv)
    assert shown.out == quiet.out
    if stream == "--stream":
        assert re.search(r"sample 1/2: +\d+%.*\| *\d+/30 \[", shown.err)
        assert re.search(r"sample 2/2: .*tok/s", shown.err)
    else:
        assert re.search(r"2 samples: +50%.*\| *30/60 \[.*tok/s", shown.err)
    assert "tok/s" not in shown.out


def test_nanogpt_checkpoint_with_its_meta_pkl(capsys, tmp_path):
    nanogpt_config = CHAR_CONFIG.replace(gelu_approximate=False)  # nanoGPT's exact GELU
    pytest.importorskip("torch")
    from flaxgpt.pretrained import save_nanogpt

    save_nanogpt(init_params(nanogpt_config, jax.random.key(1)), nanogpt_config,
                 tmp_path / "ckpt.pt")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)),
                     "stoi": {c: i for i, c in enumerate(CHARS)}}, f)
    argv = ["--start", "abc", "--num_samples", 1, "--max_new_tokens", 10, "--temperature", 0]
    out = run_cli(capsys, "--init_from", tmp_path / "ckpt.pt", *argv).out
    assert out.startswith("abc") and set(samples(out)[0]) <= set(CHARS)
    # nanoGPT's out_dir holding ckpt.pt
    assert run_cli(capsys, "--out_dir", tmp_path, *argv).out == out


@pytest.mark.parametrize("argv, message", [
    (["--start", "abz"], "'z'"),  # with --out_dir=char_run
    (["--start", ""], "--start is empty"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top_k", "0"], "--top_k"),
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--window_shift", "0"], "--window_shift"),
    (["--window_shift", "16"], "--window_shift must be in [1, block_size=16), got 16"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive"),
])
def test_bad_arguments(capsys, char_run, argv, message):
    assert_usage_error(capsys, ["--out_dir", char_run, *argv], message)


def test_missing_models(capsys, tmp_path):
    assert_usage_error(capsys, ["--out_dir", tmp_path], "no checkpoint in", 1)
    assert_usage_error(capsys, ["--out_dir", tmp_path / "missing"], "no such directory", 1)
    assert_usage_error(capsys, ["--init_from", tmp_path / "missing"], "--init_from", 1)
    assert_usage_error(capsys, ["--init_from", "gpt3"], "--init_from", 1)
    assert_usage_error(capsys, ["--out_dir", tmp_path, "--start", "FILE:/nonexistent/prompt.txt"],
                       "/nonexistent/prompt.txt: no such file or folder", 1)


def test_prompt_outside_the_vocabulary(capsys, char_run, tmp_path):
    """A character model whose run lacks meta.json falls back to GPT-2 BPE, whose ids do not fit."""
    (tmp_path / "checkpoints").symlink_to(char_run / "checkpoints")
    assert_usage_error(capsys, ["--out_dir", tmp_path, "--start", "hello"],
                       "outside the model's vocabulary")


def assert_usage_error(capsys, argv, message, code=2):
    """One line `sample.py: error: ...`; exit code 2 for the command line, 1 for its files."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == code
    assert err.startswith("sample.py: error: ") and err.count("\n") == 1 and message in err, err


def test_an_unknown_option_is_one_line_without_the_usage_block(capsys):
    assert_usage_error(capsys, ["--temprature", "0.5"], "unrecognized arguments: --temprature")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_damaged_or_malicious_files_are_one_line(capsys, char_run, tmp_path):
    import pickle
    import shutil

    torch = pytest.importorskip("torch")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"n_positions": 16, "vocab_size": 50257,
                                                "n_layer": 1, "n_head": 2, "n_embd": 16}))
    (hf / "model.safetensors").write_bytes(b"garbage, not a safetensors header")
    assert_usage_error(capsys, ["--init_from", hf], "not a readable safetensors file", 1)

    marker = tmp_path / "pwned"
    torch.save({"model_args": {}, "model": {}, "payload": _RunsCode(marker)}, tmp_path / "ckpt.pt")
    assert_usage_error(capsys, ["--init_from", tmp_path / "ckpt.pt"], "could run code", 1)
    assert not marker.exists()
    with open(tmp_path / "meta.pkl", "wb") as f:  # beside a real nanoGPT ckpt.pt
        pickle.dump({"vocab_size": 1, "itos": {0: _RunsCode(marker)}}, f)
    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    from flaxgpt.pretrained import save_nanogpt
    save_nanogpt(init_params(CHAR_CONFIG, jax.random.key(0)), CHAR_CONFIG, nanogpt / "ckpt.pt")
    shutil.copy(tmp_path / "meta.pkl", nanogpt / "meta.pkl")
    assert_usage_error(capsys, ["--init_from", nanogpt / "ckpt.pt"], "refusing to load", 1)
    assert not marker.exists()

    (tmp_path / "a_file").write_text("")
    assert_usage_error(capsys, ["--out_dir", tmp_path / "a_file"], "is a file", 1)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_usage_error(capsys,
                       ["--out_dir", char_run, "--start", f"FILE:{tmp_path / 'latin1.txt'}"],
                       "not UTF-8", 1)


def test_all_checkpoints_unreadable_says_what_to_do_and_no_event_loop_noise(char_run, tmp_path):
    """A run whose only checkpoint lost its manifest: one error line, no asyncio tracebacks at
    exit."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    out_dir = tmp_path / "run"
    shutil.copytree(char_run, out_dir)
    for manifest in out_dir.rglob("manifest.ocdbt"):
        manifest.unlink()
    result = subprocess.run([sys.executable, "sample.py", "--out_dir", str(out_dir),
                             "--num_samples", "1", "--max_new_tokens", "2"],
                            cwd=Path(sample.__file__).parent, capture_output=True, text=True,
                            timeout=120,
                            env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "is unreadable (" in errors[0] and "scratch" not in errors[0]
    assert result.stderr.splitlines()[-1] == errors[0] and errors[0].startswith("sample.py: error:")
    assert ("Traceback" not in result.stderr and "never awaited" not in result.stderr
            and "Event loop is closed" not in result.stderr), result.stderr


def test_dtype_auto_samples_in_float32_on_a_cpu_and_bfloat16_is_a_choice(capsys, char_run):
    argv = ["--out_dir", char_run, "--start", "ab", "--num_samples", 1, "--max_new_tokens", 4]
    err = run_cli(capsys, *argv).err
    assert "at step 100" in err and err.splitlines()[0].endswith("in float32"), err
    bf16 = run_cli(capsys, *argv, "--dtype", "bfloat16")
    assert bf16.err.splitlines()[0].endswith("in bfloat16") and len(samples(bf16.out)) == 1
