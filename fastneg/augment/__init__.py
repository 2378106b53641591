"""fastneg.augment: MoCo-v2 aug-plus on whole batches, on any device.

    mocov2      MoCoV2Augment (the draws; apply() picks the back end by device), AugParams
    cpu         the fused Numba CPU kernel
    cuda        the fused Numba CUDA kernel (numba.cuda imported on first use)
    torch_ops   batched torch ops: other devices, and the reference the kernels are tested against
    pixels      the per-pixel formulas both kernels compile from one source
"""
from fastneg.augment.mocov2 import (MAX_VIEWS, OUT_DTYPES, SLOTS_PER_VIEW, AugParams,
                                    MoCoV2Augment, to_device)
from fastneg.augment.torch_ops import BLUR_KERNEL_FRACTION, blur_kernel_size
from fastneg.kernels.augment_ops import (BRIGHTNESS, CONTRAST, HUE, IMAGENET_MEAN, IMAGENET_STD,
                                         LUMA, SATURATION)

__all__ = ["AugParams", "MoCoV2Augment", "to_device", "blur_kernel_size", "OUT_DTYPES",
           "MAX_VIEWS", "SLOTS_PER_VIEW", "BLUR_KERNEL_FRACTION", "IMAGENET_MEAN",
           "IMAGENET_STD", "LUMA", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"]
