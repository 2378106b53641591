"""Non-semantic negative kernels (Numba, CPU and CUDA) and the shared counter-based RNG.

    from fastneg.kernels import patch_negatives, sample_textures

Importing this package never imports numba.cuda: the CUDA kernels are compiled the first time
a CUDA tensor arrives.
"""
from fastneg.kernels.patch import patch_negatives
from fastneg.kernels.textures import sample_textures

__all__ = ["patch_negatives", "sample_textures"]
