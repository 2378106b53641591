"""What the DALI and torch loaders share when they read tar shards (fastneg.data.shards).

Rank sharding, per epoch, from fastneg's counter RNG only (no global RNG):

1. Shard order: the shards sorted by a draw of (seed, epoch, shard number) (SLOT_SHARD_ORDER);
   shuffle=False keeps the listed order.
2. Assignment: in that order, each shard goes to the rank (global RANK of WORLD_SIZE, never
   the local rank) holding the fewest samples so far (ties: the lower rank). Every rank reads
   a disjoint set of whole shards; the loads differ by at most one shard.
3. Equal steps: every rank runs len(loader) steps of full batches, the ImageFolder path's count
   for the same number of samples N: drop_last=True: (N // world_size) // batch_size, a rank
   with more samples leaves the end of its stream out (drop); drop_last=False:
   ceil(ceil(N / world_size) / batch_size), a rank with fewer samples reads its own shards
   again from the start to fill its last batches (pad). With equal loads (N divisible by
   world_size x batch_size, shards of equal counts) every sample is read exactly once.
4. Within a rank: the samples of its shards, read in order, pass through a shuffle buffer
   (min(SHUFFLE_BUFFER, the rank's samples) slots; the slot to emit is drawn from (seed, epoch,
   rank, draw number), SLOT_BUFFER). The buffer is emptied at the end of each pass over the
   rank's shards, so a pad never comes before a sample of the first pass.

Bad input found while reading (no pre-flight check can see inside a foreign shard): a sample
without an image or a label, a label that is not a class index, an image that fails
fastneg.data.files' header check, a truncated or corrupt tar, a shard that cannot be opened
(vanished mid-epoch, a pipe: command that fails) or that ends before its index says. Without
skip_bad: ShardError (a ValueError) whose one-line message names the shard (and key). With
skip_bad: the sample (or the rest of the shard) is left out and counted in loader.skipped /
loader.bad_files; the rank's stream goes on with the next samples, so its batches stay full and
its step count does not change. An image that passes the header check but fails to decode is
replaced by the next samples of the rank's stream (skip_bad) or named in an UnreadableFiles.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fastneg.data.files import inspect_bytes
from fastneg.data.shards import (IMAGE_EXTS, LABEL_EXT, SLOT_BUFFER, SLOT_SHARD_ORDER,
                                 ShardError, ShardSet, counter_keys, iter_tar, open_shard,
                                 resolve_shards)
from fastneg.loaders.common import LoaderBase, LoaderConfig, open_texture_bank

log = logging.getLogger("fastneg.loaders")

SHUFFLE_BUFFER = 2048       # samples held for the within-rank shuffle (about 250 MB of JPEGs)
DRAW_CHUNK = 4096           # buffer draws computed at once
RANK_STRIDE = 1 << 40       # draw counter = rank * RANK_STRIDE + draw number


@dataclass(frozen=True)
class Sample:
    index: int          # dataset index (pairs the sample with its crop windows and texture)
    label: int
    data: bytes         # the encoded image
    height: int
    width: int
    where: str          # "SHARD:KEY", for messages


def assign_shards(counts: np.ndarray, order: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Shard numbers per rank: each shard of `order` to the least-loaded rank (lowest on ties)."""
    loads = np.zeros(world_size, np.int64)
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for s in order.tolist():
        r = int(np.argmin(loads))
        parts[r].append(s)
        loads[r] += counts[s]
    return [np.asarray(p, np.int64) for p in parts]


class ShardPlan:
    """The epoch plan of one rank over a ShardSet (see the module docstring)."""

    def __init__(self, shards: ShardSet, cfg: LoaderConfig, bad: list):
        self.shards, self.cfg, self.bad = shards, cfg, bad
        n, world, bs = shards.samples, cfg.world_size, cfg.batch_size
        if len(shards.shards) < world:
            raise ValueError(f"{shards.description}: {len(shards.shards)} shard(s) for "
                             f"world_size {world}: every rank needs at least one shard; write "
                             "smaller shards (fastneg convert --to wds --shard-size)")
        per_rank = n // world if cfg.drop_last else -(-n // world)
        self.steps = per_rank // bs if cfg.drop_last else -(-per_rank // bs)
        if self.steps == 0:
            raise ValueError(f"{n} samples in {shards.description} give rank {cfg.rank} of "
                             f"{world} no full batch of {bs}: use a smaller batch_size")
        self._classes = len(shards.classes)

    def order(self, epoch: int) -> np.ndarray:
        count = len(self.shards.shards)
        if not self.cfg.shuffle:
            return np.arange(count, dtype=np.int64)
        keys = counter_keys(self.cfg.seed, epoch, np.arange(count), SLOT_SHARD_ORDER)
        return np.argsort(keys, kind="stable").astype(np.int64)

    def assignment(self, epoch: int) -> list[np.ndarray]:
        """Shard numbers of every rank in `epoch`, in the order each rank reads them."""
        return assign_shards(self.shards.counts, self.order(epoch), self.cfg.world_size)

    # ------------------------------------------------------------- reading

    def _fail(self, where: str, why: str) -> None:
        """A bad sample or shard: counted with skip_bad, else ShardError (one line)."""
        if not self.cfg.skip_bad:
            raise ShardError(f"{where}: {why}; fix the shard or pass skip_bad=True (--skip-bad) "
                             "to leave it out")
        if (where, why) not in self.bad:
            self.bad.append((where, why))

    def _sample(self, shard: int, position: int, key: str, parts: dict) -> Sample | None:
        name = self.shards.shards[shard]
        where = f"{name}:{key}"
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None:
            return self._fail(where, "sample without an image (.jpg, .jpeg or .png)")
        if LABEL_EXT not in parts:
            return self._fail(where, "sample without a label (.cls)")
        text = parts[LABEL_EXT].decode(errors="replace").strip()
        if not text.isdigit() or (self._classes and int(text) >= self._classes):
            return self._fail(where, f"label {text[:20]!r} is not a class index"
                              + (f" below {self._classes}" if self._classes else ""))
        if self.shards.keys_are_indices:
            base = key.rpartition("/")[2]
            if not base.isdigit():
                return self._fail(where, "key is not a dataset index (fastneg's shards name "
                                         "samples by their index)")
            index = int(base)
        else:
            index = int(self.shards.offsets[shard]) + position
        problem, h, w, _ = inspect_bytes(image)
        if problem is not None:
            return self._fail(where, problem)
        return Sample(index, int(text), image, h, w, where)

    def read_shard(self, shard: int):
        """The good samples of one shard, in file order (bad ones handled by _fail)."""
        name, expected = self.shards.shards[shard], int(self.shards.counts[shard])
        got = 0
        try:
            with open_shard(name) as stream:
                for key, parts in iter_tar(stream, name):
                    sample = self._sample(shard, got, key, parts)
                    got += 1
                    if sample is not None:
                        yield sample
            if got != expected:
                raise ShardError(f"shard {name} holds {got} samples where its index lists "
                                 f"{expected} (truncated, or the index is stale)")
        except ShardError as e:
            self._fail(name, str(e).removeprefix(f"shard {name}").lstrip(": ") or str(e))

    def stream(self, epoch: int):
        """This rank's samples of `epoch`, shuffled through the buffer, without end (passes
        over its shards repeat; see the module docstring). ShardError if a whole pass yields
        no sample."""
        cfg = self.cfg
        mine = self.assignment(epoch)[cfg.rank]
        expected = int(self.shards.counts[mine].sum())
        capacity = max(1, min(SHUFFLE_BUFFER, expected)) if cfg.shuffle else 1
        draws = self._draws(epoch)
        buffer: list[Sample] = []
        while True:
            got = 0
            for shard in mine.tolist():
                for sample in self.read_shard(shard):
                    got += 1
                    if len(buffer) < capacity:
                        buffer.append(sample)
                        continue
                    j = next(draws) % capacity
                    yield buffer[j]
                    buffer[j] = sample
            while buffer:                   # end of a pass: empty the buffer, in random order
                j = next(draws) % len(buffer)
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
            if got == 0:
                raise ShardError(f"rank {cfg.rank}: no readable sample in its "
                                 f"{len(mine)} shard(s) of {self.shards.description} "
                                 f"({', '.join(self.shards.shards[s] for s in mine[:3])})")

    def _draws(self, epoch: int):
        base = self.cfg.rank * RANK_STRIDE
        start = 0
        while True:
            yield from counter_keys(self.cfg.seed, epoch, np.arange(base + start,
                                    base + start + DRAW_CHUNK), SLOT_BUFFER).tolist()
            start += DRAW_CHUNK


def take(stream, n: int) -> list[Sample]:
    return [next(stream) for _ in range(n)]


class SampleInfo:
    """Recent samples' (height, width, where) by dataset index, for the code that handles a
    batch after it left the stream (crop boxes and messages on the device path); bounded."""

    def __init__(self, limit: int):
        self.limit = limit
        self._info: OrderedDict[int, tuple[int, int, str]] = OrderedDict()

    def add(self, samples) -> None:
        for s in samples:
            self._info[s.index] = (s.height, s.width, s.where)
            self._info.move_to_end(s.index)
        while len(self._info) > self.limit:
            self._info.popitem(last=False)

    def sizes(self, indices) -> tuple[np.ndarray, np.ndarray]:
        rows = [self._info[int(i)] for i in indices]
        return (np.array([r[0] for r in rows], np.int64).reshape(-1),
                np.array([r[1] for r in rows], np.int64).reshape(-1))

    def __getitem__(self, index: int) -> str:
        """The sample's "SHARD:KEY" (what a loader's `paths[i]` names)."""
        entry = self._info.get(int(index))
        return entry[2] if entry else f"sample {index}"


class ShardLoaderBase(LoaderBase):
    """LoaderBase for shards: set_epoch, len, the skip count and its report; the backends
    implement `_batches(epoch)`."""

    def _init_shards(self, data, cfg: LoaderConfig) -> None:
        shards = resolve_shards(data)
        self.cfg, self.shards = cfg, shards
        self.classes = shards.classes
        self.bad_files: list[tuple[str, str]] = []
        self.epoch = 0
        self._failed: set[int] = set()
        self.plan = ShardPlan(shards, cfg, self.bad_files)
        self._len = self.plan.steps
        self._info = SampleInfo(limit=cfg.batch_size * 64)
        self._bank = None
        if cfg.texture_bank is not None:
            self._bank = open_shard_texture_bank(cfg.texture_bank, shards)

    def samples(self, epoch: int):   # pragma: no cover - no fixed plan: the stream is read
        raise TypeError("a shard loader's samples are known only once read (see plan.stream)")

    def __iter__(self):
        epoch = self.epoch
        yield from self._batches(epoch)
        if self.bad_files and self.cfg.rank == 0 and self.cfg.report_skipped:
            first = "; ".join(f"{f}: {why}" for f, why in self.bad_files[:3])
            log.warning("%s loader, epoch %d: skipped %d unreadable sample(s) or shard(s) "
                        "(%s%s)", self.kind, epoch, self.skipped, first,
                        " ..." if self.skipped > 3 else "")


def open_shard_texture_bank(path, shards: ShardSet):
    """The JPEG texture bank of the ImageFolder the shards were converted from (paired by the
    samples' keys, which are its dataset indices)."""
    if not shards.keys_are_indices:
        raise ValueError(f"texture bank {path} with {shards.description}: textures pair with "
                         "dataset indices, which only shards written by `fastneg convert --to "
                         "wds` carry as keys")
    return open_texture_bank(path, shards.fingerprint)   # the fingerprint check: BankReader
