"""Weighted kNN classifier on frozen features (Wu et al. 2018, "InstDisc"): needs no training.

Cosine similarity to every training feature; the k nearest vote for their class with weight
exp(similarity / temperature).

knn_predict holds the whole bank in memory; knn_predict_chunked gives the same predictions with
the bank streamed block by block (from memory-mapped shards, fastneg.eval.shards) onto the eval
device and a running top-k per query merged across blocks, so a 1.28M-row bank is read once
per call and never held whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastneg.eval.shards import as_shards

QUERY_BUDGET = 512 << 20   # float32 bytes of normalized queries held at once on the device


def _check(train_shape, n_labels, query_shape, k, temperature):
    if len(train_shape) != 2 or len(query_shape) != 2 or train_shape[1] != query_shape[1]:
        raise ValueError(f"features must be [N, F] and [Q, F]; got "
                         f"{tuple(train_shape)} and {tuple(query_shape)}")
    if train_shape[0] != n_labels:
        raise ValueError(f"{train_shape[0]} training features but {n_labels} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0; got k={k}, "
                         f"temperature={temperature}")


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                query_features: torch.Tensor, *, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """int64 [Q] predicted class ids of the query features."""
    _check(train_features.shape, len(train_labels), query_features.shape, k, temperature)
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


@torch.no_grad()
def knn_predict_chunked(train_features, train_labels, query_features, *, num_classes: int,
                        k: int = 20, temperature: float = 0.07, device="cpu",
                        bank_chunk: int = 32768, query_chunk: int = 1024,
                        query_budget: int = QUERY_BUDGET) -> torch.Tensor:
    """knn_predict's predictions (int64 [Q], on the CPU) for banks of any size.

    `train_features`, `query_features`: [N, F] / [Q, F] tensors or FeatureShards. The queries
    are normalized onto `device` in groups of at most `query_budget` bytes (all of them at
    once for an evaluation split); for each group the bank is read in blocks of `bank_chunk`
    rows (never across a shard), and each block's `query_chunk` x `bank_chunk` similarities
    update a running top-k (values and global bank rows). Votes are cast as in knn_predict
    from the final top-k, in the same (descending) order, so the predictions are the same.
    """
    bank, queries = as_shards(train_features), as_shards(query_features)
    _check(bank.shape, len(train_labels), queries.shape, k, temperature)
    if bank_chunk < 1 or query_chunk < 1:
        raise ValueError(f"chunks must be >= 1 rows; got bank {bank_chunk}, "
                         f"query {query_chunk}")
    device = torch.device(device)
    k = min(k, len(bank))
    labels = torch.as_tensor(train_labels).long().to(device)
    group = max(query_chunk, query_budget // (4 * max(1, queries.dim)))
    preds = []
    for _, qblock in queries.blocks(group):
        q = F.normalize(torch.from_numpy(qblock).to(device), dim=1)
        best = torch.full((len(q), k), float("-inf"), device=device)
        where = torch.zeros((len(q), k), dtype=torch.long, device=device)
        for start, block in bank.blocks(bank_chunk):
            b = F.normalize(torch.from_numpy(block).to(device), dim=1)
            kk = min(k, len(b))
            for qs in range(0, len(q), query_chunk):
                sim, idx = (q[qs:qs + query_chunk] @ b.T).topk(kk, dim=1)
                # The running top-k and this block's top-k hold every candidate of the top-k
                # over all blocks read so far (exact equal similarities aside, which any topk
                # may order either way).
                sims = torch.cat([best[qs:qs + query_chunk], sim], 1)
                rows = torch.cat([where[qs:qs + query_chunk], idx + start], 1)
                top, pick = sims.topk(k, dim=1)
                best[qs:qs + query_chunk] = top
                where[qs:qs + query_chunk] = rows.gather(1, pick)
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, labels[where], (best / temperature).exp())
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
