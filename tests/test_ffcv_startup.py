"""What a second FFCV process no longer compiles: FFCV's typed dict at import
(fastneg.data.ffcv_import) and fastneg's decode kernels (loaded from Numba's cache)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastneg.data import convert
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.texture.build import write_bank_from_arrays

pytest.importorskip("ffcv")

PROBE = """
import numba.typed
from fastneg.data.ffcv_import import import_ffcv
ffcv = import_ffcv()
from ffcv.fields.rgb_image import IMAGE_MODES
from numba.typed.typeddict import Dict as TypedDict
assert type(IMAGE_MODES) is dict and IMAGE_MODES == {"jpg": 0, "raw": 1}, IMAGE_MODES
assert numba.typed.Dict is TypedDict, numba.typed.Dict         # the lazy attribute is back
assert import_ffcv() is ffcv and ffcv.__name__ == "ffcv"
d = numba.typed.Dict.empty(numba.types.unicode_type, numba.types.int64)
print("ok", type(d).__name__)
"""


def test_ffcv_imports_with_a_plain_image_mode_table_and_numba_is_left_as_it_was():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "Dict"]


DECODE = """
import sys
from fastneg.loaders import build_loader
from fastneg.loaders import ffcv as backend
loader = build_loader("ffcv", sys.argv[1], batch_size=4, size=32, device="cpu", workers=2,
                      texture_bank=sys.argv[2])
batch = next(iter(loader))
assert batch.views[0].shape == (4, 32, 32, 3) and batch.textures.shape == (4, 32, 32, 3)
for kernel in (backend._decode_crops, backend._decode_textures):
    print(kernel.__name__, sum(kernel.stats.cache_hits.values()),
          sum(kernel.stats.cache_misses.values()))
"""


def test_a_second_process_loads_the_ffcv_decode_kernels_from_the_cache(tmp_path):
    make_dataset(tmp_path / "d", DatasetSpec(images_per_class=4, size=32), progress=False)
    train = tmp_path / "d" / "train"
    n = len(scan_image_folder(train))
    bank = write_bank_from_arrays(train, tmp_path / "bank",
                                  (np.full((24, 24, 3), i, np.uint8) for i in range(n)),
                                  quality=90, algorithm="constant (test)")
    beton = tmp_path / "d.beton"
    convert.convert_to_beton(train, beton, progress=False, workers=1, texture_bank=bank)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    runs = [subprocess.run([sys.executable, "-c", DECODE, str(beton), str(bank)],
                           capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = ({ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines()}
                     for r in runs)
    for name in ("_decode_crops", "_decode_textures"):
        assert first[name] == ["0", "1"], first        # compiled, then written to the cache
        assert second[name] == ["1", "0"], second      # loaded, nothing compiled
