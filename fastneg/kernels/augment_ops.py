"""Constants shared by the implementations of aug-plus (fastneg.augment's torch path and its
fused kernels), and by everything that normalizes or un-normalizes images.
"""

# Colour-jitter op ids, as torchvision's ColorJitter fn_idx; a sample's jitter order is a
# permutation of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

LUMA = (0.2989, 0.587, 0.114)            # torchvision's rgb_to_grayscale weights

# ImageNet normalization: (x / 255 - mean) / std per channel (R, G, B).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
