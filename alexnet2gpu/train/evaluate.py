"""Scoring a model on a dataset: loss and top-1 / top-5 error, centre crop or the ten crops of P 4.1.

One scorer (`log_probabilities`) serves evaluation, predict, Figure 4 and TensorBoard's panel."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from alexnet2gpu.data.datasets import batches
from alexnet2gpu.data.sampling import part
from alexnet2gpu.data.transforms import Pipeline
from alexnet2gpu.progress import progress_bar
from alexnet2gpu.train.errors import EvaluationError
from alexnet2gpu.train.placement import Placement


def input_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(model: nn.Module, amp: str) -> contextlib.ExitStack:
    """bfloat16 autocast on every device type the model spans (a no-op for amp="none")."""
    stack = contextlib.ExitStack()
    if amp == "bf16":
        for kind in sorted({p.device.type for p in model.parameters()}):
            stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
    return stack


def topk_errors(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """(len(ks),) counts of images whose label is not among the top-k scores, on the scores' device
    (reading them is left to the caller: a read waits for the device)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    return torch.stack([(~hit[:, :k].any(1)).sum() for k in ks])


@torch.no_grad()
def log_probabilities(model: nn.Module, pipeline: Pipeline, images, *, ten_crop: bool = False) -> torch.Tensor:
    """(N, classes) log-softmax, on the model's device, of a batch of stored images: of the centre crop,
    or of the mean of the softmaxes over the ten patches (P 4.1). Evaluation, predict, Figure 4 and the
    TensorBoard panel all score with this."""
    if ten_crop:
        crops = pipeline.ten_crops(images)  # (N, 10, C, 224, 224)
        log_probs = F.log_softmax(model(crops.flatten(0, 1)).float(), dim=1)  # (N * 10, classes)
        # log of the mean of the ten softmaxes, without underflow
        return log_probs.view(len(images), 10, -1).logsumexp(1) - math.log(10)  # (N, classes)
    return F.log_softmax(model(pipeline(images)).float(), dim=1)


@torch.no_grad()
def top_classes(model: nn.Module, pipeline: Pipeline, images, k: int = 5, *, ten_crop: bool = False):
    """(probabilities, classes), each (N, k) on the CPU, most probable first."""
    model.eval()
    probs = log_probabilities(model, pipeline, images, ten_crop=ten_crop).exp()  # (N, classes)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return top.values.cpu(), top.indices.cpu()


def evaluate(
    model: nn.Module,
    dataset,
    pipeline: Pipeline,
    *,
    batch_size: int = 128,
    ten_crop: bool = False,
    amp: str = "none",
    workers: int = 0,
    progress: bool = True,
    placement: Placement | None = None,
) -> dict[str, float]:
    """Loss and top-1 / top-5 error. With `ten_crop`, the softmax averaged over the paper's ten
    patches (P 4.1), computed in chunks of at most `batch_size` crops so memory stays bounded.
    With a `placement` of several replicas, each scores its share of the set and the sums are added."""
    placement = placement or Placement(())
    model.eval()
    n = len(dataset)
    mine = part(dataset, n * placement.replica // placement.replicas, n * (placement.replica + 1) // placement.replicas)
    chunk = max(1, batch_size // 10) if ten_crop else batch_size
    device = input_device(model)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 errors, top-5 errors, non-finite
    images = 0
    bar = progress_bar(total=len(mine), desc="evaluating", unit="img", leave=False, disable=not progress)
    for batch, labels in batches(mine, chunk, shuffle=False, workers=workers):
        labels = labels.to(device, non_blocking=True)
        with autocast(model, amp):
            log_probs = log_probabilities(model, pipeline, batch, ten_crop=ten_crop)  # (n, classes)
        probs = log_probs.exp()
        loss = F.nll_loss(log_probs, labels, reduction="sum")  # the cross-entropy itself, however small p is
        bad = (~torch.isfinite(probs)).any(1).sum()  # a softmax of finite logits never is NaN
        sums += torch.cat([loss[None], topk_errors(probs, labels), bad[None]]).double()  # stays on the device
        images += len(labels)
        bar.update(len(labels))
    bar.close()
    sums = torch.cat([sums.cpu(), torch.tensor([images], dtype=torch.float64)])  # the one wait on the device
    loss, top1, top5, bad, images = placement.sum_replicas(sums).tolist()  # every replica sees the same
    if not images:
        raise EvaluationError(f"no images to evaluate in {getattr(dataset, 'name', 'the validation set')}")
    if bad:
        raise EvaluationError(
            f"the model's outputs are NaN or inf for {int(bad)} of {int(images)} images: its weights hold NaN or "
            "inf, or its activations overflow; no error rate is reported"
        )
    top5_err = top5 / images if probs.shape[1] > 5 else None  # with 5 classes or fewer, always 0: not a number
    return {"loss": loss / images, "top1_err": top1 / images, "top5_err": top5_err, "images": int(images)}


def percent(error: float | None) -> str:
    """An error rate as a percentage, "n/a" where there is none (top-5 of 5 classes or fewer)."""
    return "n/a" if error is None else f"{error:.2%}"
