"""fastneg: contrastive learning with non-semantic negatives at GPU speed."""
from fastneg.versions import check as _check_versions

# Below the supported floor (fastneg.versions.FLOOR) fail here, in one line naming the package
# and the version needed, rather than later from inside torch or numba.
_check_versions()
