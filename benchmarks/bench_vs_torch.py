"""flaxgpt's jitted train step against the same step in PyTorch, on the same CPU, in one run.

    # configs/shakespeare_char.py:cpu
    python benchmarks/bench_vs_torch.py
    # any --config.key=value override
    python benchmarks/bench_vs_torch.py --config.bias=True --rounds 7
    # one system only (its peak memory)
    python benchmarks/bench_vs_torch.py --system=jax
    # block, MLP, attention, LayerNorm alone
    python benchmarks/bench_vs_torch.py --components

The PyTorch model is nanoGPT's GPT (nanoGPT's parameter names and nn.Linear layout, SDPA causal
attention, exact or tanh GELU as the config says, tied head) holding the very weights flaxgpt starts
from (exported with flaxgpt.pretrained's nanoGPT mapping), trained with torch.optim.AdamW (decay on
matrices only, as nanoGPT's configure_optimizers) and global-norm clipping: the same math as
flaxgpt's step with a constant learning rate. Before timing, both compute the loss of one batch and
must agree.

The two systems take turns in blocks of --steps steps (--rounds rounds), so that a machine whose
speed drifts slows both alike; medians are printed with the ratio flaxgpt / torch (below 1: flaxgpt
faster) for the whole optimizer step, forward + backward, and forward alone (eval mode, no
gradients). --components times the first block and its parts instead (forward + backward into the
params and the input).
"""

import argparse
import math
import resource
import sys
from pathlib import Path

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import benchmarking  # noqa: E402
from flaxgpt import host_memory, optim, sharding, xla_options  # noqa: E402
from flaxgpt.model import GPTConfig  # noqa: E402
from flaxgpt.train_step import TrainStep  # noqa: E402

CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py:cpu",
                                         "the config to compare")


def torch_gpt(config: GPTConfig, params):
    """nanoGPT's GPT in PyTorch (float32) with flaxgpt's params -> torch.nn.Module; forward(idx,
    targets) -> loss."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from flaxgpt.pretrained import _to_torch

    C, V = config.n_embd, config.vocab_size
    gelu = "tanh" if config.gelu_approximate else "none"

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)
            self.c_proj = nn.Linear(C, C, bias=config.bias)

        def forward(self, x):  # x: [B, T, C]
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, config.n_head, config.head_dim).transpose(1, 2)
                       for t in self.c_attn(x).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)
            self.c_proj = nn.Linear(4 * C, C, bias=config.bias)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate=gelu))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(C, bias=config.bias), Attention()
            self.ln_2, self.mlp = nn.LayerNorm(C, bias=config.bias), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(V, C), wpe=nn.Embedding(config.block_size, C),
                h=nn.ModuleList([Block() for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(C, bias=config.bias)))
            self.lm_head = nn.Linear(C, V, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied

        def forward(self, idx, targets):
            t = self.transformer
            x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
            for block in t.h:
                x = block(x)
            logits = self.lm_head(t.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.view(-1))

    model = GPT()
    state = {f"transformer.{k}": torch.from_numpy(v)
             for k, v in _to_torch(params, config, linear=True).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    return model


def torch_optimizer(model, config):
    """nanoGPT's configure_optimizers on a CPU: AdamW, weight decay on the >= 2-D parameters
    only."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             eps=1e-8)


def compare(systems: dict, steps: int, rounds: int) -> dict:
    """systems: {system: {measure: fn}} -> {system: {measure: median seconds per call}}: after 3
    warm-up calls each, every round times each measure of each system in turn, a block of `steps`
    calls."""
    for measures in systems.values():  # compile and warm up
        for fn in measures.values():
            for _ in range(3):
                fn()
    runs = {(name, measure): systems[name][measure]
            for measure in next(iter(systems.values())) for name in systems}
    seconds = benchmarking.median_seconds_in_turns(runs, rounds, calls=steps)
    return {name: {measure: seconds[name, measure] for measure in measures}
            for name, measures in systems.items()}


def print_ratios(medians: dict) -> None:
    for measure in next(iter(medians.values())):
        ms = {name: m[measure] * 1e3 for name, m in medians.items()}
        line = "  ".join(f"{name} {value:7.2f} ms" for name, value in ms.items())
        ratio = f"  flaxgpt/torch {ms['flaxgpt'] / ms['torch']:.2f}x" if len(ms) == 2 else ""
        print(f"{measure:>20}: {line}{ratio}")


def component_measures(config: GPTConfig, params, torch_model, batch: int, options) -> dict:
    """The first block and its parts, forward + backward on a random [B, T, C] input against a
    random cotangent, jitted with the train step's compiler `options`: {"flaxgpt": {part: fn},
    "torch": {part: fn}}."""
    import jax.numpy as jnp
    import torch

    from flaxgpt import model as model_lib
    from flaxgpt.layer_stacking import convert_layers

    x_np, g_np = np.random.default_rng(0).standard_normal(
        (2, batch, config.block_size, config.n_embd), np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)
    tx, tg = torch.from_numpy(x_np).requires_grad_(True), torch.from_numpy(g_np)
    params = convert_layers(params, scan_layers=False)  # h_0 ... also when the config scans
    block = torch_model.transformer.h[0]
    parts = {"block": (model_lib.Block(config), params["h_0"], block),
             "attention": (model_lib.CausalSelfAttention(config), params["h_0"]["attn"],
                           block.attn),
             "MLP": (model_lib.MLP(config), params["h_0"]["mlp"], block.mlp),
             "LayerNorm": (model_lib.layer_norm(config, "ln_1"), params["h_0"]["ln_1"], block.ln_1)}
    # block and attention also return their cache
    first = lambda y: y[0] if isinstance(y, tuple) else y
    measures = {"flaxgpt": {}, "torch": {}}
    for part, (module, part_params, torch_module) in parts.items():
        loss = lambda p, xs, cotangent, module=module: jnp.vdot(
            first(module.apply({"params": p}, xs)), cotangent)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
        measures["flaxgpt"][part] = lambda grad=grad, p=part_params: jax.block_until_ready(
            grad(p, x, g))

        def torch_grad(module=torch_module):
            module.zero_grad(set_to_none=True)
            tx.grad = None
            first(module(tx)).backward(tg)

        measures["torch"][part] = torch_grad
    return measures


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating blocks per system and measure")
    p.add_argument("--system", choices=("both", "jax", "torch"), default="both")
    p.add_argument("--vocab_size", type=int, default=None, help="default: the prepared dataset's")
    p.add_argument("--components", action="store_true",
                   help="time the first block and its parts instead")
    args, absl_argv = p.parse_known_args(argv[1:])
    flags.FLAGS([argv[0], *absl_argv])
    if args.components and args.system != "both":
        sys.exit("bench_vs_torch.py: --components compares both systems")
    config = CONFIG.value
    config.decay_lr = False  # a constant learning rate in both systems
    model = benchmarking.benchmark_model(config, args.vocab_size)
    if model.dropout:
        sys.exit("bench_vs_torch.py: set --config.dropout=0 "
                 "(the two systems draw different dropout masks)")
    A, B, T = config.gradient_accumulation_steps, config.batch_size, model.block_size
    if A != 1:
        sys.exit("bench_vs_torch.py: set --config.gradient_accumulation_steps=1")
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (B, T + 1)).astype(np.int32)
    x_np, y_np = tokens[:, :-1], tokens[:, 1:]

    host_memory.keep_freed_memory()  # as train() does on CPUs
    train_step = TrainStep(model, optim.make_optimizer(config),
                           sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=config.seed)
    state = train_step.init(jax.random.key(config.seed))
    host_params = jax.device_get(state.params)
    x, y = (jax.device_put(a[None], train_step.batch_sharding) for a in (x_np, y_np))
    options = xla_options.compiler_options(jax.devices()[0].platform)  # as the train step compiles
    loss_fn = jax.jit(lambda p, xb, yb: train_step.loss_fn(p, xb, yb), compiler_options=options)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, xb, yb: train_step.loss_fn(p, xb, yb)),
                      compiler_options=options)
    jax_state = [state]

    def jax_step():
        jax_state[0], metrics = train_step.train_fn(jax_state[0], x, y)
        jax.block_until_ready(metrics)

    jax_measures = {
        "train step": jax_step,
        "forward + backward": lambda: jax.block_until_ready(grad_fn(host_params_dev, x[0], y[0])),
        "forward": lambda: jax.block_until_ready(loss_fn(host_params_dev, x[0], y[0])),
    }
    host_params_dev = jax.device_put(host_params)
    systems = {}
    if args.system in ("both", "jax"):
        systems["flaxgpt"] = jax_measures
    if args.system in ("both", "torch"):
        import torch
        tmodel = torch_gpt(model, host_params)
        topt = torch_optimizer(tmodel, config)
        tx, ty = torch.from_numpy(x_np.astype(np.int64)), torch.from_numpy(y_np.astype(np.int64))
        if "flaxgpt" in systems:
            with torch.no_grad():
                torch_loss = float(tmodel(tx, ty))
            jax_loss = float(loss_fn(host_params_dev, x[0], y[0]))
            if not math.isclose(torch_loss, jax_loss, rel_tol=1e-4):
                sys.exit(f"the two models disagree: loss {jax_loss} (flaxgpt) "
                         f"vs {torch_loss} (torch)")
            print(f"same loss on one batch: flaxgpt {jax_loss:.6f}, torch {torch_loss:.6f}")

        def torch_step():
            topt.zero_grad(set_to_none=True)
            loss = tmodel(tx, ty)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tmodel.parameters(), config.grad_clip)
            topt.step()

        def torch_fwd_bwd():
            tmodel.zero_grad(set_to_none=True)
            tmodel(tx, ty).backward()

        def torch_forward():
            with torch.no_grad():
                tmodel(tx, ty)

        systems["torch"] = {"train step": torch_step, "forward + backward": torch_fwd_bwd,
                            "forward": torch_forward}
        print(f"torch {torch.__version__} on {torch.get_num_threads()} threads")

    print(f"jax {jax.__version__}; model {model.n_layer} layers x {model.n_embd} wide, "
          f"{model.n_head} heads, vocab {model.vocab_size}, bias {model.bias}, "
          f"gelu {'tanh' if model.gelu_approximate else 'erf'}; "
          f"batch {B} x {T}; {args.rounds} rounds of {args.steps} steps, medians", flush=True)
    if args.components:
        systems = component_measures(model, host_params, tmodel, B, options)
        print("forward + backward (params and input gradients) of the first block and its parts:")
    print_ratios(compare(systems, args.steps, args.rounds))
    print("peak RSS of this process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main(sys.argv)
