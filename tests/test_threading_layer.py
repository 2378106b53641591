"""fastneg picks Numba's threading layer (fastneg.kernels.jit): omp before tbb, the user's choice
kept."""
import os
import subprocess
import sys

PROBE = ("import torch, numba\n"
         "from fastneg.kernels import patch_negatives\n"
         "patch_negatives(torch.rand(2, 3, 16, 16), layout='nchw', patch_range=(2, 5), seed=0)\n"
         "print(numba.threading_layer())\n")


def _layer(**env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env.update(env_overrides)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=300)
    return done.returncode, done.stdout.strip(), done.stderr


def _omp_available() -> bool:
    code = ("import numba, numpy as np\n"
            "numba.config.THREADING_LAYER = 'omp'\n"
            "@numba.njit(parallel=True)\n"
            "def fill(a):\n"
            "    for i in numba.prange(a.shape[0]):\n"
            "        a[i] = i\n"
            "fill(np.zeros(4))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          timeout=300).returncode == 0


def test_the_kernels_run_under_omp_when_numba_can_load_it():
    rc, layer, err = _layer()
    assert rc == 0, err
    if _omp_available():
        assert layer == "omp"
    else:
        assert layer in ("tbb", "workqueue")


def test_a_threading_layer_the_user_set_is_kept():
    rc, layer, err = _layer(NUMBA_THREADING_LAYER="workqueue")
    assert rc == 0, err
    assert layer == "workqueue"
