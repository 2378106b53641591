"""Linear probe on frozen, cached features: multinomial logistic regression on standardized
features, minimizing  mean cross entropy + weight_decay * ||W||^2 / 2.

The paper trains its probe with SGD for 60 epochs over images; here the features are computed
once, so the probe is a convex problem over a fixed matrix. Two solvers of the same objective:

- L-BFGS, full batch (train_linear_probe): about a second on a CPU for a few thousand rows, no
  learning rate or schedule to tune; it holds the float32 matrix and its standardized copy in
  memory, so it stops at tens of thousands of rows of 2,048 features.
- mini-batch Adam (train_linear_probe_sgd): standardization statistics in one streaming pass,
  then a fixed number of epochs of shuffled mini-batches gathered from memory-mapped shards
  (fastneg.eval.shards) onto the eval device; host memory is a few mini-batches whatever N
  (ImageNet-1k's 1.28M x 2,048 included).

fit_linear_probe picks L-BFGS while the matrix fits LBFGS_BUDGET bytes, mini-batches beyond.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastneg.eval.shards import FeatureShards, as_shards
from fastneg.progress import tqdm

PROBES = ("auto", "lbfgs", "sgd")
LBFGS_BUDGET = 256 << 20   # float32 bytes of features below which fit_linear_probe uses L-BFGS
EPOCHS = 100               # mini-batch probe defaults: chosen so that on the embedded dataset it
LR = 0.03                  # scores what L-BFGS scores (tests/test_probe.py)
BATCH_SIZE = 1024
MIN_STEPS_PER_EPOCH = 32   # small N: smaller batches rather than too few steps to converge
STEPS = 30_000             # large N: default epochs cut to about this many steps (ImageNet-1k: 24)
PREDICT_ROWS = 1 << 14


@dataclass
class LinearProbe:
    mean: torch.Tensor     # [F] standardization fitted on the training features
    std: torch.Tensor      # [F]
    weight: torch.Tensor   # [C, F]
    bias: torch.Tensor     # [C]
    method: str = "lbfgs"  # the solver that fitted it

    def logits(self, features) -> torch.Tensor:
        """float32 [N, C] logits of a [N, F] tensor or FeatureShards (read in blocks)."""
        if isinstance(features, FeatureShards):
            parts = [self.logits(torch.from_numpy(block))
                     for _, block in features.blocks(PREDICT_ROWS)]
            return torch.cat(parts) if parts else torch.zeros(0, len(self.bias))
        z = (features.float() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def predict(self, features) -> torch.Tensor:
        """int64 [N] predicted class ids of a [N, F] tensor or FeatureShards (in blocks)."""
        if isinstance(features, FeatureShards):
            preds = [self.logits(torch.from_numpy(block)).argmax(1)
                     for _, block in features.blocks(PREDICT_ROWS)]
            return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        return self.logits(features).argmax(1)


def _check_inputs(features, labels, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if len(features.shape) != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [N, F] with N = len(labels); got "
                         f"{tuple(features.shape)} and {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot train a linear probe on an empty training split")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                       weight_decay: float = 1e-3, max_iter: int = 300) -> LinearProbe:
    """Multinomial logistic regression (cross entropy + weight_decay * ||W||^2 / 2), full-batch
    L-BFGS on the whole [N, F] matrix in memory (a FeatureShards is loaded whole)."""
    if isinstance(features, FeatureShards):
        features = features.load()
    labels = _check_inputs(features, labels, num_classes)
    x = features.float()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)   # constant features stay finite
    z = (x - mean) / std
    w = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, w.detach(), b.detach())


def fit_linear_probe(features, labels, *, num_classes: int, probe: str = "auto",
                     device="cpu", weight_decay: float = 1e-3, budget: int = LBFGS_BUDGET,
                     **sgd_kwargs) -> LinearProbe:
    """The linear probe of a [N, F] tensor or FeatureShards: `probe` "lbfgs"
    (train_linear_probe, CPU), "sgd" (train_linear_probe_sgd on `device`) or "auto": L-BFGS
    while N * F float32 bytes fit `budget`, mini-batches beyond."""
    if probe not in PROBES:
        raise ValueError(f"--probe must be one of {', '.join(PROBES)}; got {probe!r}")
    n, dim = features.shape
    if probe == "lbfgs" or (probe == "auto" and n * dim * 4 <= budget):
        return train_linear_probe(features, labels, num_classes=num_classes,
                                  weight_decay=weight_decay)
    sgd_kwargs.setdefault("progress", True)   # minutes at ImageNet scale: show the steps
    return train_linear_probe_sgd(features, labels, num_classes=num_classes,
                                  weight_decay=weight_decay, device=device, **sgd_kwargs)


@torch.no_grad()
def feature_stats(features, *, device="cpu", rows: int = 8192
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [F] of a [N, F] tensor or FeatureShards in one pass of `rows`-row
    blocks, accumulated in float64 on `device` (Chan et al.'s pairwise merge of block means
    and squared deviations: no cancellation of a sum of squares). std is the population one,
    floored at 1e-6 so constant features stay finite."""
    src = as_shards(features)
    device = torch.device(device)
    count = 0
    mean = torch.zeros(src.dim, dtype=torch.float64, device=device)
    m2 = torch.zeros(src.dim, dtype=torch.float64, device=device)
    for _, block in src.blocks(rows):
        x = torch.from_numpy(block).to(device, torch.float64)
        k = len(x)
        if k == 0:
            continue
        bmean = x.mean(0)
        bm2 = ((x - bmean) ** 2).sum(0)
        delta = bmean - mean
        total = count + k
        mean += delta * (k / total)
        m2 += bm2 + delta ** 2 * (count * k / total)
        count = total
    std = (m2 / max(count, 1)).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _batches(src: FeatureShards, n: int, batch_size: int, gen: np.random.Generator):
    """Yield sorted int64 row positions of one epoch's mini-batches: a seeded permutation of all
    rows, cut into batches (a batch is a uniform sample of the whole split, even when the
    shards hold rows sorted by class, as ImageFolder listings are)."""
    order = gen.permutation(n)
    for start in range(0, n, batch_size):
        yield np.sort(order[start:start + batch_size])


def default_epochs(n: int, batch_size: int = BATCH_SIZE) -> int:
    """EPOCHS, cut for large N to the epochs that make about STEPS steps (at least one): on a
    convex problem the steps, not the passes, set how close the probe gets to the optimum,
    and ImageNet-1k has 1,252 steps an epoch against the embedded dataset's 32."""
    per_epoch = math.ceil(n / max(1, min(batch_size, math.ceil(n / MIN_STEPS_PER_EPOCH))))
    return max(1, min(EPOCHS, math.ceil(STEPS / per_epoch)))


def train_linear_probe_sgd(features, labels, *, num_classes: int, weight_decay: float = 1e-3,
                           epochs: int | None = None, batch_size: int = BATCH_SIZE,
                           lr: float = LR,
                           seed: int = 0, device="cpu", progress: bool = False) -> LinearProbe:
    """The objective of train_linear_probe, minimized by mini-batch Adam on `device`.

    `features`: a [N, F] tensor or FeatureShards (memory-mapped shards are read a mini-batch
    at a time). Standardization statistics come from one streaming pass; then `epochs`
    epochs of mini-batches (a permutation of the rows drawn from numpy's generator seeded
    with `seed` and the epoch: same seed, same probe) with a cosine learning-rate decay from
    `lr` to 0 over all steps. The weight decay is part of the gradient (not decoupled), so
    the fixed point is the L-BFGS optimum. The batch shrinks for small N so that an epoch
    has at least MIN_STEPS_PER_EPOCH steps. `epochs` None: default_epochs(N, batch).
    """
    src = as_shards(features)
    labels = _check_inputs(src, labels, num_classes)
    if epochs is None:
        epochs = default_epochs(len(src), batch_size)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"the mini-batch probe needs epochs >= 1, batch size >= 1 and lr > 0; "
                         f"got {epochs}, {batch_size}, {lr}")
    device = torch.device(device)
    n = len(src)
    batch_size = max(1, min(batch_size, math.ceil(n / MIN_STEPS_PER_EPOCH)))
    mean, std = feature_stats(src, device=device)
    y_all = labels.to(device)
    w = torch.zeros(num_classes, src.dim, device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    bar = tqdm(total=steps, desc="linear probe (mini-batch)", unit="step", disable=not progress)
    with torch.enable_grad():
        for epoch in range(epochs):
            gen = np.random.default_rng([seed, epoch])
            for idx in _batches(src, n, batch_size, gen):
                x = torch.from_numpy(src.rows(idx)).to(device, non_blocking=True)
                z = (x - mean) / std
                y = y_all[torch.from_numpy(idx).to(device)]
                loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return LinearProbe(mean.cpu(), std.cpu(), w.detach().cpu(), b.detach().cpu(), method="sgd")
