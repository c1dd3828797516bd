"""A phantom matched to a real run, so that a real-data book can still check its methods.

On real scans nobody knows which regions differ between the sexes, so the validity checks
(:mod:`brainsex.validity`) have nothing to score a region ranking against. :func:`matched_phantom_run`
builds, inside the real run's directory, a small run of the book's phantom (planted sex differences,
the manifest's ``phantom`` entry) with the *same* grid, model widths and training settings as the real
run, its size capped for time: generated, preprocessed, split, trained and evaluated with the same
public stage functions the chapters use. The validity chapter then runs its checks on that run.

Everything is cached under ``<run_dir>/validity/matched_phantom/`` (a run directory of its own with
the usual layout): the phantom and preprocessing are reused when they match, training resumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from brainsex import BrainsexError

__all__ = ["matched_phantom_run"]
#: Smallest matched phantom (the smoke profile's size, the smallest the validity checks are run at).
MIN_SUBJECTS = 48


def matched_phantom_run(
    run_dir: str | os.PathLike,
    manifest: str | os.PathLike = "data_manifest.yaml",
    n_subjects: int | None = 160,
    voxel_size: float = 4.0,
    channels: Sequence[int] = (8, 16, 32, 32, 32, 16),
    epochs: int = 24,
    batch_size: int = 16,
    lr: float = 0.01,
    scheduler: str = "plateau",
    select: str = "last",
    device: str = "cpu",
    seed: int = 0,
    n_workers: int = 1,
) -> Path:
    """Build (or reuse) a phantom run matched to a real run; return its run directory.

    Parameters
    ----------
    run_dir : path
        The real run's directory.
    manifest : path
        ``data_manifest.yaml``; its ``phantom`` entry (``kind: synthetic``) defines the phantom.
    n_subjects : int or None, default=160
        Phantom size: the real cohort's size (``cohort/participants.tsv``) capped at this number, and
        at least :data:`MIN_SUBJECTS`.
    voxel_size, channels, epochs, batch_size, lr, scheduler, select, device, seed, n_workers
        The real run's grid and training settings (its profile's parameters).

    Returns
    -------
    pathlib.Path
        ``<run_dir>/validity/matched_phantom``, holding ``cohort/``, ``preprocess/``, ``train/`` and
        ``evaluate/predictions.tsv`` like a book run.
    """
    from brainsex.cohorts import load_cohorts
    from brainsex.io import read_table, write_table
    from brainsex.manifest import Manifest, load_manifest
    from brainsex.preprocess import preprocess_cohort, recorded_registration
    from brainsex.run import RunDir
    from brainsex.stages import predict_split, split_subjects, train_model

    real = RunDir(run_dir)
    out = RunDir(real.validity.matched_phantom)
    m = load_manifest(manifest)
    phantoms = [c for c in m.cohorts if c.kind == "synthetic"]
    if not phantoms:
        raise BrainsexError(f"{m.path}: no synthetic cohort to build a matched phantom from")
    entry = phantoms[0].model_copy(update={"enabled": True})
    n_real = len(read_table(real.cohort.participants)) if real.cohort.participants.is_file() else None
    n = min(x for x in (n_real, n_subjects) if x is not None) if (n_real or n_subjects) else None
    if n is not None and n < MIN_SUBJECTS:
        n = MIN_SUBJECTS  # enough test scans to explain, whatever the real cohort's size
    participants, _ = load_cohorts(Manifest(cohorts=[entry]), [entry.name], run_dir=out.root, n=n,
                                   voxel_size=voxel_size, seed=seed, n_workers=n_workers, progress=False)
    # the real run's registration (its subjects' markers), so that the phantom is preprocessed like it
    registration = (recorded_registration(read_table(real.preprocess.table), real.preprocess.root)
                    if real.preprocess.table.is_file() else "rigid+affine")
    pre = preprocess_cohort(participants, out.preprocess, voxel_size=voxel_size, n_workers=n_workers,
                            progress=False, registration=registration)
    split = split_subjects(pre, seed=seed, out=out.train)
    params = {"channels": list(channels), "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
              "scheduler": scheduler, "select": select, "device": device, "seed": int(seed)}
    result = train_model(split, params, out.train, resume="auto", progress=False)
    write_table(predict_split(result.model, split, split="test", device=device), out.evaluate.predictions)
    return out.root
