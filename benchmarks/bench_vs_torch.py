"""flaxgpt's jitted train step against nanoGPT's step in PyTorch, on the same CPU, in one run.

    # configs/shakespeare_char.py:cpu, the README's CPU model
    python benchmarks/bench_vs_torch.py
    # any --config.key=value override, e.g. GPT-2's shapes (124M, 1024 tokens)
    python benchmarks/bench_vs_torch.py --config=configs/owt.py --config.batch_size=1 \
        --config.gradient_accumulation_steps=1 --config.dropout=0 --vocab_size=50304 --steps 3
    # one system only
    python benchmarks/bench_vs_torch.py --system=jax
    # block, MLP, attention, LayerNorm alone
    python benchmarks/bench_vs_torch.py --components

The PyTorch model is nanoGPT's GPT (nanoGPT's parameter names and nn.Linear layout, SDPA causal
attention, exact or tanh GELU as the config says, tied head) holding the very weights flaxgpt starts
from (exported with flaxgpt.pretrained's nanoGPT mapping), trained with torch.optim.AdamW (decay on
matrices only, as nanoGPT's configure_optimizers) and global-norm clipping: the same math as
flaxgpt's step with a constant learning rate. Before timing, both compute the loss of one batch and
must agree.

Each system runs in a process of its own, as nanoGPT and flaxgpt run: the flaxgpt process tunes
malloc as train() does (host_memory), the torch process keeps torch's defaults (its threads, glibc's
malloc). In one process the two thread pools and allocators disturbed each other: torch's steps
slowed by an order of magnitude on a loaded machine (docs/performance.md). The processes take turns
in blocks of --steps steps (--rounds rounds), one idle while the other runs, so that a machine whose
speed drifts slows both alike. Printed per measure: the median wall time per step, its speed ratio
torch / flaxgpt (above 1: flaxgpt faster; the median and range of the rounds' ratios), and the
median process CPU time per step (all threads; on a machine shared with other work the CPU time
moves less than the wall time). Measures: the whole optimizer step, forward + backward, and forward
alone (eval mode, no gradients); --components times the first block and its parts instead (forward
+ backward into the params and the input).
"""

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
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


SYSTEMS = ("flaxgpt", "torch")


def component_measures(system: str, config: GPTConfig, params, batch: int, torch_model=None,
                       options=None) -> dict:
    """The first block and its parts, forward + backward on a random [B, T, C] input against a
    random cotangent, in `system`: {part: fn}. flaxgpt's parts are jitted with the train step's
    compiler `options`; torch's are torch_model's modules."""
    from flaxgpt import model as model_lib
    from flaxgpt.layer_stacking import convert_layers

    x_np, g_np = np.random.default_rng(0).standard_normal(
        (2, batch, config.block_size, config.n_embd), np.float32)
    # block and attention also return their cache
    first = lambda y: y[0] if isinstance(y, tuple) else y
    if system == "torch":
        import torch
        tx, tg = torch.from_numpy(x_np).requires_grad_(True), torch.from_numpy(g_np)
        block = torch_model.transformer.h[0]

        def torch_grad(module):
            module.zero_grad(set_to_none=True)
            tx.grad = None
            first(module(tx)).backward(tg)

        return {part: lambda module=module: torch_grad(module) for part, module in
                (("block", block), ("attention", block.attn), ("MLP", block.mlp),
                 ("LayerNorm", block.ln_1))}
    import jax.numpy as jnp
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)
    h_0 = convert_layers(params, scan_layers=False)["h_0"]  # also when the config scans
    parts = {"block": (model_lib.Block(config), h_0),
             "attention": (model_lib.CausalSelfAttention(config), h_0["attn"]),
             "MLP": (model_lib.MLP(config), h_0["mlp"]),
             "LayerNorm": (model_lib.layer_norm(config, "ln_1"), h_0["ln_1"])}
    measures = {}
    for part, (module, part_params) in parts.items():
        loss = lambda p, xs, cotangent, module=module: jnp.vdot(
            first(module.apply({"params": p}, xs)), cotangent)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
        measures[part] = lambda grad=grad, p=part_params: jax.block_until_ready(grad(p, x, g))
    return measures


def flaxgpt_system(config, model: GPTConfig, x_np, y_np, components: bool):
    """-> ({measure: fn}, the loss of the batch x_np, y_np [B, T]), as train() steps on CPUs."""
    host_memory.keep_freed_memory()  # as train() does on CPUs
    train_step, state = make_train_step(config, model)
    x, y = (jax.device_put(a[None], train_step.batch_sharding) for a in (x_np, y_np))
    options = xla_options.compiler_options(jax.devices()[0].platform)  # as the train step compiles
    loss_fn = jax.jit(lambda p, xb, yb: train_step.loss_fn(p, xb, yb), compiler_options=options)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, xb, yb: train_step.loss_fn(p, xb, yb)),
                      compiler_options=options)
    params = jax.device_put(jax.device_get(state.params))
    loss = float(loss_fn(params, x[0], y[0]))
    if components:
        return component_measures("flaxgpt", model, params, x_np.shape[0], options=options), loss
    jax_state = [state]

    def step():
        jax_state[0], metrics = train_step.train_fn(jax_state[0], x, y)
        jax.block_until_ready(metrics)

    return {"train step": step,
            "forward + backward": lambda: jax.block_until_ready(grad_fn(params, x[0], y[0])),
            "forward": lambda: jax.block_until_ready(loss_fn(params, x[0], y[0]))}, loss


def make_train_step(config, model: GPTConfig):
    """-> (flaxgpt's TrainStep for `model` on one CPU device, its initial state)."""
    train_step = TrainStep(model, optim.make_optimizer(config),
                           sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=config.seed)
    return train_step, train_step.init(jax.random.key(config.seed))


def torch_system(config, model: GPTConfig, x_np, y_np, components: bool):
    """-> ({measure: fn}, the loss of the batch): nanoGPT's step with flaxgpt's initial weights."""
    import torch
    host_params = jax.device_get(make_train_step(config, model)[1].params)
    tmodel = torch_gpt(model, host_params)
    topt = torch_optimizer(tmodel, config)
    tx, ty = torch.from_numpy(x_np.astype(np.int64)), torch.from_numpy(y_np.astype(np.int64))
    with torch.no_grad():
        loss = float(tmodel(tx, ty))
    if components:
        return component_measures("torch", model, host_params, x_np.shape[0], tmodel), loss

    def step():
        topt.zero_grad(set_to_none=True)
        tmodel(tx, ty).backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), config.grad_clip)
        topt.step()

    def forward_backward():
        tmodel.zero_grad(set_to_none=True)
        tmodel(tx, ty).backward()

    def forward():
        with torch.no_grad():
            tmodel(tx, ty)

    return {"train step": step, "forward + backward": forward_backward, "forward": forward}, loss


def worker(system: str, config, model: GPTConfig, x_np, y_np, components: bool) -> None:
    """One system's process: sets up, says {"loss", "about"} on stdout, warms each measure up
    (3 calls), then answers each line "steps measure" on stdin with {"wall", "cpu"}: seconds per
    call over `steps` calls back to back; at the end of stdin, {"peak_rss_mb"}."""
    build = flaxgpt_system if system == "flaxgpt" else torch_system
    measures, loss = build(config, model, x_np, y_np, components)
    if system == "torch":
        import torch
        about = f"torch {torch.__version__} on {torch.get_num_threads()} threads"
    else:
        about = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
    answer = lambda **kw: print(json.dumps(kw), flush=True)
    answer(loss=loss, about=about, measures=list(measures))
    for fn in measures.values():
        for _ in range(3):
            fn()
    answer(ready=True)
    for line in sys.stdin:
        steps, measure = line.rstrip("\n").split(" ", 1)
        fn, steps = measures[measure], int(steps)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        answer(wall=(time.perf_counter() - wall) / steps, cpu=(time.process_time() - cpu) / steps)
    answer(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class Worker:
    """A worker process of one system: ask(line) -> its answer."""

    def __init__(self, system: str, argv: list[str]):
        self.system = system
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", system, *argv[1:]], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"bench_vs_torch.py: the {self.system} worker ended without an answer")
        return json.loads(line)

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.answer()

    def finish(self) -> dict:
        self.process.stdin.close()
        answer = self.answer()
        self.process.wait()
        return answer


def compare(workers: dict, measures: list[str], steps: int, rounds: int) -> dict:
    """{system: Worker} -> {measure: {system: {"wall": [...], "cpu": [...]}}}: seconds per call of
    each round; every round times each measure of each system in turn, a block of `steps` calls."""
    times = {m: {name: {"wall": [], "cpu": []} for name in workers} for m in measures}
    for _ in range(rounds):
        for measure in measures:
            for name, w in workers.items():
                answer = w.ask(f"{steps} {measure}")
                for kind in ("wall", "cpu"):
                    times[measure][name][kind].append(answer[kind])
    return times


def print_ratios(times: dict) -> dict[str, float]:
    """Print each measure's line -> {measure: median speed ratio torch / flaxgpt} (both run)."""
    speeds = {}
    for measure, systems in times.items():
        ms = lambda name, kind: statistics.median(systems[name][kind]) * 1e3
        line = "  ".join(f"{name} {ms(name, 'wall'):7.2f} ms" for name in systems)
        if len(systems) == 2:
            ratios = [t / f for f, t in zip(systems["flaxgpt"]["wall"], systems["torch"]["wall"])]
            speeds[measure] = statistics.median(ratios)
            line += (f"  speed torch/flaxgpt {speeds[measure]:.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f})")
        cpu = ", ".join(f"{name} {ms(name, 'cpu'):.2f}" for name in systems)
        print(f"{measure:>20}: {line}  [CPU ms: {cpu}]")
    return speeds


def main(argv) -> dict[str, float]:
    """-> {measure: flaxgpt's speed / torch's}, when both systems ran."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=7,
                   help="alternating blocks per system and measure")
    p.add_argument("--system", choices=("both", "jax", "torch"), default="both")
    p.add_argument("--vocab_size", type=int, default=None, help="default: the prepared dataset's")
    p.add_argument("--components", action="store_true",
                   help="time the first block and its parts instead")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)  # one system's process
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
    if args.worker:
        return worker(args.worker, config, model, tokens[:, :-1], tokens[:, 1:], args.components)
    names = {"both": SYSTEMS, "jax": ("flaxgpt",), "torch": ("torch",)}[args.system]
    workers = {name: Worker(name, argv) for name in names}
    setup = {name: w.answer() for name, w in workers.items()}
    if len(workers) == 2:
        losses = {name: s["loss"] for name, s in setup.items()}
        if not math.isclose(losses["torch"], losses["flaxgpt"], rel_tol=1e-4):
            sys.exit(f"the two models disagree: loss {losses['flaxgpt']} (flaxgpt) "
                     f"vs {losses['torch']} (torch)")
        print(f"same loss on one batch: flaxgpt {losses['flaxgpt']:.6f}, "
              f"torch {losses['torch']:.6f}")
    for w in workers.values():
        w.answer()  # warmed up
    print("; ".join(s["about"] for s in setup.values()))
    print(f"model {model.n_layer} layers x {model.n_embd} wide, {model.n_head} heads, vocab "
          f"{model.vocab_size}, bias {model.bias}, "
          f"gelu {'tanh' if model.gelu_approximate else 'erf'}; batch {B} x {T}; each system in "
          f"its own process, {args.rounds} rounds of {args.steps} steps in turns, medians",
          flush=True)
    if args.components:
        print("forward + backward (params and input gradients) of the first block and its parts:")
    measures = next(iter(setup.values()))["measures"]
    speeds = print_ratios(compare(workers, measures, args.steps, args.rounds))
    for name, w in workers.items():
        print(f"peak RSS of the {name} process: {w.finish()['peak_rss_mb']:.0f} MB")
    return speeds


if __name__ == "__main__":
    main(sys.argv)
