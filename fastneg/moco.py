"""MoCo-v2 with non-semantic negatives: encoders, MLP head, momentum update, queue and loss.

    model = MoCo(arch="resnet50", dim=128, K=16384, m=0.999, T=0.2, alpha=2.0)
    loss, logits = model(im_q, im_k, ns=[patch_ns], step=t)   # im_* normalized [N, 3, H, W]

The query encoder is a torchvision ResNet (or the small "resnet10s" for CPUs) followed by a
2-layer MLP head; the key encoder is its momentum copy. Keys and non-semantic negatives (NS) are
both encoded by the key encoder without gradient, with the same BatchNorm treatment; only keys
enter the queue. The loss is docs/method.md's, with alpha multiplying the NS similarity inside the
exponent. Checkpoints written by the trainer (fastneg.train) are read back by `read_checkpoint`
and `load_encoder`, which never unpickle anything but tensors, numbers and strings.
"""
from __future__ import annotations

import copy
import os
import pickle
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

from fastneg.kernels import rng

BN_MODES = ("split", "shuffle", "sync")
SMALL_ARCHS = {
    # name: (blocks per stage, stage widths). Narrow BasicBlock ResNets for CPU training.
    "resnet10s": ((1, 1, 1, 1), (32, 64, 128, 256)),
    "resnet18s": ((2, 2, 2, 2), (32, 64, 128, 256)),
}
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "wide_resnet50_2")
ARCHS = tuple(SMALL_ARCHS) + TORCHVISION_ARCHS


# ---------------------------------------------------------------- loss

def ns_contrastive_loss(q, k, queue, ns=None, *, T=0.2, alpha=2.0):
    """MoCo's InfoNCE loss with non-semantic negatives (docs/method.md); returns (loss, logits).

    q, k: [N, D]; queue: [K, D]; ns: [N, M, D] or None; all rows L2-normalized.
    logits[i] = [q_i.k_i, q_i.queue_j (all j), alpha * q_i.ns_im (all m)] / T, target 0, mean
    cross-entropy over the batch. Each query only sees its own NS.
    """
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"need q, k [N, D] and queue [K, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, queue {tuple(queue.shape)}")
    parts = [(q * k).sum(1, keepdim=True), q @ queue.t()]
    if ns is not None:
        if ns.dim() != 3 or ns.shape[0] != q.shape[0] or ns.shape[2] != q.shape[1]:
            raise ValueError(f"need ns [N, M, D] = [{q.shape[0]}, M, {q.shape[1]}], "
                             f"got {tuple(ns.shape)}")
        parts.append(alpha * torch.einsum("nd,nmd->nm", q, ns))
    logits = torch.cat(parts, 1) / T
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits


# ---------------------------------------------------------------- encoders

class NarrowResNet(nn.Module):
    """A ResNet of torchvision BasicBlocks with chosen stage widths (torchvision fixes 64..512).

    Attribute names follow torchvision's ResNet (conv1, bn1, maxpool, layer1..4, fc), so the
    CIFAR stem swap and feature extraction treat both alike.
    """

    def __init__(self, blocks, widths):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False),
                                     nn.BatchNorm2d(width))
            layers = [BasicBlock(inplanes, width, stride, down)]
            layers += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 1000)
        for mod in self.modules():   # torchvision's ResNet initialisation
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_backbone(arch: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """(ResNet mapping [N, 3, H, W] to features [N, F], F) with its classifier removed.

    cifar_stem: a 3x3 stride-1 first convolution and no max-pool, for low-resolution images
    (the ImageNet stem shrinks a 32 px image to 8 px before the first stage).
    """
    if arch in SMALL_ARCHS:
        net = NarrowResNet(*SMALL_ARCHS[arch])
    elif arch in TORCHVISION_ARCHS:
        net = getattr(models, arch)(weights=None)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if cifar_stem:
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


class Encoder(nn.Module):
    """Backbone followed by MoCo-v2's MLP head (Linear, ReLU, Linear)."""

    def __init__(self, arch, dim, mlp_hidden, cifar_stem):
        super().__init__()
        self.backbone, features = build_backbone(arch, cifar_stem)
        self.head = nn.Sequential(nn.Linear(features, mlp_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(mlp_hidden, dim))

    def forward(self, x):
        return self.head(self.backbone(x))


# ---------------------------------------------------------------- split BatchNorm

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalizes G sub-batches separately.

    The batch is cut into G consecutive blocks of N / G samples; each block gets its own batch
    statistics (as G processes would), and the running statistics are the mean over the
    blocks. In eval mode, and in its state dict, it is a plain BatchNorm2d, so its weights load
    into an unsplit network. Needs a batch divisible by G. G = 1 computes exactly what
    BatchNorm2d does.

    Consecutive blocks, not interleaved samples: a block of a channels_last (or NCHW) batch is
    a slice in the same memory format, so each block goes through the ordinary BatchNorm
    kernel without a copy and the output keeps the input's layout. (Folding interleaved groups
    into channels, [N, C, H, W] -> [N / G, G * C, H, W], copied a channels_last batch to NCHW
    at every BatchNorm and left every following convolution to copy it back.) The MoCo model
    encodes keys and NS in a random permutation of the batch, so which samples share a block
    is random for them either way.
    """

    def __init__(self, num_features, groups, **kwargs):
        super().__init__(num_features, **kwargs)
        if groups < 1:
            raise ValueError(f"BatchNorm groups must be >= 1, got {groups}")
        self.groups = groups

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, g = x.shape[0], self.groups
        if n % g:
            raise ValueError(f"split BatchNorm: batch {n} is not divisible by {g} groups")
        # every block updates its own copy of the running statistics; they are averaged after
        means = [self.running_mean.clone() for _ in range(g)]
        variances = [self.running_var.clone() for _ in range(g)]
        memory_format = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last)
                         else torch.contiguous_format)
        y = torch.cat([F.batch_norm(block, mean, var, self.weight, self.bias, True,
                                    self.momentum, self.eps)
                       for block, mean, var in zip(x.chunk(g), means, variances)])
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return y if y.is_contiguous(memory_format=memory_format) else \
            y.contiguous(memory_format=memory_format)


def split_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a SplitBatchNorm of `groups` (same weights)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm(child.num_features, groups, eps=child.eps,
                                 momentum=child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            split_batchnorm(child, groups)
    return module


# ---------------------------------------------------------------- distributed helpers

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# torch >= 2.13 calls it all_gather_single (all_gather_into_tensor, its old name, warns there;
# torch 2.11 has only the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x of every rank, concatenated in rank order (no gradient); x itself in one process.

    One collective straight into one output buffer (NCCL and gloo). A channels_last batch
    travels as the NHWC tensor its memory is (no copy to NCHW first) and comes back
    channels_last.
    """
    world = _world()
    if world == 1:
        return x
    if x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        return concat_all_gather(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)
    return out


def shuffle_seed(seed: int, step: int) -> int:
    """Seed (64 bits) of shuffle-BN's permutation at `step`: two draws of fastneg.kernels.rng,
    so every seed and step in [0, 2**63) is valid and no two (seed, step) pairs share it by
    construction (seed * 2**32 + step overflowed torch's 64-bit seed from seed 2**32 on)."""
    high = rng.mix(seed, step, 0, rng.slot(rng.STREAM_SHUFFLE_BN, 0))
    low = rng.mix(seed, step, 0, rng.slot(rng.STREAM_SHUFFLE_BN, 1))
    return high << 32 | low


# ---------------------------------------------------------------- the model

class MoCo(nn.Module):
    """MoCo-v2 with a momentum key encoder, a queue of K keys and non-semantic negatives.

    bn: "shuffle" (keys and NS are encoded in a random permutation of the global batch, so
    BatchNorm statistics cannot leak which key belongs to which query; a no-op in one process),
    "split" (one process: BatchNorm over `bn_splits` sub-batches in both encoders, keys and NS
    encoded in a random permutation of the batch, as MoCo's CIFAR demo does) or "sync"
    (SyncBatchNorm in both encoders; torch implements it for GPUs only).
    """

    def __init__(self, arch="resnet50", dim=128, K=16384, m=0.999, T=0.2, alpha=2.0,
                 mlp_hidden=2048, cifar_stem=False, bn="shuffle", seed=0, bn_splits=4):
        super().__init__()
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; choose from {', '.join(BN_MODES)}")
        if K < 1 or dim < 1 or not 0.0 <= m < 1.0 or T <= 0:
            raise ValueError(f"need K >= 1, dim >= 1, 0 <= m < 1, T > 0; got K={K}, dim={dim}, "
                             f"m={m}, T={T}")
        self.K, self.m, self.T, self.alpha, self.bn, self.seed = K, m, T, alpha, bn, seed
        self.encoder_q = Encoder(arch, dim, mlp_hidden, cifar_stem)
        self.encoder_k = copy.deepcopy(self.encoder_q)   # starts equal to the query encoder
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        if bn == "split":
            split_batchnorm(self.encoder_q, bn_splits)
            split_batchnorm(self.encoder_k, bn_splits)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
            self.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_k)
        # Starts as random unit vectors, like MoCo's; stored [K, D] to match the loss.
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def encode_query(self, x):
        return F.normalize(self.encoder_q(x), dim=1)

    @torch.no_grad()
    def momentum_update(self):
        """key = m * key + (1 - m) * query, for every parameter of the key encoder."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        # One multi-tensor kernel per op instead of a Python loop over every parameter.
        torch._foreach_mul_(k_params, self.m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.m)

    @torch.no_grad()
    def encode_momentum(self, x, step=0):
        """Normalized key-encoder features of x, with shuffle-BN across ranks when bn="shuffle"."""
        world = _world()
        if self.bn == "split":
            if world > 1:
                raise ValueError("bn='split' is for one process; use 'shuffle' across processes")
            gen = torch.Generator(device=x.device)
            # shuffle_seed, not seed * 2**32 + step (over torch's 64 bits from seed 2**32 on)
            gen.manual_seed(shuffle_seed(self.seed, step))
            perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
            return F.normalize(self.encoder_k(x[perm]), dim=1)[torch.argsort(perm)]
        if self.bn == "sync" or world == 1:
            return F.normalize(self.encoder_k(x), dim=1)
        n, rank = x.shape[0], dist.get_rank()
        x_all = concat_all_gather(x)
        # The same permutation on every rank, a function of (seed, step) only: no broadcast.
        gen = torch.Generator(device=x.device)
        gen.manual_seed(shuffle_seed(self.seed, step))
        perm = torch.randperm(world * n, generator=gen, device=x.device)
        mine = perm.view(world, n)[rank]
        feats_all = concat_all_gather(F.normalize(self.encoder_k(x_all[mine]), dim=1))
        return feats_all[torch.argsort(perm).view(world, n)[rank]]

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        """Overwrite the oldest keys with this step's keys of all ranks (rank order); never NS."""
        keys = concat_all_gather(keys)
        n = keys.shape[0]
        if self.K % n:
            raise ValueError(f"queue size K={self.K} is not divisible by the global batch {n}")
        # Rows and pointer stay on the device: reading the pointer on the host would sync.
        rows = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.K
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(self.K)

    def forward(self, im_q, im_k, ns=(), step=0):
        """(loss, logits) for one step; updates the key encoder and the queue.

        im_q, im_k: [N, 3, H, W]; ns: a sequence of M image batches [N, 3, H, W] (M may be 0);
        step: the global step (seeds the shuffle-BN permutation).
        """
        q = self.encode_query(im_q)
        self.momentum_update()
        k = self.encode_momentum(im_k, step)
        ns_keys = (torch.stack([self.encode_momentum(x, step) for x in ns], 1) if len(ns)
                   else None)
        # The loss in float32 whatever autocast does around it: logits / T over K + 1 classes.
        with torch.autocast(q.device.type, enabled=False):
            # The queue is cloned: the in-place enqueue below would clash with autograd's copy.
            loss, logits = ns_contrastive_loss(
                q.float(), k.float(), self.queue.clone(),
                None if ns_keys is None else ns_keys.float(), T=self.T, alpha=self.alpha)
        self.dequeue_and_enqueue(k.float())
        return loss, logits


# ---------------------------------------------------------------- checkpoints

def build_model(args: dict) -> MoCo:
    """A MoCo from a checkpoint's (or the trainer's) args dict."""
    return MoCo(arch=args["arch"], dim=args["dim"], K=args["moco_k"], m=args["moco_m"],
                T=args["moco_t"], alpha=args.get("alpha", 2.0),
                mlp_hidden=args.get("mlp_hidden", 2048), cifar_stem=args.get("cifar_stem", False),
                bn=args.get("bn", "shuffle"), seed=args.get("seed", 0),
                bn_splits=args.get("bn_splits", 4))


def read_checkpoint(path, map_location="cpu") -> dict:
    """A trainer checkpoint as a dict, loaded with weights_only=True (no arbitrary unpickling).

    Raises FileNotFoundError for a missing file and ValueError naming the file for a truncated,
    foreign or object-holding one, one whose bytes fail the zip's CRC-32 checks (a flipped
    bit), args missing or of the wrong type, or weights that are not finite.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):   # torch.save writes a zip archive, complete with its index
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint "
                         "(not a complete zip archive as torch.save writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()        # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"checkpoint {path} is corrupt ({e})") from None
    if damaged is not None:
        raise ValueError(f"checkpoint {path} is damaged: record {damaged} fails its checksum")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path} holds objects other than tensors, numbers and "
                         "strings; refusing to unpickle it") from e
    except Exception as e:  # an untrusted file can fail the reader in any way
        raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not {"model", "args"} <= ckpt.keys():
        raise ValueError(f"{path} is not a fastneg MoCo checkpoint (no 'model' and 'args' entries)")
    _check_contents(ckpt, path)
    return ckpt


# args a checkpoint must carry to rebuild its model and data view, with their types
CHECKPOINT_ARGS = {"arch": str, "dim": int, "moco_k": int, "moco_m": (int, float),
                   "moco_t": (int, float), "size": int}
CHECKPOINT_OPTIONAL_ARGS = {"alpha": (int, float), "mlp_hidden": int, "cifar_stem": bool,
                            "bn": str, "seed": int}


def _check_contents(ckpt: dict, path) -> None:
    """ValueError naming the file for args that are missing or of the wrong type, a step that
    is not an integer, or weights that are not finite (NaN or inf)."""
    args = ckpt["args"]
    if not isinstance(args, dict):
        raise ValueError(f"checkpoint {path}: 'args' is a {type(args).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_ARGS if k not in args]
    if missing:
        raise ValueError(f"checkpoint {path}: args lack {', '.join(missing)}")
    for name, kind in {**CHECKPOINT_ARGS, **CHECKPOINT_OPTIONAL_ARGS}.items():
        v = args.get(name)
        if name in args and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise ValueError(f"checkpoint {path}: args[{name!r}] is {v!r}, not of the "
                             f"expected type")
    if "step" in ckpt and (not isinstance(ckpt["step"], int) or ckpt["step"] < 0):
        raise ValueError(f"checkpoint {path}: step is {ckpt['step']!r}, not an integer >= 0")
    if not isinstance(ckpt["model"], dict):
        raise ValueError(f"checkpoint {path}: 'model' is not a state dict")
    for name, t in ckpt["model"].items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"checkpoint {path}: weights {name} are not finite (NaN or inf); "
                             "the file is damaged or the run diverged")


def load_encoder(path, device="cpu") -> tuple[nn.Module, dict]:
    """(backbone, args) from a trainer checkpoint: the query encoder without its MLP head.

    The backbone maps normalized [N, 3, H, W] float images to features [N, F]; it is returned in
    eval mode on `device`.
    """
    ckpt = read_checkpoint(path)
    args = ckpt["args"]
    backbone, _ = build_backbone(args["arch"], args.get("cifar_stem", False))
    prefix = "encoder_q.backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: weights do not fit arch {args['arch']!r}: {e}") from e
    return backbone.to(device).eval(), args
