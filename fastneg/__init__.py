"""fastneg: contrastive learning with non-semantic negatives at GPU speed.

Importing fastneg sets one process default, unless the environment already sets it:
OMP_WAIT_POLICY=PASSIVE. Numba's CPU kernels run on a GNU OpenMP pool of their own, beside
torch's; with the default wait policy each pool's idle threads spin for milliseconds after
every parallel region, on the cores the other pool needs (measured on 2 cores: patch_negatives
at about half speed right after a torch op; benchmarks/plain_process.py). A runtime reads the
variable when it loads: Numba's pool always loads later; torch's only when fastneg is imported
before torch. A value set by the user wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastneg.versions import check as _check_versions  # noqa: E402

# Below the supported floor (fastneg.versions.FLOOR) fail here, in one line naming the package
# and the version needed, rather than later from inside torch or numba.
_check_versions()
