"""nanoGPT's optimizer in optax: AdamW, linear warmup + cosine decay, decay on matrices only,
clipping."""

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """nanoGPT's get_lr: linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters,
    then flat. nanoGPT's warmup is lr * (it + 1) / (warmup_iters + 1): optax's linear warmup from
    lr / (warmup_iters + 1) gives exactly that."""
    if not config.decay_lr:
        return optax.constant_schedule(config.learning_rate)
    warmup = max(config.warmup_iters, 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.learning_rate / (warmup + 1), peak_value=config.learning_rate,
        warmup_steps=warmup, decay_steps=max(config.lr_decay_iters, warmup + 1),
        end_value=config.min_lr)


def decay_mask(params):
    """True for the weights that get weight decay: matmul kernels and embeddings, not biases or
    LayerNorms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule above (grad_clip 0 disables clipping)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=1e-8,
                        weight_decay=config.weight_decay, mask=decay_mask)
    # The same state structure with clipping on or off, so a run can resume with another grad_clip.
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
