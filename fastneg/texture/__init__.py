"""Texture negatives: synthesis (image quilting), building banks (fastneg.texture.build), reading
them (fastneg.texture.store) and the one decision of where a run's textures come from
(fastneg.texture.source).

    from fastneg.texture import TextureBank, texture_source
    bank = TextureBank.load("banks/shapes", "cuda", expect="data/shapes/train")
    bank.textures                 # uint8 [rows, size, size, 3] on the device
    bank.rows_for(batch.indices)  # texture row of each sample (identity for a full bank)
    tex = sample_textures(*bank.for_batch(batch.indices), size=224, seed=s, step=t)

    source = texture_source("banks/shapes")   # jpeg: the loader fetches; raw: held whole
"""
from fastneg.texture.build import BankSpec, build_bank, write_bank_from_arrays, write_preview
from fastneg.texture.source import TextureSource, texture_source
from fastneg.texture.store import BankReader, TextureBank
from fastneg.texture.synthesis import quilt, synthesize

__all__ = ["BankReader", "BankSpec", "TextureBank", "TextureSource", "build_bank", "quilt",
           "synthesize", "texture_source", "write_bank_from_arrays", "write_preview"]
