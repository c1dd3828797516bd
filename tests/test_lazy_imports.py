"""Heavy libraries are imported only where a step uses them (issue 17: every chapter kernel pays its imports).

Each check runs in a fresh interpreter, since this test session has imported everything already.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this package on its path, no thread settings inherited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_set_threads_1_leaves_torch_unimported_and_a_later_torch_single_threaded():
    out = run_fresh(
        "import sys\n"
        "from brainsex.registration import set_threads\n"
        "set_threads(1)\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.get_num_threads())\n")
    assert out.split() == ["False", "1"]


@pytest.mark.parametrize("n", [1, 2])
def test_set_threads_sets_an_imported_torch(n):
    out = run_fresh(
        "import torch\n"
        "torch.set_num_threads(3)\n"
        "from brainsex.registration import set_threads\n"
        f"set_threads({n})\n"
        "print(torch.get_num_threads())\n")
    assert out == str(n)


def test_atlas_on_the_same_grid_needs_no_nilearn():
    out = run_fresh(
        "import sys\n"
        "import nibabel as nib\n"
        "import numpy as np\n"
        "from brainsex.atlas import resample_atlas_to\n"
        "aff = np.diag([2.0, 2.0, 2.0, 1.0])\n"
        "lab = np.zeros((6, 6, 6), np.int16); lab[2:4, 2:4, 2:4] = 3\n"
        "same = resample_atlas_to(nib.Nifti1Image(lab, aff), nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), aff))\n"
        "print(int(same.get_fdata().max()), 'nilearn' in sys.modules)\n"
        "other = np.diag([1.0, 1.0, 1.0, 1.0])\n"
        "moved = resample_atlas_to(nib.Nifti1Image(lab, aff), nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), other))\n"
        "print(int(moved.get_fdata().max()), 'nilearn' in sys.modules)\n")
    assert out.splitlines() == ["3 False", "3 True"]
