"""Parallelism on 8 simulated CPU devices (tests/conftest.py sets the XLA flag): the mesh, sharded
training equal to one device under DP / FSDP / TP and their combinations, the shardings the logical
axis rules ask for, checkpoints restored across mesh changes, and the training loop on a 2-D mesh.

Tolerances: the meshes reduce in a different order than one device (e.g. a sum of 8 partial sums),
so results agree to float32 rounding, not bit for bit. The TrainStep-level comparisons use SGD with
momentum after global-norm clipping: Adam divides every gradient element by its own magnitude, so an
element whose true gradient is 0 (e.g. the key bias: softmax ignores a shift of all scores) or tiny
turns rounding noise into a +-lr step, and Adam's parameters of any two reduction orders differ by
~lr. The end-to-end test through `train()` uses the real AdamW at the configs' warm-up learning
rate.
"""


import warnings

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from flaxgpt import optim, sharding
from flaxgpt.config import base_config
from flaxgpt.model import GPTConfig
from flaxgpt.train_step import TrainStep
from conftest import assert_trees_close, one_device_mesh, to_host

MESHES = {
    "dp8": {"data": 8},
    "fsdp8": {"fsdp": 8},
    "tp2_dp4": {"data": 4, "tensor": 2},
    "fsdp4_tp2": {"fsdp": 4, "tensor": 2},
    "tp8": {"tensor": 8},
}
# Heads, MLP units (4 * 32) and vocabulary divide by 8, so every mesh above can split them.
TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=8, n_embd=32)
# gradient accumulation 2, global micro-batch 8 (divides over 8 devices)
A, B, T, STEPS = 2, 8, 16, 3
SEED = 3
LOSS_TOL = dict(rtol=2e-6, atol=0)  # measured: <= 1 ulp (4.8e-7 at loss ~4.2)
PARAM_TOL = dict(rtol=1e-5, atol=1e-7)  # measured: <= 1.5e-8 absolute after 3 steps (SGD)


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, (
        f"{jax.device_count()} devices: these tests need "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts "
        "(tests/conftest.py does that)")


def sgd():
    # Clipping at 0.2 is active (below the gradient norms): the global norm over all shards matters.
    return optax.chain(optax.clip_by_global_norm(0.2), optax.sgd(0.5, momentum=0.9))


def batches():
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (STEPS, A, B, T + 1))
    tokens = tokens.astype(np.int32)
    return [(b[..., :-1], b[..., 1:]) for b in tokens]


def spec(x) -> tuple:
    """x's PartitionSpec as a tuple padded with None to x's rank (P('a') equals P('a', None))."""
    s = tuple(x.sharding.spec)
    return s + (None,) * (len(x.shape) - len(s))


def run(train_step: TrainStep, state):
    losses, norms = [], []
    for x, y in batches():
        x, y = (jax.device_put(a, train_step.batch_sharding) for a in (x, y))
        state, metrics = train_step.train_fn(state, x, y)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    return state, np.array(losses), np.array(norms)


# --------------------------------------------------------------------------------------------- mesh

@pytest.mark.parametrize("shape, sizes", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
    ({"fsdp": -1}, (1, 8, 1)),
    ({"fsdp": -1, "tensor": 2}, (1, 4, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": 4, "tensor": 2}, (4, 1, 2)),  # axes left out have size 1
    ({"tensor": 8}, (1, 1, 8)),
])
def test_make_mesh_sizes(shape, sizes):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == sharding.MESH_AXES == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == sizes
    assert mesh.axis_types == (AxisType.Auto,) * 3  # linen's logical partitioning needs Auto axes
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_from_the_base_config_and_a_device_subset():
    mesh = sharding.make_mesh(base_config().mesh)  # a ConfigDict, as train() passes it
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert dict(one_device_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("shape, message", [
    ({"data": 1}, "needs 1 devices, but there are 8"),
    ({"data": 2, "tensor": 2}, "needs 4 devices, but there are 8"),
    ({"data": 4, "fsdp": 4}, "needs 16 devices"),
    ({"data": -1, "tensor": 3}, "not divisible by 3"),
    ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
    ({"pipeline": 2, "data": -1}, "unknown mesh axes ['pipeline']"),
])
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(shape)
    assert message in str(e.value)


def test_batch_sharding_splits_the_batch_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    assert tuple(s.spec) == (None, ("data", "fsdp"), None)
    shards = s.addressable_devices_indices_map((A, B, T))
    assert {idx[1].indices(B)[:2] for idx in shards.values()} == {(0, 2), (2, 4), (4, 6), (6, 8)}
    # this process holds all rows
    np.testing.assert_array_equal(sharding.process_rows(s, (A, B, T), batch_axis=1), np.arange(B))


# ------------------------------------------------------------------- sharded training == one device

@pytest.fixture(scope="module")
def reference():
    """Init and 3 steps (2 micro-batches each) on one device: (initial state on the host, losses,
    norms, final params on the host)."""
    train_step = TrainStep(TINY, sgd(), one_device_mesh(), seed=SEED)
    init = to_host(train_step.init(jax.random.key(0)))
    state, losses, norms = run(train_step, jax.device_put(init, train_step.state_sharding))
    return init, losses, norms, to_host(state.params)


@pytest.mark.parametrize("name", MESHES)
def test_sharded_training_matches_one_device(name, reference):
    init, ref_losses, ref_norms, ref_params = reference
    train_step = TrainStep(TINY, sgd(), sharding.make_mesh(MESHES[name]), seed=SEED)
    # sharded init (each device draws only its shards) draws the same numbers
    if name == "fsdp4_tp2":
        state = train_step.init(jax.random.key(0))
        assert_trees_close(to_host(state), init, rtol=0, atol=0)
    else:
        state = jax.device_put(init, train_step.state_sharding)
    state, losses, norms = run(train_step, state)
    np.testing.assert_allclose(losses, ref_losses, **LOSS_TOL)
    np.testing.assert_allclose(norms, ref_norms, **LOSS_TOL)
    assert_trees_close(to_host(state.params), ref_params, **PARAM_TOL)
    assert int(state.step) == STEPS
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(train_step.state_sharding)):
        # out_shardings keep the state in place
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_dropout_masks_do_not_depend_on_the_mesh(reference):
    """The dropout RNG is a function of (seed, step, micro-step) only, and jax's random bits do not
    depend on the sharding (with jax_threefry_partitionable, the default, each device draws only its
    slice; with it off the masks are the same too, drawn whole). FSDP 4 x TP 2 splits the batch (all
    dropout masks) and the heads (attention-weight dropout)."""
    init, _, ref_norms, _ = reference
    config = TINY.replace(dropout=0.2)
    results = {}
    for name, mesh in (("one", one_device_mesh()),
                       ("fsdp4_tp2", sharding.make_mesh(MESHES["fsdp4_tp2"]))):
        train_step = TrainStep(config, sgd(), mesh, seed=SEED)
        state, losses, norms = run(train_step, jax.device_put(init, train_step.state_sharding))
        results[name] = losses, norms, to_host(state.params)
    # dropout is on: not the gradient of p=0
    assert abs(results["one"][1][0] / ref_norms[0] - 1) > 1e-3
    np.testing.assert_allclose(results["fsdp4_tp2"][0], results["one"][0], **LOSS_TOL)
    np.testing.assert_allclose(results["fsdp4_tp2"][1], results["one"][1], **LOSS_TOL)
    assert_trees_close(results["fsdp4_tp2"][2], results["one"][2], **PARAM_TOL)


# ---------------------------------------------------------------------------------------- shardings

# Per parameter (path below a block, or top level): its PartitionSpec under fsdp 4 x tensor 2.
FSDP4_TP2_SPECS = {
    "wte/embedding": ("tensor", "fsdp"),  # ("vocab", "embed")
    "wpe/embedding": (None, "fsdp"),
    "ln_f/scale": ("fsdp",), "ln_f/bias": ("fsdp",),
    "ln_1/scale": ("fsdp",), "ln_1/bias": ("fsdp",), "ln_2/scale": ("fsdp",),
    "ln_2/bias": ("fsdp",),
    "attn/c_attn/kernel": ("fsdp", None, "tensor", None),  # ("embed", None, "heads", "kv")
    "attn/c_attn/bias": (None, "tensor", None),
    "attn/c_proj/kernel": ("tensor", None, "fsdp"),  # ("heads", "kv", "embed")
    "attn/c_proj/bias": ("fsdp",),
    "mlp/c_fc/kernel": ("fsdp", "tensor"),  # ("embed", "mlp")
    "mlp/c_fc/bias": ("tensor",),
    "mlp/c_proj/kernel": ("tensor", "fsdp"),
    "mlp/c_proj/bias": ("fsdp",),
}


def param_name(path) -> str:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return "/".join(keys[1:] if keys[0] == "h" or keys[0].startswith("h_") else keys)


def layer_spec(path, leaf) -> tuple:
    """spec(leaf) without the stacked blocks' leading layers axis, which must be replicated."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys[0] == "h":
        assert spec(leaf)[0] is None, jax.tree_util.keystr(path)
        return spec(leaf)[1:]
    return spec(leaf)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_state_shardings_follow_the_logical_axis_rules(scan_layers):
    """Params, AdamW's mu and nu as the rules say; scalars (step, Adam's count) replicated."""
    train_step = TrainStep(TINY.replace(scan_layers=scan_layers),
                           optim.make_optimizer(base_config()),
                           sharding.make_mesh({"fsdp": 4, "tensor": 2}), seed=SEED)
    state = train_step.abstract_state
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    assert {param_name(path) for path, _ in params} == set(FSDP4_TP2_SPECS)
    for path, leaf in params:
        want = FSDP4_TP2_SPECS[param_name(path)]
        assert layer_spec(path, leaf) == want, jax.tree_util.keystr(path)

    assert spec(state.step) == () and state.step.sharding.is_fully_replicated
    moments = {"mu": 0, "nu": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        moment = [k.name for k in path
                  if isinstance(k, jax.tree_util.GetAttrKey) and k.name in moments]
        if moment:
            moments[moment[0]] += 1
            want = FSDP4_TP2_SPECS[param_name(path)]
            assert layer_spec(path, leaf) == want, jax.tree_util.keystr(path)
        else:
            assert leaf.shape == () and spec(leaf) == (), jax.tree_util.keystr(path)  # counts
    assert moments == {"mu": len(params), "nu": len(params)}


def test_fsdp_shards_every_param_with_an_embed_axis_and_dp_replicates_everything():
    fsdp = TrainStep(TINY, sgd(), sharding.make_mesh({"fsdp": 8})).abstract_state.params
    for path, leaf in jax.tree_util.tree_flatten_with_path(fsdp)[0]:
        if param_name(path) in ("attn/c_attn/bias", "mlp/c_fc/bias"):  # no embed axis: replicated
            assert leaf.sharding.is_fully_replicated, param_name(path)
        else:
            assert "fsdp" in layer_spec(path, leaf), param_name(path)
    dp = TrainStep(TINY, sgd(), sharding.make_mesh({"data": 8})).abstract_state
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(dp))


def test_the_traced_step_constrains_the_models_activations_to_the_mesh():
    """The model's logical constraints (embeddings, each block's output, the MLP's hidden units)
    reach the traced train step as sharding constraints on its mesh, batch over fsdp."""
    step_fns = TrainStep(TINY, sgd(), sharding.make_mesh({"fsdp": 8}))
    x = jax.ShapeDtypeStruct((1, 8, TINY.block_size), np.int32)
    jaxpr = str(jax.make_jaxpr(step_fns._train_step)(step_fns.abstract_state, x, x))
    assert jaxpr.count("sharding_constraint[") >= 3
    assert "spec=P(('data', 'fsdp'), None, None)" in jaxpr


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    """A 65-token vocabulary and 3 heads over tensor=2: those axes stay whole, training matches."""
    odd = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=3, n_embd=24)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    with pytest.warns(UserWarning) as caught:
        params = TrainStep(odd, sgd(), mesh).abstract_state.params
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2, messages  # one line per replicated dimension, not per array
    assert messages[0].startswith("weights replicated, not split: the heads dimension (3) of ")
    assert "does not divide by tensor=2" in messages[0]
    assert messages[0].endswith("set --config.mesh.tensor so that tensor=2 divides 3")
    assert messages[1].startswith("weights replicated, not split: the vocab dimension (65) of ")
    assert spec(params["wte"]["embedding"]) == (None, "fsdp")
    assert spec(params["h"]["attn"]["c_attn"]["kernel"]) == (None, "fsdp", None, None, None)
    # 96 hidden units divide
    assert spec(params["h"]["mlp"]["c_fc"]["kernel"]) == (None, "fsdp", "tensor")
    losses = []
    for mesh in (one_device_mesh(), sharding.make_mesh({"fsdp": 4, "tensor": 2})):
        train_step = TrainStep(odd, sgd(), mesh)
        x = jax.device_put(batches()[0][0] % odd.vocab_size, train_step.batch_sharding)
        state = train_step.init(jax.random.key(SEED))
        losses.append(float(train_step.train_fn(state, x, x)[1]["loss"]))
    np.testing.assert_allclose(losses[1], losses[0], **LOSS_TOL)


@pytest.mark.parametrize("shape, sizes", [
    ({"data": 1, "fsdp": -1, "n_embd": 12}, (2, 4, 1)),  # gcd(8, 12) = 4: data takes the other 2
    ({"data": 1, "fsdp": -1, "n_embd": 32}, (1, 8, 1)),
    ({"data": 1, "fsdp": -1, "tensor": 2, "n_embd": 6}, (2, 2, 2)),
    ({"data": -1, "fsdp": 8, "n_embd": 12}, (1, 8, 1)),  # an explicit fsdp is kept (and warned)
])
def test_fsdp_minus_one_takes_the_largest_size_the_model_width_allows(shape, sizes):
    mesh = sharding.make_mesh(shape)
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == sizes


def test_fsdp_minus_one_follows_the_configs_model_width():
    """config.mesh.n_embd follows config.n_embd (an override on the command line included), so
    train()'s make_mesh(config.mesh) splits every weight: FSDP over 8 devices warns about none."""
    c = base_config()
    c.n_embd, c.mesh.fsdp, c.mesh.data = 12, -1, 1
    mesh = sharding.make_mesh(c.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    model = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=c.n_embd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainStep(model, sgd(), mesh)
    with pytest.warns(UserWarning, match=r"the embed dimension \(12\) .* by fsdp=8, .* set "
                                         r"--config.mesh.fsdp to a divisor of 12"):
        TrainStep(model, sgd(), sharding.make_mesh({"data": 1, "fsdp": 8}))


def test_several_tpu_slices_split_data_over_the_slices_and_keep_fsdp_and_tensor_inside():
    """2 x v5e-16 (libtpu's compile-only devices, 8 hosts of 4 chips): data spans the slices,
    each fsdp x tensor group is one slice's, and slice 0's hosts read the first half of the
    batch."""
    pytest.importorskip("libtpu", reason='TPU topologies come from libtpu: pip install '
                                         '"flaxgpt[tpu]"')
    from flaxgpt import compile_for
    devices = compile_for.target_named("2xv5e-16").devices
    mesh = sharding.make_mesh({"data": -1, "fsdp": 4, "tensor": 2}, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 4, "tensor": 2}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert [set(slice_of[i].flat) for i in range(4)] == [{0}, {0}, {1}, {1}]
    rows = sharding.rows_by_process(sharding.batch_sharding(mesh, 2), (32, 8))
    hosts = {d.process_index: d.slice_index for d in devices}
    assert sorted(hosts) == list(range(8))
    for process, held in rows.items():
        assert set(held) <= set(range(16 * hosts[process], 16 * hosts[process] + 16)), process
    for shape in ({"data": 1, "fsdp": 32}, {"data": 3, "fsdp": -1}):
        with pytest.raises(ValueError, match="over 2 slices of 16 devices|not divisible"):
            sharding.make_mesh(shape, devices)


# -------------------------------------------------------------------------------------- checkpoints


def test_each_host_of_a_v4_32_reads_its_own_interleaved_rows():
    """A v4-32's devices in physical order put its 4 hosts round-robin along the data axis: host 0
    holds rows 0, 4, 8, 12 of a 16-row batch. rows_by_process finds each host's rows from the
    topology alone."""
    pytest.importorskip("libtpu", reason='the v4-32 topology comes from libtpu: pip install '
                                         '"flaxgpt[tpu]"')
    from flaxgpt import compile_for
    mesh = sharding.make_mesh({"data": -1}, compile_for.target_named("v4-32").devices)
    rows = sharding.rows_by_process(sharding.batch_sharding(mesh, 3, batch_axis=1), (1, 16, 8),
                                    batch_axis=1)
    assert {p: list(r) for p, r in rows.items()} == {p: [p, p + 4, p + 8, p + 12] for p in range(4)}


def test_a_batch_assembled_from_interleaved_rows_is_the_batch():
    """global_batch from the rows one process holds, in a mesh whose devices are in any order."""
    devices = np.array(jax.devices())[[3, 0, 7, 1, 6, 2, 5, 4]]
    mesh = sharding.make_mesh({"data": -1}, list(devices))
    s = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    batch = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    rows = sharding.process_rows(s, batch.shape, batch_axis=1)
    assembled = sharding.global_batch(batch[:, rows], rows, s, batch.shape, batch_axis=1)
    np.testing.assert_array_equal(np.asarray(assembled), batch)
    for shard in assembled.addressable_shards:
        np.testing.assert_array_equal(shard.data, batch[shard.index])


@pytest.mark.parametrize("batch, accumulation, devices, expected", [
    (48, 10, 256, (256, 2)), (48, 10, 16, (48, 10)), (48, 10, 32, (32, 15)), (8, 1, 3, (3, 3))])
def test_divisible_batch_keeps_the_sequences_per_step_nearest(batch, accumulation, devices,
                                                              expected):
    assert sharding.divisible_batch(batch, accumulation, devices) == expected
