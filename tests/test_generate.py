"""Sampling (flaxgpt/generate.py): the KV cache against full forwards, the compiled loop against
nanoGPT's reference loop (for every window_shift), the sampling filters, stop tokens and
streaming."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.generate import (Decoder, Sampler, _forward_window, _lay_out, _Weights, generate,
                              generate_stream)
from flaxgpt.kv_cache import init_cache
from sampling_reference import generate_naive
from flaxgpt.model import GPT, GPTConfig, init_params

CONFIG = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=32)
S = CONFIG.block_size


@pytest.fixture(scope="module")
def params():
    """Weights ~25x larger than GPT-2's init, so greedy decoding wanders over the vocabulary instead
    of repeating one token, and the outputs actually exercise the context."""
    rng = np.random.default_rng(2)
    params = init_params(CONFIG, jax.random.key(0))
    return jax.tree.map(lambda x: x + rng.normal(0, 0.5, x.shape).astype(np.float32), params)


def random_tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape, dtype=np.int32)


_forward = jax.jit(_forward_window, static_argnums=(1, 6))  # (weights, config, cache, window, ...)


def run(params, config, *args):
    """_forward_window of params as they are, or of a Decoder's weights."""
    if not isinstance(params, _Weights):
        params = _Weights(params, jnp.transpose(params["wte"]["embedding"]), out_in=False)
    return _forward(params, config, *args)


forward = jax.jit(lambda params, tokens: GPT(CONFIG).apply({"params": params}, tokens))
# new tokens: well past block_size; most tests share it, and so their compiled programs
N = 2 * S + 3


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_matches_full_forward(params, scan_layers):
    """Prefill 5 tokens, then decode the rest one by one: every step's logits equal a full
    forward's, with the stacked [L, ...] cache of scanned blocks and the per-layer list of unscanned
    ones."""
    from flaxgpt.layer_stacking import convert_layers
    config = CONFIG.replace(scan_layers=scan_layers)
    layer_params = convert_layers(params, scan_layers)
    tokens = jnp.asarray(random_tokens(0, (2, S)))
    full = forward(params, tokens)  # [B, S, V]
    valid = jnp.zeros((2, S), bool).at[:, :5].set(True)
    cache = init_cache(config, 2)
    assert isinstance(cache, list) != scan_layers
    logits, cache = run(layer_params, config, cache, tokens, valid, 0, 5)
    np.testing.assert_allclose(logits, full[:, 4], atol=1e-5, rtol=0)
    for i in range(5, S):
        valid = valid.at[:, i].set(True)
        logits, cache = run(layer_params, config, cache, tokens, valid, i, 1)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-5, rtol=0)


def test_left_padded_prefill_matches_unpadded_forward(params):
    tokens = random_tokens(1, (S,))
    full = forward(params, jnp.asarray(tokens[None]))  # causal: position i sees tokens[:i + 1] only
    for n_real in (1, 6, S):
        window = np.zeros((1, S), np.int32)
        window[0, S - n_real:] = tokens[:n_real]
        valid = jnp.arange(S)[None] >= S - n_real
        logits, _ = run(params, CONFIG, init_cache(CONFIG, 1), jnp.asarray(window), valid, 0, S)
        np.testing.assert_allclose(logits, full[:, n_real - 1], atol=1e-5, rtol=0)


SHIFTS = [1, S // 2, S - 1]  # 1: nanoGPT's crop; S // 2; S - 1: the context falls back to 2 tokens


@pytest.mark.parametrize("window_shift", SHIFTS)
@pytest.mark.parametrize("prompt_length", [3, S, S + 5])  # S: slides at once; S + 5: cropped
def test_greedy_matches_naive_past_block_size(params, prompt_length, window_shift):
    prompt = random_tokens(prompt_length, (2, prompt_length))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0, window_shift=window_shift)
    cached = np.asarray(generate(params, CONFIG, prompt, **kw))
    np.testing.assert_array_equal(cached, generate_naive(params, CONFIG, prompt, **kw))
    assert cached.shape == (2, N) and len(np.unique(cached)) >= 3  # not one repeated token


def test_window_shift_only_changes_tokens_past_block_size(params):
    """The first S - T0 + 1 new tokens fit in the block whatever the shift; after that the context
    differs."""
    prompt = random_tokens(20, (2, 5))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0)
    exact = np.asarray(generate(params, CONFIG, prompt, **kw))
    for window_shift in SHIFTS[1:]:
        shifted = np.asarray(generate(params, CONFIG, prompt, window_shift=window_shift, **kw))
        np.testing.assert_array_equal(shifted[:, :S - 5 + 1], exact[:, :S - 5 + 1])
        assert not np.array_equal(shifted, exact)


def test_left_padded_batch_with_a_window_shift_matches_naive(params):
    """The window counts columns, padding included, in both loops; the unpadded row is an ordinary
    prompt."""
    prompt, mask = random_tokens(12, (3, 6)), np.ones((3, 6), bool)
    mask[1, :2] = mask[2, :5] = False
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0, window_shift=S // 2)
    cached = np.asarray(generate(params, CONFIG, prompt, prompt_mask=mask, **kw))
    np.testing.assert_array_equal(cached,
                                  generate_naive(params, CONFIG, prompt, prompt_mask=mask, **kw))
    np.testing.assert_array_equal(cached[:1], generate_naive(params, CONFIG, prompt[:1], **kw))


def test_left_padded_rows_match_naive_on_their_own_prompts(params):
    lengths = [3, 1]
    prompt, mask = np.zeros((2, 3), np.int32), np.zeros((2, 3), bool)
    for b, n in enumerate(lengths):
        prompt[b, 3 - n:], mask[b, 3 - n:] = random_tokens(10 + b, (n,)), True
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0)
    cached = np.asarray(generate(params, CONFIG, prompt, prompt_mask=mask, **kw))
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(
            cached[b], generate_naive(params, CONFIG, prompt[b:b + 1, 3 - n:], **kw)[0])


SAMPLING = dict(temperature=0.9, top_k=6, top_p=0.95)


@pytest.mark.parametrize("window_shift", [1, S // 2])
def test_sampling_matches_naive_and_depends_on_seed(params, window_shift):
    prompt = random_tokens(2, (2, 3))
    kw = dict(max_new_tokens=N, window_shift=window_shift, **SAMPLING)
    a = np.asarray(generate(params, CONFIG, prompt, rng=jax.random.key(7), **kw))
    np.testing.assert_array_equal(a, generate(params, CONFIG, prompt, rng=jax.random.key(7), **kw))
    np.testing.assert_array_equal(a, generate_naive(params, CONFIG, prompt, rng=jax.random.key(7),
                                                    **kw))
    assert not np.array_equal(a, generate(params, CONFIG, prompt, rng=jax.random.key(8), **kw))


def test_top_k_1_is_greedy(params):
    prompt = random_tokens(3, (2, 3))
    kw = dict(max_new_tokens=N, rng=jax.random.key(1))
    greedy = np.asarray(generate(params, CONFIG, prompt, temperature=0.0, **kw))
    np.testing.assert_array_equal(greedy, generate(params, CONFIG, prompt, temperature=2.0, top_k=1,
                                                   **kw))


def sample_many(logits, n=4096, **kw):
    """Token counts [V] of n samples from one row of logits."""
    tokens = Sampler(jnp.float32(kw.pop("temperature", 1.0)), **kw)(
        jnp.tile(jnp.asarray(logits), (n, 1)), jax.random.key(0))
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def test_top_k_never_emits_an_excluded_token():
    logits = np.array([0.5, 3.0, -1.0, 2.9, 0.0, 2.8, 1.0, -2.0, 0.2, 0.1, 0.3], np.float32)
    # hot: without the filter all would show up
    counts = sample_many(logits, top_k=3, temperature=3.0)
    assert set(np.flatnonzero(counts)) == {1, 3, 5}
    assert np.count_nonzero(sample_many(logits, temperature=3.0)) == len(logits)


def test_top_k_of_the_whole_vocabulary_filters_nothing():
    """top_k >= vocab skips the filter (no top_k program at all): the same samples as no top_k."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, CONFIG.vocab_size)), jnp.float32)
    plain = Sampler(jnp.float32(1.5))(logits, jax.random.key(1))
    for top_k in (CONFIG.vocab_size, CONFIG.vocab_size + 5):
        np.testing.assert_array_equal(
            Sampler(jnp.float32(1.5), top_k=top_k)(logits, jax.random.key(1)), plain)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.02, 0.4, 0.03, 0.25, 0.05, 0.15, 0.04, 0.02, 0.02, 0.01, 0.01])
    logits = np.log(probs).astype(np.float32)
    assert set(np.flatnonzero(sample_many(logits, top_p=0.6))) == {1, 3}  # 0.4 < 0.6 <= 0.65
    assert set(np.flatnonzero(sample_many(logits, top_p=0.7))) == {1, 3, 5}
    assert set(np.flatnonzero(sample_many(logits, top_p=0.7, top_k=2))) == {1, 3}
    assert np.count_nonzero(sample_many(logits, top_p=1.0)) == len(logits)
    assert set(np.flatnonzero(sample_many(logits, top_p=1e-6, temperature=5.0))) == {1}


def test_stop_token_pads_the_rest_of_the_row(params):
    prompt = random_tokens(4, (2, 3))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0)
    free = np.asarray(generate(params, CONFIG, prompt, **kw))
    # row 0 stops on its 4th token at the latest; row 1 maybe later, maybe never
    stop = int(free[0, 3])
    stopped = np.asarray(generate(params, CONFIG, prompt, stop_token=stop, **kw))
    ends = []
    for row_free, row in zip(free, stopped):
        hits = np.flatnonzero(row_free == stop)
        ends.append(hits[0] + 1 if len(hits) else N)
        np.testing.assert_array_equal(row[:ends[-1]], row_free[:ends[-1]])
        assert (row[ends[-1]:] == stop).all()
    streamed = np.stack(list(generate_stream(params, CONFIG, prompt, stop_token=stop, **kw)),
                        axis=1)
    assert streamed.shape[1] == max(ends)  # the stream ends once every row has stopped
    np.testing.assert_array_equal(streamed, stopped[:, :max(ends)])


@pytest.mark.parametrize("window_shift", [1, S // 2])
def test_stream_yields_the_tokens_of_generate(params, window_shift):
    prompt, mask = random_tokens(5, (2, 3)), np.array([[True] * 3, [False, False, True]])
    kw = dict(max_new_tokens=N, rng=jax.random.key(3), prompt_mask=mask, window_shift=window_shift,
              **SAMPLING)
    steps = list(generate_stream(params, CONFIG, prompt, **kw))
    assert len(steps) == N and steps[0].shape == (2,) and steps[0].dtype == np.int32
    np.testing.assert_array_equal(np.stack(steps, axis=1), generate(params, CONFIG, prompt, **kw))


def test_changing_the_temperature_does_not_recompile(params):
    decoder = Decoder(params, CONFIG, batch_size=2)
    program, prompt = decoder._programs["generate"], random_tokens(6, (2, 3))
    decoder.generate(prompt, max_new_tokens=N, rng=jax.random.key(0), temperature=0.5)
    compiled = program._cache_size()
    for temperature in (0.0, 1.3):
        generate(params, CONFIG, prompt, max_new_tokens=N, rng=jax.random.key(0),
                 temperature=temperature)
    assert program._cache_size() == compiled


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_mask=np.array([[True, True], [False, False]])), "real token"),
])
def test_invalid_arguments(params, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(params, CONFIG, np.ones((2, 2), np.int32),
                 **{"max_new_tokens": 3, "rng": jax.random.key(0), **kw})


@pytest.mark.parametrize("window_shift", [0, -1, S, S + 1])
def test_window_shift_must_leave_room_in_the_block(params, window_shift):
    kw = dict(max_new_tokens=3, rng=jax.random.key(0), window_shift=window_shift)
    for sample in (generate, generate_naive, lambda *a, **kw: next(generate_stream(*a, **kw))):
        with pytest.raises(ValueError, match=r"window_shift must be in \[1, block_size=16\)"):
            sample(params, CONFIG, np.ones((2, 2), np.int32), **kw)


UNSCANNED = CONFIG.replace(scan_layers=False)


def test_unscanned_generate_matches_scanned(params):
    from flaxgpt.layer_stacking import convert_layers
    prompt = random_tokens(3, (2, 3))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0, window_shift=S // 2)
    np.testing.assert_array_equal(generate(convert_layers(params, False), UNSCANNED, prompt, **kw),
                                  generate(params, CONFIG, prompt, **kw))


def test_the_cache_grows_through_its_sizes_and_restarts_small_after_a_slide():
    """With block_size 128 `generate` keeps a cache of 64, then 128 slots, and a slide
    restarts it at the smallest size that holds what it keeps: the tokens equal nanoGPT's loop
    (greedy) and the stream's, which always uses the full cache (sampling)."""
    from flaxgpt.generate import _cache_sizes

    config = CONFIG.replace(block_size=128)
    assert _cache_sizes(config) == [64, 128] and _cache_sizes(CONFIG) == [S]
    gpt2, odd = CONFIG.replace(block_size=1024), CONFIG.replace(block_size=1000)
    assert _cache_sizes(gpt2) == [64, 128, 256, 512, 1024] and _cache_sizes(gpt2, 100)[0] == 128
    assert _cache_sizes(odd) == [125, 250, 500, 1000]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.5, x.shape).astype(np.float32),
                          init_params(config, jax.random.key(1)))
    prompt = random_tokens(7, (2, 40))
    # a slide keeps 29: 64 slots, grown again to 128 before the next slide
    kw = dict(max_new_tokens=200, rng=jax.random.key(0), window_shift=100)
    greedy = np.asarray(generate(params, config, prompt, temperature=0.0, **kw))
    np.testing.assert_array_equal(greedy,
                                  generate_naive(params, config, prompt, temperature=0.0, **kw))
    sampled = np.asarray(generate(params, config, prompt, **kw, **SAMPLING))
    streamed = np.stack(list(generate_stream(params, config, prompt, **kw, **SAMPLING)), axis=1)
    np.testing.assert_array_equal(sampled, streamed)


def test_bfloat16_decoding_reads_bfloat16_weights_and_cache(params):
    """dtype=bfloat16 decodes with the weights and the cache in bfloat16 (half the bytes per token);
    its step-by-step logits stay within bfloat16's precision of float32's full forward."""
    decoder = Decoder(params, CONFIG.replace(dtype="bfloat16"), batch_size=2)
    layout, config = decoder._weights, decoder.config
    assert {x.dtype for x in jax.tree.leaves(layout)} == {jnp.dtype(jnp.bfloat16)}
    assert layout.head.shape == (CONFIG.n_embd, CONFIG.vocab_size)
    cache = init_cache(config, 2)
    assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)}
    tokens = jnp.asarray(random_tokens(0, (2, S)))
    full = forward(params, tokens)
    valid = jnp.zeros((2, S), bool).at[:, :5].set(True)
    logits, cache = run(layout, config, cache, tokens, valid, 0, 5)
    for i in range(5, S):
        valid = valid.at[:, i].set(True)
        logits, cache = run(layout, config, cache, tokens, valid, i, 1)
        scale = float(jnp.abs(full[:, i]).max())
        np.testing.assert_allclose(logits, full[:, i], atol=0.05 * scale, rtol=0)
        assert logits.dtype == jnp.float32


def test_a_decoder_takes_params_as_model_init_returns_them():
    """flax's idiom, Decoder(GPT(config).init(...)["params"], config): the params boxed with their
    logical axis names sample as the unboxed ones do."""
    import flax.linen as nn

    boxed = GPT(CONFIG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    assert any(map(is_box, jax.tree.leaves(boxed, is_leaf=is_box)))
    prompt = random_tokens(9, (2, 3))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(
        Decoder(boxed, CONFIG, batch_size=2).generate(prompt, **kw),
        generate(init_params(CONFIG, jax.random.key(0)), CONFIG, prompt, **kw))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_decoder_lays_the_weights_out_once(params, monkeypatch, batch_size):
    """Sampling twice (and streaming) from one Decoder copies no weight again: the layout function
    runs once, in the constructor, and the arrays sampled from are the same objects every time. The
    tokens are the one-shot `generate`'s."""
    calls = []
    # flaxgpt.generate is the function
    generate_module = importlib.import_module("flaxgpt.generate")
    lay_out = generate_module._lay_out
    monkeypatch.setattr(generate_module, "_lay_out",
                        lambda *a, **k: calls.append(1) or lay_out(*a, **k))
    decoder = Decoder(params, CONFIG, batch_size=batch_size)
    assert len(calls) == 1 and not decoder.config.scan_layers
    laid_out = jax.tree.leaves(decoder._weights)
    prompt = random_tokens(4, (batch_size, 3))
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), **SAMPLING)
    first, second = decoder.generate(prompt, **kw), decoder.generate(prompt, **kw)
    streamed = np.stack(list(decoder.stream(prompt, **kw)), axis=1)
    assert len(calls) == 1
    assert all(a is b for a, b in zip(jax.tree.leaves(decoder._weights), laid_out, strict=True))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, streamed)
    np.testing.assert_array_equal(first, generate(params, CONFIG, prompt, **kw))
    assert len(calls) == 2  # the one-shot lays them out on each call


def _computations(hlo: str) -> dict[str, list[str]]:
    """Compiled HLO text -> {computation name: its instruction lines}."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    return computations


def _reachable(computations, root: str) -> set[str]:
    """root and every computation it calls (fusions, loop bodies and conditions, branches),
    recursively."""
    seen, todo = {root}, [root]
    while todo:
        for line in computations[todo.pop()]:
            for callee in re.findall(r"(?:calls|body|condition|to_apply|branch_computations)"
                                     r"=\{?%([\w.\-]+)", line):
                if callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
    return seen


# What an append loop may do with a cache- or weight-sized array: take it in and pass it on
# (parameter, get-tuple-element, bitcast, tuple), write a token into it in place
# (dynamic-update-slice) or call a fusion, whose own instructions are checked as well. Anything else
# that large (a copy, a select, a multiply, ...) would rewrite a cache or a weight every token.
IN_PLACE_OPCODES = {"parameter", "get-tuple-element", "bitcast", "tuple", "dynamic-update-slice",
                    "fusion"}


@pytest.mark.parametrize("batch_size", [1, 2])  # 1: the kernels stored [out, in] (on CPU)
def test_appending_a_token_rewrites_no_cache_and_no_weight(batch_size):
    """In the compiled `generate` of a scanned model, the loops that append one token per step
    (those with matmuls and no such loop inside them) compute nothing as large as a weight matrix or
    a layer's cache: the cache is updated in place and the weights are read where they lie."""
    from flaxgpt.generate import checked_prompt, make_sampler

    config = CONFIG.replace(block_size=128, n_embd=32)
    decoder = Decoder(init_params(config, jax.random.key(0)), config, batch_size=batch_size)
    weights, config = decoder._weights, decoder.config
    prompt, mask = checked_prompt(config, random_tokens(0, (batch_size, 3)), None, window_shift=1)
    hlo = decoder._programs["generate"].lower(weights, config, make_sampler(0.0), prompt, mask,
                                             jax.random.key(0), 150, 1).compile().as_text()
    # the products of several rows (the prompt, batch 2) are YNNPACK's: compiler_options(ynnpack=)
    assert "ynn_fusion" in hlo
    computations = _computations(hlo)
    bodies = [re.search(r"body=%([\w.\-]+)", line).group(1)
              for lines in computations.values() for line in lines if " while(" in line]
    with_dots = {b: _reachable(computations, b) for b in bodies
                 if any(" dot(" in line
                        for c in _reachable(computations, b) for line in computations[c])}
    appends = [b for b, inside in with_dots.items()
               if not any(other in inside for other in with_dots if other != b)]
    assert len(appends) >= 2  # one per cache size (64 and 128 slots) at least
    smallest = config.n_embd ** 2  # a layer's cache (B x 2 heads x 16 x 64 slots) is larger
    for body in appends:
        for c in with_dots[body]:
            for line in computations[c]:
                op = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
                if op and op.group(2) not in IN_PLACE_OPCODES:
                    assert np.prod([int(d) for d in op.group(1).split(",") if d]) < smallest, line


def test_on_cpu_a_decoder_stores_kernels_out_in_and_both_layouts_match_the_full_forward(params):
    """On a CPU a Decoder stores the blocks' kernels [out, in] at any batch size (one row is a
    product by rows, a few the kernel first, many by rows again: _out_in_dense); other platforms
    keep [in, out]. Both layouts give the cached step-by-step logits of the full forward, two rows
    a step, and so does a prefill of more rows than WEIGHT_FIRST_ROWS."""
    from flaxgpt.generate import WEIGHT_FIRST_ROWS
    rows = Decoder(params, CONFIG, batch_size=2)
    assert rows._weights.out_in and Decoder(params, CONFIG, batch_size=1)._weights.out_in
    kernels = rows._weights.params["h_0"]
    assert kernels["mlp"]["c_fc"]["kernel"].shape == (4 * CONFIG.n_embd, CONFIG.n_embd)
    assert kernels["attn"]["c_proj"]["kernel"].shape == (CONFIG.n_embd, CONFIG.n_head,
                                                         CONFIG.head_dim)
    assert kernels["attn"]["c_attn"]["kernel"].shape == (3, CONFIG.n_head, CONFIG.head_dim,
                                                         CONFIG.n_embd)
    config = rows.config
    tokens = jnp.asarray(random_tokens(5, (2, S)))
    full = forward(params, tokens)
    for layout in (rows._weights, _lay_out(params, config, out_in=False)):
        cache, valid = init_cache(config, 2), jnp.zeros((2, S), bool).at[:, :4].set(True)
        logits, cache = run(layout, config, cache, tokens, valid, 0, 4)
        for i in range(4, S):
            valid = valid.at[:, i].set(True)
            logits, cache = run(layout, config, cache, tokens, valid, i, 1)
            np.testing.assert_allclose(logits, full[:, i], atol=1e-5, rtol=0)
    many = jnp.asarray(random_tokens(6, (8, S)))
    assert 2 in WEIGHT_FIRST_ROWS and 8 * S not in WEIGHT_FIRST_ROWS
    all_valid = jnp.ones((8, S), bool)
    logits, _ = run(rows._weights, config, init_cache(config, 8), many, all_valid, 0, S)
    np.testing.assert_allclose(logits, forward(params, many)[:, -1], atol=1e-5, rtol=0)
