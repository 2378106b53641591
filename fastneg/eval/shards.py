"""Feature matrices too big for memory: a folder of row shards, read through memory maps.

    FOLDER/manifest.json     {"format", "version", "key", "n", "dim", "dtype",
                              "shards": [{"file", "rows", "dtype"}, ...]}
    FOLDER/shard-00000.npy   rows [0, rows_0) as a plain .npy array [rows_0, dim]
    FOLDER/shard-00001.npy   ...

Shards are float16 (half the disk and page cache of float32; features are standardized or
L2-normalized before use, so the ~3 significant digits lose nothing a probe can see). A shard
whose values exceed float16's range is stored as float32 instead (its entry says so), so no
value is ever turned into inf. Every reader converts blocks to float32.

A folder is built under a hidden sibling name and renamed into place when its manifest is
written (fastneg.fs.staged_dir), so a killed writer never leaves a folder that
`open_shards` accepts: it needs the manifest, the key and every shard with its recorded shape.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastneg.fs import staged_dir

FORMAT = "fastneg-feature-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 128 << 20          # float16 bytes per shard: 32,768 rows of 2,048 features
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(eq=False)
class FeatureShards:
    """Rows [0, n) of an [n, dim] feature matrix held as consecutive shards (memory maps of a
    shard folder, or in-memory arrays). Row order is the order of the shards."""
    shards: list            # np.ndarray [rows_i, dim] each (np.memmap for a folder)
    dim: int
    key: str = ""
    folder: Path | None = None

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(
            np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def blocks(self, rows: int):
        """Yield (start, float32 np.ndarray [<= rows, dim], a writable copy) covering every row in
        order; a block never spans two shards, so it is one contiguous slice of one memory map."""
        if rows < 1:
            raise ValueError(f"block rows must be >= 1, got {rows}")
        for offset, shard in zip(self.offsets, self.shards):
            for start in range(0, len(shard), rows):
                yield int(offset) + start, np.array(shard[start:start + rows], np.float32)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """float32 [len(index), dim] rows at the global positions `index` (any order)."""
        index = np.asarray(index, np.int64)
        out = np.empty((len(index), self.dim), np.float32)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            out[sel] = self.shards[s][index[sel] - self.offsets[s]]
        return out

    def load(self) -> torch.Tensor:
        """The whole matrix as one float32 tensor (for splits small enough to hold)."""
        out = torch.empty(len(self), self.dim)
        for start, block in self.blocks(1 << 16):
            out[start:start + len(block)] = torch.from_numpy(block)
        return out

    @classmethod
    def from_tensor(cls, features, shard_rows: int | None = None) -> "FeatureShards":
        """An in-memory FeatureShards over a [N, F] tensor or array (no copy for float32 CPU
        tensors; `shard_rows` splits it, for tests of the shard logic)."""
        x = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, F]; got shape {tuple(x.shape)}")
        step = shard_rows or max(1, len(x))
        shards = [x[i:i + step] for i in range(0, len(x), step)] or [x[:0]]
        return cls(shards, int(x.shape[1]))


def as_shards(features) -> FeatureShards:
    """FeatureShards unchanged; a tensor or array wrapped (in memory)."""
    return features if isinstance(features, FeatureShards) else FeatureShards.from_tensor(features)


def as_tensor(features) -> torch.Tensor:
    """A float32-able tensor of a tensor or FeatureShards (the latter loaded whole)."""
    return features.load() if isinstance(features, FeatureShards) else features


class ShardWriter:
    """Write an [n, dim] matrix to a shard folder in row batches given by position, with only
    the shards not yet complete held in memory (one or two when rows arrive in order).

        with ShardWriter(folder, n, key=key) as w:
            for idx, rows in batches:
                w.write(idx, rows)        # dim is taken from the first batch

    The folder appears (atomically, replacing an older one) only when the block ends without
    an error and every row was written.
    """

    def __init__(self, folder, n: int, *, key: str = "", shard_bytes: int = SHARD_BYTES):
        if n < 0:
            raise ValueError(f"row count must be >= 0, got {n}")
        self.folder, self.n, self.key, self.shard_bytes = Path(folder), int(n), key, shard_bytes
        self.dim = None
        self.shard_rows = None
        self._open = {}        # shard index -> (float32 buffer, rows filled)
        self._entries = {}     # shard index -> manifest entry
        self._stage = None
        self._tmp = None

    def __enter__(self):
        self._stage = staged_dir(self.folder)
        self._tmp = self._stage.__enter__()
        return self

    def _rows_of(self, s: int) -> int:
        return min(self.shard_rows, self.n - s * self.shard_rows)

    def write(self, index, rows) -> None:
        """Rows `rows` [B, dim] (tensor or array) at positions `index` [B]."""
        rows = rows.detach().float().cpu().numpy() if torch.is_tensor(rows) \
            else np.asarray(rows, np.float32)
        index = index.cpu().numpy() if torch.is_tensor(index) else np.asarray(index)
        index = index.astype(np.int64)
        if rows.ndim != 2 or len(rows) != len(index):
            raise ValueError(f"rows must be [B, F] with B = len(index); got "
                             f"{tuple(rows.shape)} and {len(index)} positions")
        if self.dim is None:
            self.dim = int(rows.shape[1])
            self.shard_rows = max(1, self.shard_bytes // (2 * max(1, self.dim)))
        elif rows.shape[1] != self.dim:
            raise ValueError(f"rows have {rows.shape[1]} features, earlier ones {self.dim}")
        if len(index) and (index.min() < 0 or index.max() >= self.n):
            raise ValueError(f"row positions must lie in [0, {self.n})")
        shard = index // self.shard_rows
        for s in np.unique(shard):
            s = int(s)
            if s in self._entries:
                raise ValueError(f"shard {s} of {self.folder} was already complete")
            buf, filled = self._open.get(s) or (np.empty((self._rows_of(s), self.dim),
                                                         np.float32), 0)
            sel = shard == s
            buf[index[sel] - s * self.shard_rows] = rows[sel]
            filled += int(sel.sum())
            if filled >= len(buf):
                self._flush(s, buf)
                self._open.pop(s, None)
            else:
                self._open[s] = (buf, filled)

    def _flush(self, s: int, buf: np.ndarray) -> None:
        big = len(buf) and float(np.abs(buf).max()) > FLOAT16_MAX
        if not np.isfinite(buf).all():
            raise ValueError(f"non-finite features in shard {s} of {self.folder}")
        dtype = np.float32 if big else np.float16
        name = f"shard-{s:05d}.npy"
        np.save(self._tmp / name, buf.astype(dtype, copy=False))
        self._entries[s] = {"file": name, "rows": len(buf), "dtype": np.dtype(dtype).name}

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self.n == 0:
                    self.dim, self.shard_rows = self.dim or 0, 1
                n_shards = 0 if self.n == 0 else -(-self.n // self.shard_rows)
                missing = [s for s in range(n_shards) if s not in self._entries]
                if missing or self._open:
                    raise ValueError(f"{self.folder}: rows missing in shard(s) "
                                     f"{missing[:5]} of {n_shards}")
                entries = [self._entries[s] for s in range(n_shards)]
                dtypes = {e["dtype"] for e in entries}
                manifest = {"format": FORMAT, "version": VERSION, "key": self.key,
                            "n": self.n, "dim": self.dim,
                            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
                            "shards": entries}
                (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        except BaseException:
            self._stage.__exit__(*sys.exc_info())
            raise
        return self._stage.__exit__(exc_type, exc, tb)


def write_shards(folder, features, *, key: str = "", shard_bytes: int = SHARD_BYTES
                 ) -> FeatureShards:
    """Write a whole [N, F] tensor/array as a shard folder and open it."""
    with ShardWriter(folder, len(features), key=key, shard_bytes=shard_bytes) as w:
        step = max(1, shard_bytes // 8)
        for start in range(0, len(features), step):
            block = features[start:start + step]
            w.write(np.arange(start, start + len(block)), block)
    return open_shards(folder, key=key)


def open_shards(folder, *, key: str | None = None) -> FeatureShards | None:
    """The shard folder memory-mapped read-only, or None when it is absent, incomplete,
    damaged or (with `key`) written for another key: a cache miss, never an error."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            return None
        if key is not None and manifest.get("key") != key:
            return None
        dim, shards = int(manifest["dim"]), []
        for entry in manifest["shards"]:
            arr = np.load(folder / entry["file"], mmap_mode="r")
            if arr.shape != (int(entry["rows"]), dim) or arr.dtype.name != entry["dtype"]:
                return None
            shards.append(arr)
        if sum(len(s) for s in shards) != int(manifest["n"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not shards:
        shards = [np.zeros((0, dim), np.float16)]
    return FeatureShards(shards, dim, key=manifest.get("key", ""), folder=folder)
