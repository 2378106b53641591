"""fastneg.moco: NS loss against the formula, queue, momentum update, shuffle-BN, checkpoints."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastneg.moco import MoCo, build_backbone, load_encoder, ns_contrastive_loss, read_checkpoint


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def reference_loss(q, k, queue, ns, T, alpha):
    """docs/method.md's formula, sample by sample, in float64 numpy."""
    q, k, queue = q.numpy(), k.numpy(), queue.numpy()
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(q[i] @ k[i] / T)
        den = pos + sum(math.exp(q[i] @ queue[j] / T) for j in range(queue.shape[0]))
        if ns is not None:
            den += sum(math.exp(alpha * (q[i] @ ns.numpy()[i, m]) / T) for m in range(ns.shape[1]))
        total += -math.log(pos / den)
    return total / q.shape[0]


@pytest.mark.parametrize("M", [0, 1, 2])
def test_loss_matches_formula(M):
    q, k, queue = unit(6, 16, seed=0), unit(6, 16, seed=1), unit(10, 16, seed=2)
    ns = unit(6, M, 16, seed=3) if M else None
    for T, alpha in [(0.2, 2.0), (0.5, 3.0)]:
        loss, logits = ns_contrastive_loss(q, k, queue, ns, T=T, alpha=alpha)
        assert logits.shape == (6, 1 + 10 + M)
        assert loss.item() == pytest.approx(reference_loss(q, k, queue, ns, T, alpha), rel=1e-12)


def test_alpha_scales_the_logit_not_the_exponential():
    q, k = unit(4, 8, seed=0), unit(4, 8, seed=1)
    queue, ns = unit(5, 8, seed=2), unit(4, 2, 8, seed=3)
    T, alpha = 0.2, 3.0
    loss, logits = ns_contrastive_loss(q, k, queue, ns, T=T, alpha=alpha)
    sims = torch.einsum("nd,nmd->nm", q, ns)
    torch.testing.assert_close(logits[:, -2:], alpha * sims / T)
    # The other reading (alpha as a weight on exp(q.t / T)) gives a different loss.
    weighted = torch.cat([logits[:, :-2], sims / T + math.log(alpha)], 1)
    other = F.cross_entropy(weighted, torch.zeros(4, dtype=torch.long))
    assert not math.isclose(loss.item(), other.item(), rel_tol=1e-6)


def test_loss_rejects_bad_shapes():
    q = unit(4, 8, seed=0)
    with pytest.raises(ValueError, match="ns"):
        ns_contrastive_loss(q, q, unit(5, 8, seed=1), unit(3, 1, 8, seed=2))
    with pytest.raises(ValueError, match="queue"):
        ns_contrastive_loss(q, q, unit(5, 7, seed=1))


def tiny_moco(**kw):
    args = dict(arch="resnet10s", dim=8, K=8, m=0.9, T=0.2, mlp_hidden=16, cifar_stem=True)
    args.update(kw)
    torch.manual_seed(0)
    return MoCo(**args)


def images(n, seed, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_enqueue_order_and_pointer_wrap():
    model = tiny_moco()
    a, b, c = unit(4, 8, seed=1).float(), unit(4, 8, seed=2).float(), unit(4, 8, seed=3).float()
    model.dequeue_and_enqueue(a)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:4], a)
    model.dequeue_and_enqueue(b)
    assert int(model.queue_ptr) == 0          # wrapped
    model.dequeue_and_enqueue(c)              # overwrites the oldest keys (a)
    torch.testing.assert_close(model.queue, torch.cat([c, b]))
    assert int(model.queue_ptr) == 4
    with pytest.raises(ValueError, match="not divisible"):
        model.dequeue_and_enqueue(unit(3, 8, seed=4).float())


def test_momentum_update_on_every_parameter():
    model = tiny_moco(m=0.75)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q_params = list(model.encoder_q.parameters())
    model.momentum_update()
    after_k = list(model.encoder_k.parameters())
    assert len(after_k) == len(q_params) == len(before_k)
    for k0, q, k1 in zip(before_k, q_params, after_k):
        torch.testing.assert_close(k1, 0.75 * k0 + 0.25 * q.detach())
        assert not k1.requires_grad


def test_forward_enqueues_keys_and_never_ns():
    model = tiny_moco()
    queue0 = model.queue.clone()
    im_q, im_k, ns = images(4, 1), images(4, 2), images(4, 3)
    loss, logits = model(im_q, im_k, ns=[ns])
    assert torch.isfinite(loss) and logits.shape == (4, 1 + 8 + 1)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    keys = model.encode_momentum(im_k)       # same key-encoder weights as inside forward
    ns_feats = model.encode_momentum(ns)
    torch.testing.assert_close(model.queue[:4], keys)
    torch.testing.assert_close(model.queue[4:], queue0[4:])
    assert not torch.isclose(model.queue, ns_feats.repeat(2, 1)).all(1).any()


def test_backbone_archs_and_errors():
    net, feats = build_backbone("resnet10s", cifar_stem=True)
    assert net(images(2, 0)).shape == (2, feats) == (2, 256)
    net, feats = build_backbone("resnet18")
    assert feats == 512 and net(images(2, 0, size=32)).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        build_backbone("resnet7")
    with pytest.raises(ValueError, match="bn mode"):
        tiny_moco(bn="group")


def _two_rank_worker(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny_moco(K=8)
        model.dequeue_and_enqueue(torch.full((2, 8), float(rank + 1)))
        # With BN frozen, shuffle-BN must hand every rank back the features of its own samples.
        model.encoder_k.eval()
        x = images(3, 10 + rank)
        shuffled = model.encode_momentum(x, step=5)
        direct = F.normalize(model.encoder_k(x), dim=1)
        err = (shuffled - direct).abs().max().item()
        results[rank] = (model.queue.clone(), int(model.queue_ptr), err)
    finally:
        dist.destroy_process_group()


def test_two_ranks_enqueue_all_keys_and_unshuffle(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), results), nprocs=2,
                           start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        queue, ptr, err = results[rank]
        assert ptr == 4
        torch.testing.assert_close(queue[:2], torch.ones(2, 8))       # rank 0's keys first
        torch.testing.assert_close(queue[2:4], torch.full((2, 8), 2.0))
        assert err < 1e-6


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = tiny_moco()
    args = dict(arch="resnet10s", dim=8, moco_k=8, moco_m=0.9, moco_t=0.2, mlp_hidden=16,
                cifar_stem=True, size=16)
    good = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 1, "step": 3}, good)
    backbone, got_args = load_encoder(good)
    assert got_args == args
    x = images(2, 0)
    model.encoder_q.backbone.eval()
    torch.testing.assert_close(backbone(x), model.encoder_q.backbone(x))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pt.*truncated or not a torch checkpoint"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        read_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a fastneg MoCo checkpoint"):
        load_encoder(foreign)
    objects = tmp_path / "objects.pt"
    torch.save({"model": {}, "args": np.dtype("float32")}, objects)  # a non-plain object inside
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_checkpoint(objects)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
    wrong_arch = tmp_path / "wrong.pt"
    torch.save({"model": model.state_dict(), "args": {**args, "arch": "resnet18s"}}, wrong_arch)
    with pytest.raises(ValueError, match="do not fit arch 'resnet18s'"):
        load_encoder(wrong_arch)


def test_split_batchnorm_one_group_equals_batchnorm():
    from fastneg.moco import SplitBatchNorm
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    split = SplitBatchNorm(6, groups=1)
    split.load_state_dict(plain.state_dict())
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    for _ in range(2):   # twice: the running statistics must follow too
        assert torch.allclose(split(x), plain(x), atol=1e-6)
    assert torch.allclose(split.running_mean, plain.running_mean, atol=1e-6)
    assert torch.allclose(split.running_var, plain.running_var, atol=1e-6)
    split.eval(), plain.eval()
    assert torch.allclose(split(x), plain(x), atol=1e-6)


def test_split_batchnorm_normalizes_each_group_alone():
    from fastneg.moco import SplitBatchNorm
    split = SplitBatchNorm(3, groups=2)
    x = torch.randn(8, 3, 4, 4)
    x[4:] += 10   # group 1 (the second block of samples) lies far from group 0
    y = split(x)
    ref = torch.empty_like(x)
    for g in range(2):
        ref[4 * g:4 * g + 4] = torch.nn.functional.batch_norm(x[4 * g:4 * g + 4], None, None,
                                                              training=True)
    assert torch.allclose(y, ref, atol=1e-5)
    # The mean over the batch would leave the groups 10 apart; split BN centres each.
    assert y[4:].mean().abs() < 1e-4
    with pytest.raises(ValueError, match="divisible"):
        split(torch.randn(3, 3, 4, 4))


def test_split_batchnorm_keeps_channels_last_and_matches_the_running_statistics():
    # a channels_last batch stays channels_last (the convolutions after it would copy an NCHW
    # output back), with the same output, gradients and running statistics as NCHW
    from fastneg.moco import SplitBatchNorm
    torch.manual_seed(0)
    a, b = SplitBatchNorm(6, groups=4), SplitBatchNorm(6, groups=4)
    x = torch.randn(8, 6, 5, 7) * 2 + 1
    x_cl = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    ya, yb = a(x), b(x_cl)
    assert yb.is_contiguous(memory_format=torch.channels_last) and ya.is_contiguous()
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(x.grad, x_cl.grad)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    # the running statistics are the mean of what each block's BatchNorm would keep
    blocks = [torch.nn.BatchNorm2d(6) for _ in range(4)]
    for k, bn in enumerate(blocks):
        bn(x.detach()[2 * k:2 * k + 2])
    torch.testing.assert_close(a.running_var, torch.stack([bn.running_var for bn in blocks]).mean(0))


def test_split_bn_model_trains_and_loads_into_a_plain_backbone(tmp_path):
    from fastneg.moco import SplitBatchNorm
    model = tiny_moco(bn="split", bn_splits=2)
    assert any(isinstance(m, SplitBatchNorm) for m in model.encoder_k.modules())
    loss, _ = model(images(8, 1), images(8, 2), ns=[images(8, 3)], step=0)
    loss.backward()
    assert torch.isfinite(loss)
    # Key order survives the shuffle: encoding a batch and its reverse gives reversed features
    # when BatchNorm uses running statistics (eval mode).
    model.encoder_k.eval()
    x = images(8, 4)
    a, b = model.encode_momentum(x, step=3), model.encode_momentum(x.flip(0), step=3)
    assert torch.allclose(a.flip(0), b, atol=1e-5)
    plain = tiny_moco(bn="shuffle")
    plain.load_state_dict(model.state_dict())   # same keys: checkpoints stay loadable
