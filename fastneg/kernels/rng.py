"""The one random number generator of the data path: stateless and counter-based.

Every random draw in fastneg is ``mix(seed, step, sample, slot)``: a pure function of *where* the
draw is used, never of what was drawn before. Workers, ranks, epochs and devices therefore never
share or repeat a stream, and a run resumed at step t draws exactly what an uninterrupted run
would have drawn.

The functions below are plain Python over ``np.uint64`` so the same source runs three ways:
interpreted (the reference, slow), ``numba.njit`` for CPU kernels and
``numba.cuda.jit(device=True)`` for CUDA kernels. Keep them free of Python objects.

Slots: each consumer owns a *stream* (the high bits of ``slot``) so that, say, the patch-size
draw of sample i never equals the crop draw of the same sample. ``slot = stream << 20 | index``.
"""
import numbers
import types

import numba
import numpy as np

# Streams (high bits of the slot). Add new consumers here, never reuse a number.
STREAM_PATCH = 1      # fastneg.kernels.patch_negatives
STREAM_TEXTURE = 2    # fastneg.kernels.sample_textures
STREAM_AUGMENT = 3    # fastneg.augment.MoCoV2Augment
STREAM_CROP = 4       # fastneg.loaders random resized crops
STREAM_SHUFFLE = 5    # fastneg.loaders epoch order
STREAM_TEXSYN = 6     # fastneg.texture synthesis
STREAM_DATA = 7       # fastneg.data synthetic dataset
STREAM_CORRUPT = 8    # fastneg.eval.corrupt corruptions
STREAM_SHUFFLE_BN = 9  # fastneg.moco shuffle-BN permutation
STREAM_PHOTOS = 10    # fastneg.data.photos crops

SLOT_BITS = 20        # up to ~1M draws per (stream, sample)
COUNTER_LIMIT = 2 ** 63   # seed, step, sample and slot are integers in [0, COUNTER_LIMIT)


def check_counter(name, value):
    """`value` as an int, or ValueError naming `name` unless it is an integer the RNG takes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value < COUNTER_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def _splitmix64(z):
    """One SplitMix64 finalizer round (Steele, Lea, Flood 2014) on a uint64."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix(seed, step, sample, slot):
    """uint32 draw for (seed, step, sample, slot); each argument a non-negative integer < 2**63."""
    z = _splitmix64(np.uint64(seed))
    z = _splitmix64(z ^ np.uint64(step))
    z = _splitmix64(z ^ np.uint64(sample))
    z = _splitmix64(z ^ np.uint64(slot))
    return np.uint32(z >> np.uint64(32))


def _uniform(seed, step, sample, slot):
    """float64 in [0, 1) with 32 random bits."""
    return np.float64(_mix(seed, step, sample, slot)) * (1.0 / 4294967296.0)


def _randint(seed, step, sample, slot, lo, hi):
    """Integer in [lo, hi], both ends included, by multiply-shift (bias < (hi-lo+1) / 2**32)."""
    span = np.uint64(hi - lo + 1)
    return lo + np.int64((np.uint64(_mix(seed, step, sample, slot)) * span) >> np.uint64(32))


# Interpreted versions (for references and tests): numpy warns on the intended uint64 wrap-around.
def mix(seed, step, sample, slot):
    with np.errstate(over="ignore"):
        return int(_mix(seed, step, sample, slot))


def uniform(seed, step, sample, slot):
    with np.errstate(over="ignore"):
        return float(_uniform(seed, step, sample, slot))


def randint(seed, step, sample, slot, lo, hi):
    with np.errstate(over="ignore"):
        return int(_randint(seed, step, sample, slot, lo, hi))


def slot(stream, index):
    """The slot number of draw `index` in consumer `stream`."""
    return (stream << SLOT_BITS) | index


def _rebind(fn, names):
    """A copy of `fn` whose global names resolve first in `names`, so one source compiles per target."""
    return types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__)


def _compile(jit):
    """(mix, uniform, randint) compiled with `jit`, each calling the compiled helpers below it."""
    names = {}
    names["_splitmix64"] = jit(_rebind(_splitmix64, names))
    names["_mix"] = jit(_rebind(_mix, names))
    return names["_mix"], jit(_rebind(_uniform, names)), jit(_rebind(_randint, names))


# CPU versions, inlined into the Numba kernels that call them.
mix_cpu, uniform_cpu, randint_cpu = _compile(numba.njit(inline="always"))


def numpy_aliases_for_numba_cuda() -> None:
    """numba-cuda 0.30.4 (the newest release) registers an overload of np.row_stack when it
    compiles its first kernel; numpy 2.5 removed that alias of np.vstack, so with numpy 2.5
    (what GPU machines ship) every CUDA kernel failed to compile with "module 'numpy' has no
    attribute 'row_stack'" (found by `make test-compat`). Give numpy the alias back, only where
    it is missing. Called before anything of fastneg compiles for CUDA."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def cuda_device_jit():
    """The decorator for fastneg's CUDA device functions: numba.cuda.jit(device=True), inlined
    into their callers at the NVVM level (forceinline; numba-cuda deprecates inline=True).
    Numba's CUDA simulator knows no forceinline and gets plain device functions."""
    numpy_aliases_for_numba_cuda()
    from numba import config, cuda
    if config.ENABLE_CUDASIM:
        return cuda.jit(device=True)
    return cuda.jit(device=True, forceinline=True)


def cuda_functions():
    """(mix, uniform, randint) as CUDA device functions. Imports numba.cuda only when called."""
    return _compile(cuda_device_jit())
