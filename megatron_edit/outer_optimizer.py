"""The outer optimizer of Local SGD: one in-place step on flat fp32 tensors.

SPEC 2.1 (DiLoCo, arXiv 2311.08105, Algorithm 1; EDiT, arXiv 2412.07210, Algorithm 1): every worker
trains on its own for H inner steps, then the workers agree on a pseudo-gradient
``pseudo_grad = anchor - theta`` (averaged or penalised across workers, see ``pseudo_grad_penalty``)
and the anchor (the last globally agreed parameters) takes one outer step with it.

This module is pure math on local tensors: no process group, no host synchronisation. The distributed
wrappers call :func:`outer_step` on each shard of the outer state (sharded exactly like the
distributed optimizer's fp32 main params) after the pseudo-gradient has been reduced across workers.
"""
from __future__ import annotations

import torch
from torch import Tensor

OUTER_METHODS: tuple[str, ...] = ("nesterov", "sgd", "average")
"""Values of ``--outer-optimizer``."""


def outer_step(
    anchor: Tensor,
    outer_momentum: Tensor | None,
    pseudo_grad: Tensor,
    method: str,
    lr: float,
    momentum_coef: float,
    skip: Tensor | None = None,
    pseudo_grad_is_scratch: bool = False,
) -> None:
    """Apply one outer step to ``anchor`` (and ``outer_momentum``) in place.

    Semantics are those of ``torch.optim.SGD`` with ``dampening=0`` and ``weight_decay=0``, with the
    pseudo-gradient in the role of ``.grad`` (same operations in the same order, so the result is
    bit-identical to torch's single-tensor SGD):

    - ``"nesterov"`` (DiLoCo / EDiT default): ``m = mu*m + g``; ``anchor -= lr * (g + mu*m)``.
    - ``"sgd"``: plain momentum SGD, ``m = mu*m + g``; ``anchor -= lr * m``. With ``mu == 0`` no
      momentum buffer is needed (``outer_momentum`` may be None) and this is ``anchor -= lr * g``.
    - ``"average"``: plain model averaging, ``anchor -= g``. With ``g = mean_w(anchor - theta_w)`` the
      anchor becomes ``mean_w theta_w``; ``lr``, ``momentum_coef`` and ``outer_momentum`` are ignored.

    torch initialises its momentum buffer to a copy of the first gradient; ``mu*0 + g`` is exactly
    ``g``, so callers initialise ``outer_momentum`` with zeros.

    Args:
        anchor: fp32, the last globally agreed parameters (one shard, any shape), updated in place.
        outer_momentum: fp32, same shape as ``anchor``, updated in place; required for ``nesterov``
            and ``sgd`` unless ``momentum_coef == 0``.
        pseudo_grad: fp32, same shape as ``anchor``: the (combined) pseudo-gradient.
        method: one of :data:`OUTER_METHODS`.
        lr: outer learning rate (``--outer-lr``).
        momentum_coef: outer momentum ``mu`` (``--outer-momentum``).
        skip: optional bool tensor broadcastable to ``pseudo_grad``; where True, ``anchor`` and
            ``outer_momentum`` are left exactly unchanged. This is how a layer whose workers were all
            anomalous skips its outer step (SPEC 2.2) without a host synchronisation: the caller
            expands the per-layer ``skip`` of ``penalty_weights`` to the shard's elements. Non-skipped
            elements get bit-identical results to the ``skip=None`` path. Costs two temporaries the
            size of the shard.
        pseudo_grad_is_scratch: the caller's ``pseudo_grad`` may be overwritten (it holds the Nesterov
            update afterwards), so the step allocates nothing the size of the shard; the same operations
            on the same values as without it, so the results are bit-identical. Ignored with ``skip``.
    """
    _check_args(anchor, outer_momentum, pseudo_grad, method, lr, momentum_coef, skip)
    if method == "average":
        if skip is None:
            anchor.sub_(pseudo_grad)
        else:
            anchor.copy_(torch.where(skip, anchor, anchor.sub(pseudo_grad)))
        return

    if momentum_coef == 0.0 and outer_momentum is None:
        # Momentum-free SGD (torch skips the buffer when momentum == 0).
        if skip is None:
            anchor.add_(pseudo_grad, alpha=-lr)
        else:
            anchor.copy_(torch.where(skip, anchor, anchor.add(pseudo_grad, alpha=-lr)))
        return

    assert outer_momentum is not None  # checked in _check_args
    if skip is None:
        outer_momentum.mul_(momentum_coef).add_(pseudo_grad)
        if method == "nesterov":
            if pseudo_grad_is_scratch:
                update = pseudo_grad.add_(outer_momentum, alpha=momentum_coef)
            else:
                update = pseudo_grad.add(outer_momentum, alpha=momentum_coef)
        else:
            update = outer_momentum
        anchor.add_(update, alpha=-lr)
        return

    new_momentum = outer_momentum.mul(momentum_coef).add_(pseudo_grad)
    update = pseudo_grad.add(new_momentum, alpha=momentum_coef) if method == "nesterov" else new_momentum
    new_anchor = anchor.add(update, alpha=-lr)
    del update
    outer_momentum.copy_(torch.where(skip, outer_momentum, new_momentum))
    del new_momentum
    anchor.copy_(torch.where(skip, anchor, new_anchor))


def needs_outer_momentum(method: str, momentum_coef: float) -> bool:
    """Whether ``method`` keeps an outer momentum buffer (so the caller allocates and checkpoints it)."""
    if method not in OUTER_METHODS:
        raise ValueError(f"--outer-optimizer {method} is not one of {', '.join(OUTER_METHODS)}")
    return method != "average" and momentum_coef != 0.0


def _check_args(
    anchor: Tensor,
    outer_momentum: Tensor | None,
    pseudo_grad: Tensor,
    method: str,
    lr: float,
    momentum_coef: float,
    skip: Tensor | None,
) -> None:
    """Shape/dtype/option checks: Python metadata only, never tensor values (no host sync)."""
    if method not in OUTER_METHODS:
        raise ValueError(f"--outer-optimizer {method} is not one of {', '.join(OUTER_METHODS)}")
    if method != "average":
        if not lr > 0.0:
            raise ValueError(f"--outer-lr {lr} must be > 0")
        if not 0.0 <= momentum_coef < 1.0:
            raise ValueError(f"--outer-momentum {momentum_coef} must be in [0, 1)")
        if momentum_coef != 0.0 and outer_momentum is None:
            raise ValueError(f"outer_step: --outer-optimizer {method} with momentum {momentum_coef} needs outer_momentum")
    for name, tensor in (("anchor", anchor), ("pseudo_grad", pseudo_grad), ("outer_momentum", outer_momentum)):
        if tensor is None:
            continue
        if tensor.dtype != torch.float32:
            raise ValueError(f"outer_step: {name} must be float32, got {tensor.dtype}")
        if tensor.shape != anchor.shape:
            raise ValueError(f"outer_step: {name} shape {tuple(tensor.shape)} != anchor shape {tuple(anchor.shape)}")
    if skip is not None and skip.dtype != torch.bool:
        raise ValueError(f"outer_step: skip must be a bool tensor, got {skip.dtype}")
