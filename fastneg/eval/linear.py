"""Linear probe on frozen, cached features: full-batch L-BFGS on standardized features.

The paper trains its probe with SGD for 60 epochs over images; here the features are computed
once, so the probe is a convex problem over a small matrix and full-batch L-BFGS solves it in
about a second on a CPU, with no learning rate or schedule to tune.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    mean: torch.Tensor     # [F] standardization fitted on the training features
    std: torch.Tensor      # [F]
    weight: torch.Tensor   # [C, F]
    bias: torch.Tensor     # [C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """int64 [N] predicted class ids."""
        return self.logits(features).argmax(1)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                       weight_decay: float = 1e-3, max_iter: int = 300) -> LinearProbe:
    """Multinomial logistic regression (cross entropy + weight_decay * ||W||^2 / 2)."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [N, F] with N = len(labels); got "
                         f"{tuple(features.shape)} and {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("cannot train a linear probe on an empty training split")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
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
