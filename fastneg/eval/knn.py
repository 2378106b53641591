"""Weighted kNN classifier on frozen features (Wu et al. 2018, "InstDisc"): needs no training.

Cosine similarity to every training feature; the k nearest vote for their class with weight
exp(similarity / temperature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                query_features: torch.Tensor, *, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """int64 [Q] predicted class ids of the query features."""
    if train_features.ndim != 2 or query_features.ndim != 2 \
            or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"features must be [N, F] and [Q, F]; got "
                         f"{tuple(train_features.shape)} and {tuple(query_features.shape)}")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0; got k={k}, "
                         f"temperature={temperature}")
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    preds = []
    for start in range(0, len(query_features), chunk):   # chunks bound the [Q, N] memory
        q = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
