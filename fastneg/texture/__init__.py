"""Texture negatives: synthesis (image quilting) and the texture bank (build, store, load).

    from fastneg.texture import TextureBank
    bank = TextureBank.load("banks/shapes", "cuda", expect="data/shapes/train")
    bank.textures                 # uint8 [rows, size, size, 3] on the device
    bank.rows_for(batch.indices)  # texture row of each sample (identity for a full bank)
    tex = sample_textures(*bank.for_batch(batch.indices), size=224, seed=s, step=t)
"""
from fastneg.texture.bank import BankSpec, TextureBank, build_bank, write_preview
from fastneg.texture.synthesis import quilt, synthesize

__all__ = ["BankSpec", "TextureBank", "build_bank", "quilt", "synthesize", "write_preview"]
