"""Framework-free training: the state (nets, optimizers, schedulers), one step, one epoch, state round trip.

The release trains the backbone and the CPN with two optimizers and two backward passes whose graphs share no
parameters (the CPN sees detached encoder features; the backbone loss uses the compensation maps as
constants). We keep exactly that. The impaired pass only needs SSO features of the visible encoder (the IR
encoder's input is unchanged, so its SSO features equal the main pass's), so it runs one encoder, without
gradients.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from cs2fusion.config import ModelParams, TrainParams
from cs2fusion.losses import backbone_loss, contrastive_loss
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.model.backbone import BackboneOutput, EncoderFeatures
from cs2fusion.model.cpn import CPNOutput, sso_features
from cs2fusion.span import LOCAL, BatchSpan

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainState:
    """Nets and optimisation state. ``*_train`` are what the step calls (e.g. DDP-wrapped); default: the nets.
    ``span``: the ranks whose batches form the global batch (:mod:`cs2fusion.span`)."""

    backbone: Backbone
    cpn: CompensationPerceptionNetwork
    opt_backbone: torch.optim.Optimizer
    opt_cpn: torch.optim.Optimizer
    sched_backbone: torch.optim.lr_scheduler.MultiStepLR
    sched_cpn: torch.optim.lr_scheduler.MultiStepLR
    epoch: int = 0
    step: int = 0
    backbone_train: nn.Module | None = None
    cpn_train: nn.Module | None = None
    # the global batch a step's batch is part of (data-parallel ranks); the step is that of one process on all of it
    span: BatchSpan = LOCAL

    def __post_init__(self) -> None:
        self.backbone_train = self.backbone_train or self.backbone
        self.cpn_train = self.cpn_train or self.cpn


def build_state(model: ModelParams, train: TrainParams, *, backbone: Backbone | None = None,
                cpn: CompensationPerceptionNetwork | None = None) -> TrainState:
    """Fresh nets (or the given ones) with the release's Adam + MultiStep schedule."""
    backbone = backbone or Backbone(model)
    cpn = cpn or CompensationPerceptionNetwork(model)
    betas = tuple(train.betas)
    opt_b = torch.optim.Adam(backbone.parameters(), lr=train.lr_backbone, betas=betas)
    opt_c = torch.optim.Adam(cpn.parameters(), lr=train.lr_cpn, betas=betas)
    milestones = list(train.milestones)
    return TrainState(
        backbone, cpn, opt_b, opt_c,
        torch.optim.lr_scheduler.MultiStepLR(opt_b, milestones, gamma=train.gamma),
        torch.optim.lr_scheduler.MultiStepLR(opt_c, milestones, gamma=train.gamma),
    )


def _by_modality(losses: dict[str, float], slot1_is_vis: bool) -> dict[str, float]:
    """The loss functions name terms by CPN slot (slot 1 = ``ir``); the logged names say the modality."""
    if not slot1_is_vis:
        return losses
    swap = {"_ir": "_vis", "_vis": "_ir"}
    return {next((k[: -len(a)] + b for a, b in swap.items() if k.endswith(a)), k): v for k, v in losses.items()}


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether bf16 products run in hardware here (CUDA Ampere+; CPU: oneDNN with AVX-512 BF16 or AMX). Without it,
    oneDNN emulates bf16 convolutions: measured ~20× slower than fp32 on an AVX2-only EPYC."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def step_precision(train: TrainParams, device_type: str) -> str:
    """The precision the step runs in: ``train.precision``, except bf16 without hardware support runs fp32
    (logged once), because emulated bf16 is far slower than fp32."""
    if train.precision == "bf16" and not bf16_native(device_type):
        _warn_once(f"train.precision bf16: no native bf16 on this {device_type}; training in fp32")
        return "fp32"
    return train.precision


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _forward_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpn_input_order(train: TrainParams) -> list[str]:
    """What the CPN's two input slots held while training (checkpoint metadata: the CPN's weights mean this)."""
    order = ["infrared features", "visible features"]
    return order[::-1] if train.step_order == "literal" else order


def cpn_slots(out: BackboneOutput, step_order: str) -> tuple[EncoderFeatures, EncoderFeatures]:
    """The encoder features in the CPN's two input slots under ``step_order`` (slot 1 gets the map m)."""
    return (out.vis, out.ir) if step_order == "literal" else (out.ir, out.vis)


def map_stats(backbone: Backbone, cpn: CompensationPerceptionNetwork, *, ir: torch.Tensor, vis_y: torch.Tensor,
              step_order: str) -> dict[str, float]:
    """Mean of the CPN's map m (the weight of slot 1's intensity term), its share of pixels above 0.9 and its std, on
    (N, 1, H, W) inputs in [0, 1]: the map saturating towards 1 is what precedes a fused image that copies slot 1's
    source; the std says how far it selects (docs/research/recipe.md; the published weights: 0.48, 0.14 and 0.35 on
    RoadScene crops, a two-level map under ``robust`` 0.25)."""
    with torch.no_grad():
        slot1, slot2 = cpn_slots(backbone(vis_y=vis_y, ir=ir), step_order)
        m = cpn(ir=slot1, vis=slot2).w_ir
    return {"map_mean": float(m.mean()), "map_high": float((m > 0.9).float().mean()), "map_std": float(m.std())}


def train_step(state: TrainState, batch: Batch, train: TrainParams) -> dict[str, float]:
    """One optimisation step of both nets on (ir, vis_y, vis_y_impaired), each (N, 1, H, W) in [0, 1].

    ``train.step_order`` picks which source the CPN's first slot (the map m, and the impaired view's contrast)
    goes with: ``roles``: infrared (the release's modality roles); ``literal``: visible (the release's step read
    with the visible image first, which the published CPN fits). Both reproduce the release's golden step.
    ``train.precision`` bf16 runs the forward passes under autocast (where the hardware has bf16); the losses and
    the optimizers stay fp32. ``train.fast_losses``: Gram-matrix similarities (:func:`cs2fusion.losses.cosine_matrix`).
    Data-parallel (``state.span`` of N ranks, nets DDP-wrapped, this rank's part of the global batch): every term that
    spans the batch spans the global batch, each rank backpropagates N × its share of each loss (DDP averages the
    gradients), and the returned terms are the global batch's: the step and its numbers are one process's.
    """
    ir, vis, vis_imp = batch
    literal, span = train.step_order == "literal", state.span
    state.backbone_train.train()
    state.cpn_train.train()
    with _forward_context(step_precision(train, ir.device.type), ir.device.type):
        out = state.backbone_train(vis_y=vis, ir=ir)
        slot1, slot2 = cpn_slots(out, train.step_order)
        main = state.cpn_train(ir=slot1, vis=slot2, span=span)
        with torch.no_grad():
            imp_vis = state.backbone.encoder_vis(vis_imp * state.backbone.params.input_scale)
            imp_sso_vis = sso_features(imp_vis, state.cpn.params.norm_scope, span)
    # losses (norms, SSIM, similarity matrices) in fp32 (or the nets' fp64) whatever the forward ran in
    fused, main, imp_sso_vis = _wide(out.fused), CPNOutput(*map(_wide, main)), _wide(imp_sso_vis)

    src1, src2 = (vis, ir) if literal else (ir, vis)
    lb = backbone_loss(fused, ir=src1, vis_y=src2, w_ir=main.w_ir, w_vis=main.w_vis,
                       scale=state.backbone.params.input_scale, intensity=train.loss.intensity,
                       ssim_weight=train.loss.ssim_weight, max_weight=train.loss.max_weight,
                       grad_weight=train.loss.grad_weight, contrast_weight=train.loss.contrast_weight,
                       contrast_window=train.loss.contrast_window, target_gain=train.loss.target_gain, span=span)
    state.opt_backbone.zero_grad(set_to_none=True)
    _backward(lb["backbone"], span)
    state.opt_backbone.step()

    # the impaired pass replaces the visible input; the infrared features are the main pass's
    imp1, imp2 = (imp_sso_vis, main.sso_vis) if literal else (main.sso_ir, imp_sso_vis)
    lc = contrastive_loss(main, impaired_sso_ir=imp1, impaired_sso_vis=imp2, alpha=train.loss.alpha,
                          impaired_weight=train.loss.impaired_weight, gram=train.fast_losses, span=span)
    state.opt_cpn.zero_grad(set_to_none=True)
    _backward(lc["cpn"], span)
    state.opt_cpn.step()
    state.step += 1
    return {f"loss/{k}": v for k, v in _by_modality(span.totals({**lb, **lc}), literal).items()}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 as it is (an autocast forward's bf16 outputs are widened for the losses)."""
    return t if t.dtype == torch.float64 else t.float()


def _backward(share: torch.Tensor, span: BatchSpan) -> None:
    """Backpropagates world × this rank's share of a loss: after DDP's averaging, the global loss's gradient."""
    (share if span.local else share * span.world).backward()


def run_epoch(state: TrainState, batches: Iterable[Batch], train: TrainParams, *, steps: int,
              device: torch.device | str = "cpu",
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """``steps`` steps over ``batches`` (every rank runs the same count); returns epoch means and throughput."""
    sums: dict[str, float] = collections.defaultdict(float)
    samples, done = 0, 0
    data_time, start = 0.0, time.perf_counter()
    batches = iter(batches)
    while done < steps:
        t0 = time.perf_counter()
        try:
            _, ir, vis, vis_imp = next(batches)
        except StopIteration:
            raise RuntimeError(f"data ran out after {done} of {steps} steps") from None
        data_time += time.perf_counter() - t0
        batch = tuple(t.to(device, non_blocking=True) for t in (ir, vis, vis_imp))
        metrics = train_step(state, batch, train)
        samples += ir.shape[0]
        done += 1
        for k, v in metrics.items():
            sums[k] += v
        if on_step:
            on_step(state.step, metrics)
    elapsed = time.perf_counter() - start
    state.sched_backbone.step()
    state.sched_cpn.step()
    state.epoch += 1
    means = {k: v / max(done, 1) for k, v in sums.items()}
    means.update({"perf/samples_per_s": samples / elapsed, "perf/data_fraction": data_time / elapsed})
    return means


def lrs(state: TrainState) -> dict[str, float]:
    """Current learning rates of both optimizers."""
    return {"lr/backbone": state.opt_backbone.param_groups[0]["lr"], "lr/cpn": state.opt_cpn.param_groups[0]["lr"]}


def optim_state(state: TrainState) -> dict[str, Any]:
    """Optimizer / scheduler / counters / RNG state: plain containers of tensors, safe for ``weights_only``."""
    def sched(s: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
        d = dict(s.state_dict())
        d["milestones"] = dict(d["milestones"])
        return d

    return {
        "opt_backbone": state.opt_backbone.state_dict(),
        "opt_cpn": state.opt_cpn.state_dict(),
        "sched_backbone": sched(state.sched_backbone),
        "sched_cpn": sched(state.sched_cpn),
        "epoch": state.epoch,
        "step": state.step,
        "torch_rng": torch.get_rng_state(),
    }


def load_optim_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Inverse of :func:`optim_state` (the nets' weights are restored separately)."""
    state.opt_backbone.load_state_dict(saved["opt_backbone"])
    state.opt_cpn.load_state_dict(saved["opt_cpn"])
    for sched, key in ((state.sched_backbone, "sched_backbone"), (state.sched_cpn, "sched_cpn")):
        d = dict(saved[key])
        d["milestones"] = collections.Counter(d["milestones"])
        sched.load_state_dict(d)
    state.epoch, state.step = int(saved["epoch"]), int(saved["step"])
    torch.set_rng_state(saved["torch_rng"])
