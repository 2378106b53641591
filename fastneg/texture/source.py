"""Where a training step's texture NS come from, whatever the bank's storage: decided here, once.

    source = texture_source(bank_folder)                  # reads index.json: its storage
    build_loader(..., texture_bank=source.loader_bank)    # the bank the loader fetches, or None
    source.prepare(device, expect=data / "train")         # a bank held whole: loaded now
    tex = source.textures(batch, seed=s, draw_step=t, size=224)   # uint8 [N, size, size, 3]

A jpeg bank is read by the loader like the images (FromLoader: each batch's textures arrive
cropped and flipped in batch.textures, per (seed, epoch, dataset index)). A raw bank, which the
loaders do not read, is held whole on the device (HeldBank over a TextureBank) and each step
takes a random resized crop of each sample's texture (fastneg.kernels.sample_textures, per
(seed, draw_step, row)). The trainer (fastneg.train), the loaders (which refuse a bank that is
not theirs) and fastneg.step all ask this module rather than the storage.
"""
from __future__ import annotations

from pathlib import Path

from fastneg.texture.store import TextureBank, read_index, storage_of

LOADER_STORAGE = "jpeg"   # the storage the loaders (and `fastneg convert --texture-bank`) read


def fetched_by_loader(meta: dict) -> bool:
    """Whether the loaders read the bank of this index.json (else it is held whole)."""
    return storage_of(meta) == LOADER_STORAGE


class TextureSource:
    """The texture NS input of a run (see the module docstring).

    loader_bank: the bank folder a loader must be built with (build_loader's and
    convert_to_beton's texture_bank=), or None when the textures do not come with the batches.
    """
    loader_bank: str | None = None

    def prepare(self, device, *, expect=None) -> TextureSource:
        """Get ready to give textures on `device` (loads a bank held whole); returns self."""
        return self

    def ready(self, batch) -> bool:
        """Whether textures(batch, ...) can give this batch's textures."""
        raise NotImplementedError

    def textures(self, batch, *, seed: int, draw_step: int, size: int):
        """uint8 [N, size, size, 3]: the texture of each sample of `batch`, randomly cropped to
        size x size and flipped, on the batch's device."""
        raise NotImplementedError


class FromLoader(TextureSource):
    """The loader fetches and crops the textures with the images: batch.textures."""

    def __init__(self, path=None):
        self.loader_bank = None if path is None else str(path)

    def ready(self, batch) -> bool:
        return getattr(batch, "textures", None) is not None

    def textures(self, batch, *, seed: int, draw_step: int, size: int):
        if not self.ready(batch):
            raise ValueError("the batch carries no textures: build its loader with "
                             f"texture_bank={self.loader_bank or 'BANK'}")
        return batch.textures


class HeldBank(TextureSource):
    """A bank held whole (a TextureBank, or any object with for_batch(indices) -> (bank, ids)):
    each step crops each sample's texture from it."""

    def __init__(self, bank=None, *, path=None):
        self.bank, self.path = bank, path

    def prepare(self, device, *, expect=None) -> HeldBank:
        if self.bank is None:
            self.bank = TextureBank.load(self.path, device, expect=expect)
        return self

    def ready(self, batch) -> bool:
        return self.bank is not None

    def textures(self, batch, *, seed: int, draw_step: int, size: int):
        from fastneg.kernels import sample_textures
        if self.bank is None:
            raise ValueError(f"texture bank {self.path} is not loaded: call prepare(device)")
        bank, ids = self.bank.for_batch(batch.indices)
        # The rows come from the bank's own map, so the id range check (a host sync on CUDA) is
        # only done on the CPU.
        return sample_textures(bank, ids, size=size, seed=seed, step=draw_step,
                               check_ids=ids.device.type == "cpu")


def texture_source(path) -> TextureSource:
    """The source of the bank folder `path`: FromLoader for a bank the loaders read (jpeg),
    else HeldBank (raw), to be loaded by prepare(device). Errors of read_index pass through."""
    if fetched_by_loader(read_index(path)):
        return FromLoader(path)
    return HeldBank(path=Path(path))


def as_texture_source(textures) -> TextureSource:
    """fastneg.step's `textures` argument as a source: a TextureSource itself, None (the
    batches carry them: FromLoader), or an object with for_batch (HeldBank)."""
    if isinstance(textures, TextureSource):
        return textures
    if textures is None:
        return FromLoader()
    return HeldBank(textures)
