"""The optimiser of the paper: AdamW, linear warm-up, cosine decay, global-norm clipping.

Schedule (Borgeaud et al. 2021, section 4 / appendix): the learning rate rises linearly from
`train.warmup_init_lr` (1e-7) at step 0 to `train.learning_rate` at step `train.warmup_steps`
(750), then follows a cosine down to `train.min_lr_ratio` (0.1) x the maximum at step
`train.num_steps`, and stays there.

Weight decay (`train.weight_decay`, 0.1 in the paper) applies to every parameter with two or more
dimensions per layer (a `model.scan_layers` stack of vectors `[R, d]` is not a matrix): all
weight matrices, including the token embedding and the output projection, but not norm scales
or biases (vectors). This is the common GPT/Chinchilla practice; the paper only
states "weight decay 0.1".

Retrofitting freezes parameters by not giving them to the optimiser at all (the train state
holds them apart, see `retro_jax.train.state`), so the optimiser never sees a frozen parameter
and keeps no moments for it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from retro_jax.models.scan_layers import stacked_axes


def learning_rate_schedule(
    *,
    peak_lr: float,
    num_steps: int,
    warmup_steps: int,
    warmup_init_lr: float,
    min_lr_ratio: float,
) -> optax.Schedule:
    """lr(step): linear warm-up, then cosine to `min_lr_ratio * peak_lr` at `num_steps`.

    lr(0) = warmup_init_lr, lr(warmup_steps) = peak_lr, lr(num_steps) = min_lr_ratio * peak_lr;
    constant after `num_steps`. With `num_steps <= warmup_steps` the run only warms up.
    """
    end_lr = min_lr_ratio * peak_lr
    decay_steps = max(num_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps > 0:
            warm = warmup_init_lr + (peak_lr - warmup_init_lr) * step / warmup_steps
        else:
            warm = jnp.asarray(peak_lr, jnp.float32)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def schedule_from_config(train_cfg) -> optax.Schedule:
    """The schedule of a validated `config.train`."""
    return learning_rate_schedule(
        peak_lr=float(train_cfg.learning_rate),
        num_steps=int(train_cfg.num_steps),
        warmup_steps=int(train_cfg.warmup_steps),
        warmup_init_lr=float(train_cfg.warmup_init_lr),
        min_lr_ratio=float(train_cfg.min_lr_ratio),
    )


def decay_mask(params):
    """True for parameters that get weight decay: matrices, i.e. arrays with ndim >= 2 not
    counting the leading layers axis of a scanned model's stacked parameters
    (`model.scan_layers`: a stack of norm scales `[R, d]` is R vectors, not a matrix)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) - stacked_axes(path) >= 2, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW + global-norm clipping (`train.grad_clip`, 0 = off) from `config.train`."""
    parts = []
    if float(train_cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(
        optax.adamw(
            learning_rate=schedule_from_config(train_cfg),
            b1=float(train_cfg.adam_b1),
            b2=float(train_cfg.adam_b2),
            eps=float(train_cfg.adam_eps),
            weight_decay=float(train_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
