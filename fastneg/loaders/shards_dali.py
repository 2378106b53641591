"""The DALI backend over tar shards (fastneg.data.shards; plan and rules:
fastneg.loaders.shards).

The pipeline is the ImageFolder one (fastneg.loaders.dali: decoders.image once per sample,
"mixed" on a GPU and "cpu" with device_id=None otherwise, one resize(roi) per view, textures
decoded with the images), fed by an external_source that reads this rank's shards as one
sequential stream (Python's tarfile: local files, pipe: commands, URLs) in the pipeline's own
thread (never in forked workers: a stream has state), with the crop windows from fastneg's RNG
and the labels passed through.

Why not fn.readers.webdataset (which reads the same shards with the DALI index files that
`fastneg convert --to wds` writes beside them): its shard_id / num_shards split the samples of
all shards into contiguous ranges (a rank would share boundary shards and open every file
listed), its shuffle draws from DALI's own RNG, and it has no image sizes before decoding, so
the order and the crop windows could not be fastneg's, shared with the torch backend.

Decode failures: DALI ends a pipeline on one. The samples of the batches fed but not yet
yielded are decoded again with PIL to find the failing ones; with skip_bad they are left out,
their batches topped up from the stream and fed again to a new pipeline (one rebuild per
failure); without skip_bad, UnreadableFiles names them.
"""
from __future__ import annotations

import io
import weakref
from collections import deque

import numpy as np

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderConfig, crop_boxes, texture_params
from fastneg.loaders.dali import _LIVE, Loader, _window
from fastneg.loaders.shards import ShardLoaderBase, take


class _Feed:
    """The external_source callback: the loader's next batch (held weakly: the pipeline must
    not keep its loader alive)."""

    def __init__(self, loader: "ShardLoader"):
        self.loader = weakref.ref(loader)

    def __call__(self, info):
        loader = self.loader()
        if loader is None:
            raise StopIteration
        return loader._next_input()


class ShardLoader(ShardLoaderBase, Loader):
    """build_loader("dali", SHARDS): Loader's contract over tar shards."""
    kind = "dali"
    _passthrough = ("labels",)

    def __init__(self, data, cfg: LoaderConfig):
        self._init_shards(data, cfg)
        self._on_gpu = cfg.device.type == "cuda"
        one = np.ones(1, np.int64)
        crop_boxes(cfg, 0, one, one, one, 0)       # compile now
        self._table = None
        self._outputs, self._dali_epoch, self._fresh, self.builds = None, 0, False, 0
        self._stream, self._epoch_fed = None, 0
        self._feed_left, self._feed_error = 0, None
        self._redo: list[list] = []          # batches to feed again after a rebuild
        self._fed: deque = deque()           # batches fed to DALI and not yet yielded
        _LIVE.add(self)

    def _source(self):
        return _Feed(self), False

    def _next_input(self):
        """The external_source's batch: the next one of the epoch, or StopIteration at its end.
        A reading error is kept for _batches to raise (raised here, DALI would wrap it)."""
        if self._feed_left <= 0 or self._feed_error is not None:
            raise StopIteration
        try:
            samples = self._redo.pop(0) if self._redo else take(self._stream,
                                                                self.cfg.batch_size)
        except Exception as e:   # noqa: BLE001 - handed to the consumer by _batches
            self._feed_error = e
            raise StopIteration from None
        self._feed_left -= 1
        self._fed.append(samples)
        self._info.add(samples)
        cfg, epoch = self.cfg, self._epoch_fed
        idx = np.array([s.index for s in samples], np.int64)
        heights = np.array([s.height for s in samples], np.int64)
        widths = np.array([s.width for s in samples], np.int64)
        encoded = [np.frombuffer(s.data, np.uint8) for s in samples]
        windows = []
        for v in range(cfg.views):
            windows += _window(crop_boxes(cfg, epoch, idx, heights, widths, v))
        labels = np.array([s.label for s in samples], np.int64)
        if self._bank is None:
            return (encoded, idx, *windows, labels)
        textures = [self._bank.encoded(r) for r in self._bank.rows_for(idx).tolist()]
        params = texture_params(cfg.seed, epoch, idx, self._bank.size)
        return (encoded, idx, *windows, textures, *_window(params[:, :4]),
                params[:, 4].astype(np.int32), labels)

    def _restart(self) -> None:
        if self._outputs is None:
            self._build()
        elif not self._fresh:
            self._outputs.reset()
        self._fresh = False

    def _batches(self, epoch, samples=None):
        cfg = self.cfg
        names = self._names()
        self._stream, self._epoch_fed = self.plan.stream(epoch), epoch
        self._feed_left, self._feed_error, self._redo = len(self), None, []
        self._fed.clear()
        left = len(self)
        try:
            while left:
                self._restart()
                finished = False
                try:
                    while True:
                        try:
                            out = next(self._outputs)[0]
                        except StopIteration:
                            break
                        self._fed.popleft()
                        yield Batch(tuple(out[n] for n in names[:cfg.views]), out["labels"],
                                    out["indices"], out.get("textures"))
                        left -= 1
                    finished = True
                except RuntimeError as e:
                    self._drop_pipeline()
                    self._recover(epoch, e)
                finally:
                    if not finished and self._outputs is not None:
                        self._drop_pipeline()   # left mid-epoch: DALI cannot reset there
                if self._feed_error is not None:
                    raise self._feed_error
                if finished and left:
                    raise RuntimeError(f"DALI ended epoch {epoch} after {len(self) - left} of "
                                       f"{len(self)} batches")
        finally:
            self._stream.close()

    def _recover(self, epoch: int, error: RuntimeError) -> None:
        """After a DALI failure: find the samples PIL cannot decode among the batches in flight,
        report them (skip_or_raise) and queue those batches again, topped up from the stream."""
        from PIL import Image

        pending = list(self._fed)
        self._fed.clear()
        failures, bad = [], set()
        for batch in pending:
            for s in batch:
                try:
                    with Image.open(io.BytesIO(s.data)) as im:
                        im.load()
                except Exception as e:   # noqa: BLE001 - any failure names the sample
                    failures.append((s.where, f"cannot be decoded ({e})"))
                    bad.add(id(s))
        if not failures:
            raise RuntimeError(f"DALI failed in epoch {epoch} on samples that PIL decodes: "
                               f"{error}") from error
        self.skip_or_raise(failures)
        redo = []
        for batch in pending:
            kept = [s for s in batch if id(s) not in bad]
            redo.append(kept + take(self._stream, self.cfg.batch_size - len(kept)))
        self._redo = redo + self._redo
        self._feed_left += len(pending)
