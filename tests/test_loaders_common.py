"""fastneg.loaders.common (order, shards, evaluation crop) and the convert verb's checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from fastneg.data import convert
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.loaders.common import center_box, epoch_order, shard


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    idx = np.arange(0, 300, 3)          # any index set, e.g. with unreadable files left out
    a = epoch_order(idx, seed=1, epoch=0, shuffle=True)
    assert sorted(a.tolist()) == idx.tolist() and a.tolist() != idx.tolist()
    assert np.array_equal(a, epoch_order(idx, seed=1, epoch=0, shuffle=True))
    assert not np.array_equal(a, epoch_order(idx, seed=1, epoch=1, shuffle=True))
    assert not np.array_equal(a, epoch_order(idx, seed=2, epoch=0, shuffle=True))
    assert np.array_equal(epoch_order(idx, seed=1, epoch=5, shuffle=False), idx)
    # an index's key depends on the index alone: a subset keeps its relative order
    sub = epoch_order(idx[10:], seed=1, epoch=0, shuffle=True)
    assert np.array_equal(sub, a[np.isin(a, idx[10:])])


@pytest.mark.parametrize("n,world,batch", [(100, 3, 8), (17, 2, 4), (5, 4, 1)])
def test_shards_partition_or_give_equal_full_batches(n, world, batch):
    order = epoch_order(np.arange(n), seed=0, epoch=0, shuffle=True)
    parts = [shard(order, r, world, batch, drop_last=False) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    full = [shard(order, r, world, batch, drop_last=True) for r in range(world)]
    assert len({len(p) for p in full}) == 1 and len(full[0]) % batch == 0
    assert len(full[0]) * world > n - world * batch     # drops less than a batch per rank
    assert len(set(np.concatenate(full).tolist())) == len(full[0]) * world
    assert all(p.flags.c_contiguous for p in parts + full)


@pytest.mark.parametrize("h,w,size", [(375, 500, 224), (64, 64, 32), (500, 333, 96)])
def test_center_box_is_resize_then_center_crop(h, w, size):
    """The box resized to size x size shows what torchvision's Resize(size / 0.875) followed by
    CenterCrop(size) shows: compared on an image whose pixels are their own coordinates."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                          torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = torch.stack([y, x])
    ref = F.center_crop(F.resize(coords, int(size / 0.875), antialias=False), [size, size])
    top, left, ch, cw = center_box(h, w, size)
    assert ch == cw and 0 <= top and 0 <= left and top + ch <= h and left + cw <= w
    ours = F.resized_crop(coords, top, left, ch, cw, [size, size], antialias=False)
    # both differ only by the rounding of the crop offset: within one output pixel
    assert (ours - ref).abs().max() < ch / size


def test_convert_rejects_bad_arguments_before_writing(tmp_path, capsys):
    make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=1, size=16), progress=False)
    src = str(tmp_path / "shapes" / "train")
    (tmp_path / "taken.beton").write_bytes(b"")
    for extra, message in [([str(tmp_path / "out.bin")], "should end in .beton"),
                           ([str(tmp_path / "o.beton"), "--max-side", "0"], "--max-side"),
                           ([str(tmp_path / "o.beton"), "--quality", "101"], "--quality"),
                           ([str(tmp_path / "taken.beton")], "--force")]:
        assert convert.main(["convert", "--to", "ffcv", src, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.beton").exists()


def test_convert_is_a_fastneg_verb():
    from fastneg.cli import build_parser

    args = build_parser().parse_args(["convert", "--to", "ffcv", "DIR", "OUT.beton", "--skip-bad"])
    assert args.func is convert.run and args.skip_bad and args.max_side == convert.DEFAULT_MAX_SIDE
