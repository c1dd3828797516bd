"""Performance benchmarks of the brainsex pipeline (issue 8).

Run ``python -m benchmarks [--quick | --full] [--out benchmarks/results] [--repeats N]`` from the repository
root; see ``benchmarks/README.md``. ``benchmarks/gpu.py`` is the paper-profile script for a GPU.

Nothing heavy is imported here, so ``python benchmarks/gpu.py`` and ``python -m benchmarks`` start fast.
"""
