"""HellaSwag scoring (flaxgpt/hellaswag.py, eval_hellaswag.py) against transformers on the same
weights."""

import json

import numpy as np
import pytest

from flaxgpt import hellaswag
from flaxgpt.tokenizer import GPT2Tokenizer

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog", "label": 1,
     "endings": ["runs around trying to avoid a bath.", "gets into the bath tub.", "barks.",
                 "is wet and then the woman dries it off with a long towel that she took "
                 "from the house."]},
    {"ctx": "Kids are playing in a park.", "label": 0,
     "endings": ["They slide down.", "A car drives by the park slowly.", "Birds.",
                 "The kids go home for dinner."]},
    {"ctx": "He", "label": 2, "endings": ["a", "b c", "d e f", "g"]},
    {"ctx": "The chef chops the onions and", "label": 0,
     "endings": ["adds them to the pan.", "sings.",
                 "the onion is a vegetable that grows underground.", "x"]},
]


def reference_losses(folder, examples):
    """(total, mean) ending losses [N, 4] computed by transformers, row by row, without padding."""
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tok = GPT2Tokenizer()
    totals, means = [], []
    for example in examples:
        context = tok.encode_ordinary(example["ctx"])
        for ending in example["endings"]:
            ending_tokens = tok.encode_ordinary(" " + ending)
            row = torch.tensor([context + ending_tokens])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(row).logits[0, :-1].float(), dim=-1)
            nll = -logprobs[torch.arange(row.shape[1] - 1), row[0, 1:]][-len(ending_tokens):]
            totals.append(float(nll.sum()))
            means.append(float(nll.mean()))
    return np.array(totals).reshape(-1, 4), np.array(means).reshape(-1, 4)


def test_scores_equal_transformers_on_the_same_weights(tiny_hf_gpt2):
    from flaxgpt import load

    config, params, tokenizer, _ = load(tiny_hf_gpt2)
    # 3 batches
    result = hellaswag.evaluate(params, config, EXAMPLES, tokenizer, batch_examples=2,
                                progress=False)
    total, mean = reference_losses(tiny_hf_gpt2, EXAMPLES)
    np.testing.assert_allclose(result["total_loss"], total, rtol=1e-4)
    np.testing.assert_allclose(result["mean_loss"], mean, rtol=1e-4)
    labels = np.array([e["label"] for e in EXAMPLES])
    assert result["examples"] == 5
    assert result["acc"] == np.mean(total.argmin(1) == labels)
    assert result["acc_norm"] == np.mean(mean.argmin(1) == labels)


def test_render_pads_to_one_length_and_marks_the_endings():
    tok = GPT2Tokenizer()
    longest = max(len(tok.encode_ordinary(e["ctx"] + " " + end))
                  for e in EXAMPLES for end in e["endings"])
    rows = hellaswag.render(EXAMPLES, tok, block_size=1024)
    assert rows.tokens.shape == rows.ending.shape == (20, -(-longest // 32) * 32)
    for i, example in enumerate(EXAMPLES):
        for j, ending in enumerate(example["endings"]):
            marked = rows.tokens[4 * i + j][rows.ending[4 * i + j]]
            assert marked.tolist() == tok.encode_ordinary(" " + ending)


def test_cli_reads_a_local_file_and_prints_both_accuracies(tiny_hf_gpt2, tmp_path, capsys):
    import eval_hellaswag

    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    result = eval_hellaswag.main(["--init_from", str(tiny_hf_gpt2), "--file", str(path),
                                  "--limit", "4"])
    out = capsys.readouterr().out
    assert result["examples"] == 4 and f"acc_norm {result['acc_norm']:.4f}" in out


def test_validation_file_comes_from_flaxgpt_data_offline(tmp_path, monkeypatch):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(EXAMPLES[0]) + "\n")
    monkeypatch.setenv("FLAXGPT_DATA", str(tmp_path))
    assert hellaswag.read_examples(hellaswag.validation_file()) == EXAMPLES[:1]


def test_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n"
                    + json.dumps({"ctx": "x", "endings": ["a"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2 is not a HellaSwag example"):
        hellaswag.read_examples(path)
