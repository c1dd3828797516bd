"""The modelling stages, split -> train -> predict -> evaluate, as one set of functions.

The training chapter (``notebooks/02_training.py``), the evaluation chapter, the command line
(``brainsex train``, :func:`brainsex.stages.main_train`) and the validity study
(:func:`brainsex.validity.study`) all call these, so they split with the same rule (paper section
2.5: stratified by sex, vendor and field strength, 80/10/10), run the same leakage check, keep the
checkpoint chosen by the profile's ``select`` rule and compute accuracy with
:func:`brainsex.evaluate.metrics`.

- :func:`split_subjects`: the preprocessed subjects that are usable, split; ``split.tsv`` written.
- :func:`train_model`: :func:`brainsex.train.train` with the settings of a profile's parameters.
- :func:`predict_split`: P(male) for one subset, as the predictions table of
  :func:`brainsex.evaluate.make_predictions_table`.
- :func:`evaluate_predictions`: the metrics of a predictions table (``accuracy`` and the rest).
- :func:`train_run`: the first two on a run directory (what ``brainsex train`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from brainsex import BrainsexError
from brainsex.evaluate import make_predictions_table, metrics
from brainsex.io import read_table, write_table
from brainsex.run import RunDir, TrainDir
from brainsex.split import check_no_leakage, stratified_split
from brainsex.train import PAPER_CHANNELS, TrainConfig, TrainResult, predict, train

__all__ = [
    "main_train",
    "SPLIT_BY",
    "SPLIT_FRACTIONS",
    "usable",
    "split_subjects",
    "train_model",
    "predict_split",
    "evaluate_predictions",
    "train_run",
]

#: Stratification variables of the split (the paper's, section 2.5).
SPLIT_BY = ("sex", "vendor", "field")
#: Fractions of subjects for train, val and test (the paper's 80/10/10).
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def usable(preprocessed: pd.DataFrame) -> pd.DataFrame:
    """The rows of a preprocessed table whose ``status`` is ``ok`` (all rows when there is no status).

    Parameters
    ----------
    preprocessed
        ``preprocess/preprocessed.tsv`` (:attr:`brainsex.run.PreprocessDir.table`).
    """
    if "status" not in preprocessed.columns:
        return preprocessed.reset_index(drop=True)
    return preprocessed[preprocessed["status"].astype(str) == "ok"].reset_index(drop=True)


def split_subjects(
    preprocessed: pd.DataFrame,
    seed: int = 0,
    out: TrainDir | str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Split the usable subjects into train/val/test and check that none is in two subsets.

    The split is a function of the subjects and the seed only (:func:`brainsex.split.stratified_split`
    with :data:`SPLIT_BY` and :data:`SPLIT_FRACTIONS`), so re-running gives the same split, and a
    cohort or seed that changed gives a new one.

    Parameters
    ----------
    preprocessed
        ``preprocess/preprocessed.tsv``; rows whose ``status`` is not ``ok`` are left out.
    seed
        Seed of the split.
    out
        Training folder (:class:`brainsex.run.TrainDir` or its path) to write ``split.tsv`` into;
        None writes nothing.

    Returns
    -------
    pandas.DataFrame
        The usable rows with ``split`` (train/val/test) and ``stratum``.
    """
    table = usable(preprocessed)
    if len(table) == 0:
        raise BrainsexError("split_subjects: no preprocessed subject with status 'ok' to split")
    split = stratified_split(table, by=SPLIT_BY, fractions=SPLIT_FRACTIONS, seed=int(seed))
    check_no_leakage(split)
    if out is not None:
        write_table(split[["participant_id", "split", "stratum"]], TrainDir(out).split)
    return split


def train_model(
    split: pd.DataFrame,
    params: Mapping[str, Any],
    out_dir: TrainDir | str | os.PathLike,
    resume: bool | str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train SFCN on a split with a profile's settings (paper section 2.5).

    Parameters
    ----------
    split
        Rows with ``participant_id``, ``image_pp``, ``sex`` and ``split`` (:func:`split_subjects`);
        checked for leakage again, since a caller may have changed it (e.g. other images).
    params
        A profile's parameters (:func:`brainsex.profiles.resolve_profile`): every
        :class:`brainsex.train.TrainConfig` field present (``epochs``, ``batch_size``, ``lr``,
        ``select``, ``device``, ``seed``, ...), ``channels`` and ``dropout``. The checkpoint kept is
        the one of the profile's ``select`` rule.
    out_dir
        The training folder (:class:`brainsex.run.TrainDir` or its path).
    resume
        Passed to :func:`brainsex.train.train` (``"auto"``: continue when the settings match).
    progress
        Show progress bars.

    Returns
    -------
    brainsex.train.TrainResult
        The result; ``result.model`` is the selected model.
    """
    check_no_leakage(split)
    config = TrainConfig.from_params(dict(params))
    return train(split, config, out_dir=TrainDir(out_dir).root, channels=list(params.get("channels") or PAPER_CHANNELS),
                 dropout=float(params.get("dropout", 0.5)), resume=resume, progress=progress)


def predict_split(
    model: Any,
    table: pd.DataFrame,
    split: str = "test",
    device: str = "auto",
    progress: bool = False,
) -> pd.DataFrame:
    """P(male) of every subject of one subset, as a predictions table.

    Parameters
    ----------
    model
        A trained SFCN or the path of a checkpoint (:attr:`brainsex.run.TrainDir.best`).
    table
        A split table (:func:`split_subjects`, or ``preprocessed.tsv`` merged with ``split.tsv``).
    split
        The subset to predict (``test`` by default).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...; for a model object ``"auto"`` keeps its device.
    progress
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        :data:`brainsex.evaluate.PREDICTION_COLUMNS`, one row per subject of the subset, in the
        order of ``table``.
    """
    if "split" not in table.columns:
        raise BrainsexError("predict_split: the table has no 'split' column (use split_subjects)")
    rows = table[table["split"] == split].reset_index(drop=True)
    probs = predict(model, rows, device=device, progress=progress)
    return make_predictions_table(rows, probs, split=split)


def evaluate_predictions(predictions: pd.DataFrame, n_bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """Classification metrics of a predictions table (:func:`brainsex.evaluate.metrics`).

    Parameters
    ----------
    predictions
        A table with ``y_true`` and ``prob_male`` (:func:`predict_split`).
    n_bootstrap
        Bootstrap resamples for the confidence intervals (0: none).
    seed
        Seed of the resampling.

    Returns
    -------
    pandas.DataFrame
        One row per metric, indexed by ``metric``, with ``value``, ``ci_low``, ``ci_high``.
    """
    return metrics(predictions["y_true"], predictions["prob_male"], n_bootstrap=int(n_bootstrap),
                   seed=int(seed)).set_index("metric")


def train_run(
    run_dir: RunDir | str | os.PathLike,
    params: Mapping[str, Any],
    resume: bool | str = False,
    write_split: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Split a run's preprocessed subjects and train on them (what ``brainsex train`` does).

    Parameters
    ----------
    run_dir
        The run directory; reads :attr:`brainsex.run.PreprocessDir.table`, writes ``train/``.
    params
        A profile's parameters (see :func:`train_model`); ``seed`` seeds the split too.
    resume
        Passed to :func:`brainsex.train.train`.
    write_split
        Write ``split.tsv`` (False on all but the first process of a multi-GPU run).
    progress
        Show progress bars.

    Returns
    -------
    brainsex.train.TrainResult
        The result of :func:`train_model`.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    pre = read_table(run.preprocess.table, dtype={"participant_id": str})
    split = split_subjects(pre, seed=int(params.get("seed", 0)), out=run.train if write_split else None)
    return train_model(split, params, run.train, resume=resume, progress=progress)


# ------------------------------------------------------------------------------------------------- CLI
def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainsex train", description=(
        "Split the run's preprocessed subjects (stratified by sex/vendor/field, the profile's seed) and train "
        "SFCN on them, as the training chapter does. Works under torchrun for several GPUs."))
    p.add_argument("--profile", default="demo", help="parameter profile: demo (default), smoke, paper")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="override a parameter, e.g. -p epochs 5 or -p amp off (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default: the profile's run_dir or runs/<profile>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main_train(argv: Sequence[str] | None = None) -> int:
    """Command line ``brainsex train --profile NAME [-p KEY VALUE ...] [--run-dir DIR] [--resume]``.

    Splits the run's preprocessed subjects and trains on them with :func:`brainsex.stages.train_run`,
    the functions the training chapter uses: the split of the profile's ``seed`` (written to the run's
    ``split.tsv``), the profile's ``channels``, ``epochs``, ``batch_size``, ``lr``, ``select``,
    ``device``, ``seed`` (and any other :class:`brainsex.train.TrainConfig` field given with ``-p``). Returns the
    exit status (0 on success, 2 on a :class:`BrainsexError`, whose message is printed).

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``).
    """
    from brainsex.profiles import parse_override, resolve_profile

    args = _train_parser().parse_args(argv)
    try:
        overrides = {k: parse_override(v) for k, v in (args.param or [])}
        known = {f.name for f in dataclasses.fields(TrainConfig)} | {"dropout"}
        params = resolve_profile(args.profile, overrides, known=known)
        run_dir = Path(args.run_dir or params.get("run_dir") or Path("runs") / args.profile)
        rank0 = int(os.environ.get("RANK", "0")) == 0
        result = train_run(run_dir, params, resume=args.resume, write_split=rank0, progress=not args.no_progress)
        if rank0:
            print(f"best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4f}, "
                  f"val_acc {result.best_val_acc:.3f}; checkpoint {result.best_checkpoint}")
    except BrainsexError as exc:
        print(f"brainsex: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_train())
