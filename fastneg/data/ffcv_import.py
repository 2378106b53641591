"""Import FFCV without the Numba compilation its import triggers in every process.

ffcv.fields.rgb_image builds IMAGE_MODES, a two-entry table from image mode name to code, as a
numba.typed.Dict when it is imported. Creating and filling that dictionary compiles Numba's
typed-dict code, which Numba does not cache: 2.4 s of a 3.8 s `import ffcv.loader`, in every
process that uses FFCV (2-core AMD EPYC; `python -X importtime -c "import ffcv.loader"`). FFCV
reads the table only from Python, never from compiled code, and a plain dict answers the same
there. import_ffcv() imports FFCV with numba.typed.Dict replaced by dict for the duration of
that one import.

Everything in fastneg that imports FFCV calls import_ffcv() first. Imports nothing from fastneg.
"""
from __future__ import annotations

import importlib
import sys
import threading

_lock = threading.Lock()


def import_ffcv():
    """Import FFCV (once per process) and return the ffcv module. Raises FFCV's ImportError when
    it is not installed."""
    with _lock:
        if "ffcv.fields.rgb_image" not in sys.modules:
            import numba.typed
            # numba.typed resolves Dict lazily (module __getattr__); an attribute set here wins
            # over that lookup until it is deleted again.
            numba.typed.Dict = dict
            try:
                importlib.import_module("ffcv.fields.rgb_image")
            finally:
                del numba.typed.Dict
    return importlib.import_module("ffcv")
