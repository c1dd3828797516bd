"""What the trained model really uses: counterfactual scans of the phantom through the model.

The validity chapter (07) scores the explanation methods against the *planted* truth; a method can
fail that test either because the model does not use the planted regions or because the method does
not show what the model uses. This module measures the model's reliance directly. Each test scan of
a phantom run is re-rendered with one factor switched and every random draw kept
(:func:`brainsex.synthetic.render_counterfactual`):

* ``planted regions (all)``: every planted region takes the other sex's planted effect;
* ``planted region``: one planted region alone takes the other sex's effect (one row per region);
* ``head size``: the TIV moves to the other sex's distribution (:func:`brainsex.synthetic.counterfactual_tiv`);
* ``all planted differences``: the two above together (the phantom's whole sex difference);
* ``age +10 y`` / ``age -10 y``: the age-related changes (ventricles, grey-matter loss) ten years on.

Each counterfactual goes through the subject's **own recorded preprocessing** -- the same brain
extraction method, the rigid transform ``preprocess`` estimated for the original scan
(:func:`brainsex.preprocess.apply_rigid`, the resampling code of :func:`~brainsex.preprocess.rigid_register`)
and the z-score (:func:`brainsex.preprocess.zscore`) with the recorded mode -- and through the trained
model. The original scan goes through the same code (which reproduces the stored preprocessed image
bit for bit). The transform is not re-estimated: the question is what the *model* does with the
change, not how a new registration would move.

**Sign convention**: ``delta_logit = logit(counterfactual) - logit(original)`` of the male logit,
multiplied by +1 for a female subject and -1 for a male one, so that a **positive delta means the
model moves towards the other sex** (for the age rows, too: positive is towards the other sex).

:func:`model_reliance` gives the mean delta per factor with a bootstrap CI over scans;
:func:`explanation_vs_reliance` scores each explanation method's region ranking against the model's
own per-region reliance.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from brainsex import BrainsexError
from brainsex.io import read_table
from brainsex.memory import choose_batch_size
from brainsex.preprocess import Reference, apply_rigid, skull_strip, zscore
from brainsex.ranking import has_truth, select_scans
from brainsex.run import RunDir
from brainsex.synthetic import PhantomTruth, render_counterfactual

__all__ = [
    "RELIANCE_COLUMNS",
    "Counterfactual",
    "counterfactuals",
    "preprocess_like",
    "oriented_delta",
    "summarise_deltas",
    "scan_deltas",
    "model_reliance",
    "reliance_shares",
    "explanation_vs_reliance",
    "tracking_methods",
]

#: Columns of ``validity/model_reliance.tsv`` (:attr:`brainsex.run.ValidityDir.model_reliance`).
RELIANCE_COLUMNS = ["factor", "region", "delta_logit", "ci_low", "ci_high", "n_scans"]
ALL_REGIONS, ONE_REGION, SIZE, EVERYTHING = ("planted regions (all)", "planted region", "head size",
                                             "all planted differences")


@dataclass(frozen=True)
class Counterfactual:
    """One factor switched (:func:`brainsex.synthetic.render_counterfactual`'s keyword arguments).

    Attributes
    ----------
    factor : str
        Its name in the reliance table.
    region : str
        The planted region's name (one-region rows), else "".
    label : int or None
        The planted region's atlas label (one-region rows).
    kwargs : dict
        ``regions``, ``size``, ``age_shift_years``.
    """

    factor: str
    region: str = ""
    label: int | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def counterfactuals(truth: PhantomTruth, age_years: float = 10.0) -> list[Counterfactual]:
    """The counterfactuals of the reliance table for a phantom (see the module docstring).

    Parameters
    ----------
    truth : PhantomTruth
        The phantom (its planted regions).
    age_years : float, default=10.0
        The age shift, applied both ways.
    """
    a = float(age_years)
    if not np.isfinite(a) or a <= 0:
        raise BrainsexError(f"age_years must be a positive number of years, got {age_years!r}")
    out = [Counterfactual(ALL_REGIONS, kwargs={"regions": "all"})]
    out += [Counterfactual(ONE_REGION, str(name), int(lab), {"regions": int(lab)})
            for lab, name in zip(truth.regions["label"], truth.regions["name"], strict=True)]
    out += [Counterfactual(SIZE, kwargs={"size": "other"}),
            Counterfactual(EVERYTHING, kwargs={"regions": "all", "size": "other"}),
            Counterfactual(f"age +{a:g} y", kwargs={"age_shift_years": a}),
            Counterfactual(f"age -{a:g} y", kwargs={"age_shift_years": -a})]
    return out


def _recorded_params(run: RunDir, participant_id: str) -> dict[str, Any]:
    marker = run.preprocess.subject_outputs(participant_id)["marker"]
    if not marker.is_file():
        raise BrainsexError(f"{marker}: not found; {participant_id} was not preprocessed in {run.root}")
    content = json.loads(marker.read_text())
    if content.get("qc", {}).get("status") != "ok":
        raise BrainsexError(f"{marker}: {participant_id}'s preprocessing did not succeed")
    return dict(content.get("params", {}))


def preprocess_like(image: Any, mask: Any, run_dir: str | os.PathLike | RunDir, participant_id: str,
                    reference: Reference | None = None, reference_source: str = "auto") -> np.ndarray:
    """A scanner-space scan put through a subject's recorded preprocessing; the model's input array.

    Brain extraction with the method the subject's marker records (``mask``: the given true mask),
    the subject's recorded rigid transform (:func:`brainsex.preprocess.apply_rigid`, not re-estimated)
    onto the grid of its preprocessed image, and the z-score with the recorded mode.

    Parameters
    ----------
    image, mask : nibabel.Nifti1Image
        The scan and its brain mask in scanner space (a counterfactual, or the original).
    run_dir : path or RunDir
        The run whose ``preprocess/`` holds the subject.
    participant_id : str
        The subject whose transform and settings are used.
    reference : Reference, optional
        The template preprocessing used (checked against the marker's fingerprint); default
        :meth:`brainsex.preprocess.Reference.load` at the recorded voxel size from ``reference_source``.
    reference_source : str, default="auto"
        Template source tried first when ``reference`` is not given ("auto", then "offline", are
        tried next: the one whose template matches the marker's fingerprint is used).

    Returns
    -------
    numpy.ndarray, float32
        The z-scored volume on the template grid.
    """
    import nibabel as nib

    run = RunDir(run_dir)
    params = _recorded_params(run, participant_id)
    outs = run.preprocess.subject_outputs(participant_id)
    if reference is None:  # the source preprocessing used: the one whose template has the recorded fingerprint
        sources = list(dict.fromkeys([reference_source, "auto", "offline"]))
        refs = [Reference.load(float(params["voxel_size"]), src) for src in sources]
        ref = next((r for r in refs if r.fingerprint() == params.get("reference")), refs[0])
    else:
        ref = reference
    if params.get("reference") and params["reference"] != ref.fingerprint():
        raise BrainsexError(f"{outs['marker']}: preprocessing used template {params['reference']}, the given "
                            f"reference is {ref.fingerprint()}; pass the same Reference")
    method = str(params.get("method", "mask"))
    brain, brain_mask = skull_strip(image, method=method, mask=mask if method == "mask" else None, reference=ref,
                                    network_size=int(params.get("deepbet_size", 192)), name=str(participant_id))
    target = nib.load(outs["image_pp"])
    moved, moved_mask = apply_rigid(brain, outs["rigid_transform"], (target.shape, target.affine), mask=brain_mask,
                                    reference=ref, reg_voxel_mm=float(params.get("reg_voxel_mm", 4.0)))
    z = zscore(moved, moved_mask, mode=params.get("zscore_mode", "brain"))
    return np.asarray(z.dataobj, dtype=np.float32)


def oriented_delta(logit_cf: Any, logit_orig: Any, sex: Any) -> np.ndarray:
    """Change of the male logit, signed so that positive means towards the other sex.

    Parameters
    ----------
    logit_cf, logit_orig : array-like
        Male logits of the counterfactual and of the original scan.
    sex : array-like of {"F", "M"}
        The subjects' sexes.
    """
    s = np.asarray(sex).astype(str)
    if not np.isin(s, ["F", "M"]).all():
        raise BrainsexError(f"sex must be 'F' or 'M', got {sorted(set(s.tolist()) - {'F', 'M'})}")
    return (np.asarray(logit_cf, float) - np.asarray(logit_orig, float)) * np.where(s == "F", 1.0, -1.0)


def summarise_deltas(per_scan: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> pd.DataFrame:
    """Mean delta per factor and region with a percentile bootstrap CI over scans (scipy).

    Parameters
    ----------
    per_scan : pandas.DataFrame
        ``participant_id``, ``factor``, ``region``, ``delta_logit`` (one row per scan and counterfactual).
    n_bootstrap : int, default=1000
        Resamples (:func:`scipy.stats.bootstrap`, percentile method; a constant delta gives a CI of
        zero width).
    seed : int, default=0
        Bootstrap seed.
    confidence : float, default=0.95
        CI level.

    Returns
    -------
    pandas.DataFrame
        :data:`RELIANCE_COLUMNS`, in the order the factors first appear.
    """
    missing = {"factor", "region", "delta_logit"} - set(per_scan.columns)
    if missing:
        raise BrainsexError(f"per-scan deltas lack the column(s) {sorted(missing)}")
    rows = []
    for (factor, region), g in per_scan.groupby(["factor", "region"], sort=False):
        d = g["delta_logit"].to_numpy(float)
        lo = hi = float("nan")
        if len(d) >= 2 and np.ptp(d) == 0:
            lo = hi = float(d[0])
        elif len(d) >= 2:
            ci = stats.bootstrap((d,), np.mean, n_resamples=int(n_bootstrap), confidence_level=confidence,
                                 method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        rows.append({"factor": factor, "region": region, "delta_logit": float(d.mean()), "ci_low": lo,
                     "ci_high": hi, "n_scans": len(d)})
    return pd.DataFrame(rows, columns=RELIANCE_COLUMNS)


def _logits(model: Any, volumes: Sequence[np.ndarray], batch_size: int | str, device: Any) -> np.ndarray:
    import torch

    first = next(iter(model.parameters()), None)
    dev = device if device is not None else (first.device if first is not None else torch.device("cpu"))
    n = choose_batch_size(model, batch_size, mode="eval", device=dev, cap=16)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(volumes), n):
                x = torch.from_numpy(np.stack(volumes[i:i + n])[:, None]).to(dev)
                out.append(model(x).float().reshape(-1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(float)


@functools.lru_cache(maxsize=1)
def _worker_truth(root: str) -> PhantomTruth:
    return PhantomTruth(root)


def _scan_volumes(truth: PhantomTruth | str, run_root: str, pid: str, kwargs: Sequence[Mapping[str, Any]],
                  reference: Reference | None, source: str) -> list[np.ndarray]:
    """The original scan and each counterfactual of one subject, preprocessed (model inputs)."""
    if isinstance(truth, str):  # a joblib worker: one phantom context per process
        from brainsex.registration import set_threads

        set_threads(1)
        truth = _worker_truth(truth)
    run = RunDir(run_root)
    return [preprocess_like(*render_counterfactual(truth, pid, **kw), run, pid, reference, source)
            for kw in ({}, *kwargs)]


def scan_deltas(model: Any, run_dir: str | os.PathLike | RunDir, participant_ids: Sequence[str],
                age_years: float = 10.0, batch_size: int | str = "auto", device: Any = None,
                truth: PhantomTruth | None = None, reference: Reference | None = None,
                progress: bool = True, n_jobs: int = 1, reference_source: str = "auto") -> pd.DataFrame:
    """Per-scan oriented logit changes of every counterfactual (:func:`counterfactuals`).

    Parameters
    ----------
    model : torch.nn.Module
        The trained classifier (one male logit per scan).
    run_dir : path or RunDir
        The phantom run (its phantom, preprocessing records).
    participant_ids : sequence of str
        The scans.
    age_years : float, default=10.0
        Age shift of the age rows.
    batch_size : int or "auto", default="auto"
        Volumes per forward pass (``"auto"``: :func:`brainsex.memory.choose_batch_size`).
    device : torch.device, optional
        Default: the model's.
    truth : PhantomTruth, optional
        The run's phantom (default: read from the run).
    reference : Reference, optional
        See :func:`preprocess_like`.
    progress : bool, default=True
        Progress bar over scans.
    n_jobs : int, default=1
        Worker processes rendering and preprocessing the scans (joblib); the model runs here. The
        result does not depend on it.
    reference_source : str, default="auto"
        See :func:`preprocess_like`.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``sex``, ``factor``, ``region``, ``label``, ``logit_original``,
        ``logit_counterfactual``, ``delta_logit``.
    """
    from tqdm.auto import tqdm

    run = RunDir(run_dir)
    truth = truth if truth is not None else PhantomTruth(run.phantom.root)
    cfs = counterfactuals(truth, age_years)
    sexes = truth.participants.set_index("participant_id")["sex"]
    pids = [str(p) for p in participant_ids]
    kwargs = [dict(cf.kwargs) for cf in cfs]
    if int(n_jobs) == 1 or len(pids) < 2:
        produced: Any = (_scan_volumes(truth, str(run.root), pid, kwargs, reference, reference_source)
                         for pid in pids)
    else:
        from joblib import Parallel, delayed

        produced = Parallel(n_jobs=int(n_jobs), return_as="generator")(
            delayed(_scan_volumes)(str(truth.root), str(run.root), pid, kwargs, reference, reference_source)
            for pid in pids)
    rows = []
    bar = tqdm(total=len(pids), desc="counterfactual scans", unit="scan", disable=not progress)
    for pid, volumes in zip(pids, produced, strict=True):
        bar.update()
        logits = _logits(model, volumes, batch_size, device)
        sex = str(sexes.loc[pid])
        for cf, lg in zip(cfs, logits[1:], strict=True):
            rows.append({"participant_id": pid, "sex": sex, "factor": cf.factor, "region": cf.region,
                         "label": cf.label, "logit_original": logits[0], "logit_counterfactual": lg,
                         "delta_logit": float(oriented_delta(lg, logits[0], sex))})
    bar.close()
    return pd.DataFrame(rows)


def model_reliance(
    run_dir: str | os.PathLike | RunDir,
    model: Any = None,
    max_scans: int | None = 16,
    age_years: float = 10.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int | str = "auto",
    device: str = "cpu",
    progress: bool = True,
    return_per_scan: bool = False,
    n_jobs: int = 1,
    reference_source: str = "auto",
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """The model's reliance on each factor of the phantom, measured with counterfactual scans.

    Test scans of the run (``evaluate/predictions.tsv``, ``split == "test"``; at most ``max_scans``,
    balanced by sex, :func:`brainsex.ranking.select_scans`, whether or not the model classified them
    correctly) are re-rendered with each factor switched (:func:`scan_deltas`), and the oriented
    logit changes averaged with bootstrap CIs (:func:`summarise_deltas`).

    Parameters
    ----------
    run_dir : path or RunDir
        A phantom run with ``train/best.pt`` and ``evaluate/predictions.tsv``.
    model : torch.nn.Module, optional
        The classifier; default: the run's ``train/best.pt`` (:func:`brainsex.train.load_model`).
    max_scans : int or None, default=16
        Scans to use (None: every test scan).
    age_years : float, default=10.0
        Age shift of the age rows.
    n_bootstrap : int, default=1000
        Bootstrap resamples.
    seed : int, default=0
        Scan sample and bootstrap seed.
    batch_size : int or "auto", default="auto"
        Volumes per forward pass.
    device : str, default="cpu"
        Where the model runs (when loaded here).
    progress : bool, default=True
        Progress bar.
    return_per_scan : bool, default=False
        Also return the per-scan rows (:func:`scan_deltas`).
    n_jobs : int, default=1
        Worker processes for the rendering and preprocessing (the result does not depend on it).
    reference_source : str, default="auto"
        The template source preprocessing used (:func:`preprocess_like`).

    Returns
    -------
    pandas.DataFrame
        :data:`RELIANCE_COLUMNS` (and the per-scan table with ``return_per_scan``).
    """
    run = RunDir(run_dir)
    if not has_truth(run):
        raise BrainsexError(f"{run.root}: model reliance needs a phantom run (its counterfactual scans); this run "
                            "has no planted truth (use its matched phantom, brainsex.matched)")
    if model is None:
        from brainsex.train import load_model, resolve_device

        model = load_model(run.train.best, device=resolve_device(device))
    pred = read_table(run.evaluate.predictions, dtype={"participant_id": str})
    if "split" in pred.columns:
        pred = pred[pred["split"] == "test"]
    if pred.empty:
        raise BrainsexError(f"{run.evaluate.predictions}: no test scan")
    truth = PhantomTruth(run.phantom.root)
    sexes = truth.participants.set_index("participant_id")["sex"]
    pool = pd.DataFrame({"participant_id": pred["participant_id"].astype(str).to_numpy()})
    pool["sex"] = sexes.reindex(pool["participant_id"]).to_numpy()
    scans = select_scans(pool, max_scans=max_scans, seed=seed)
    per_scan = scan_deltas(model, run, scans["participant_id"], age_years=age_years, batch_size=batch_size,
                           truth=truth, progress=progress, n_jobs=n_jobs, reference_source=reference_source)
    out = summarise_deltas(per_scan, n_bootstrap=n_bootstrap, seed=seed)
    return (out, per_scan) if return_per_scan else out


def reliance_shares(table: pd.DataFrame) -> dict[str, float]:
    """How the measured reliance splits between head size, the planted regions and age-related change.

    Each part is the absolute mean delta of its factor (``head size``, ``planted regions (all)``, and
    the larger of the two age rows) divided by their sum.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`model_reliance`'s table.

    Returns
    -------
    dict
        ``size``, ``regions``, ``age`` (shares, summing to 1; NaN when every delta is 0) and
        ``size_delta``, ``regions_delta``, ``age_delta``, ``everything_delta``, ``sum_single_regions``
        (the mean deltas themselves; the last is the sum of the one-region rows).
    """
    table = table.assign(region=table["region"].fillna("").astype(str))  # read back from a TSV: "" is NaN
    by = table.set_index(["factor", "region"])["delta_logit"]
    try:
        size, regions = float(by[(SIZE, "")]), float(by[(ALL_REGIONS, "")])
    except KeyError as exc:
        raise BrainsexError(f"reliance table lacks the row {exc}") from exc
    ages = table[table["factor"].str.startswith("age ")]["delta_logit"].to_numpy(float)
    age = float(ages[np.argmax(np.abs(ages))]) if len(ages) else 0.0
    parts = np.abs([size, regions, age])
    total = float(parts.sum())
    shares = parts / total if total > 0 else np.full(3, np.nan)
    single = table[table["factor"] == ONE_REGION]["delta_logit"]
    return {"size": float(shares[0]), "regions": float(shares[1]), "age": float(shares[2]),
            "size_delta": size, "regions_delta": regions, "age_delta": age,
            "everything_delta": float(by.get((EVERYTHING, ""), np.nan)), "sum_single_regions": float(single.sum())}


def explanation_vs_reliance(
    rankings: Mapping[tuple[str, str], pd.DataFrame],
    reliance: pd.DataFrame,
    k: int = 3,
    n_perm: int = 1000,
    seed: int = 0,
    versus_truth: pd.DataFrame | None = None,
    truth_metric: str = "precision_at_10",
) -> pd.DataFrame:
    """Score every explanation ranking against the model's own per-region reliance.

    Only planted regions have a one-region counterfactual, so both rankings are compared over the
    planted regions: the reliance ranks them by ``|delta_logit|`` of their one-region switch, the
    method by their order in its ranking (regions the method could not score, e.g. with no voxel on
    the grid, are left out). Two scores:

    * ``spearman``: Spearman correlation between the method's order and the reliance, with a
      one-sided permutation p-value (``n_perm`` shuffles of the method's order);
    * ``precision_at_k``: the share of the method's ``k`` top planted regions that are among the
      ``k`` regions the model relies on most; chance level ``k / n_regions``.

    Parameters
    ----------
    rankings : mapping
        ``{(method, scoring): ranking}`` (best first, with ``label``), as
        :func:`brainsex.validity.compare_methods` returns them (``.rankings``).
    reliance : pandas.DataFrame
        :func:`model_reliance`'s table; its ``planted region`` rows are matched to the rankings by
        region name (the atlas's names, as in ``ground_truth/regions.tsv``).
    k : int, default=3
        Top regions compared.
    n_perm : int, default=1000
        Permutations for the Spearman p-value.
    seed : int, default=0
        Permutation seed.
    versus_truth : pandas.DataFrame, optional
        The same rankings scored against the planted truth (the long table of
        :func:`brainsex.validity.compare_methods`): its ``truth_metric`` rows are put beside, as
        ``truth_observed``, ``truth_chance`` and ``truth_p_value``.
    truth_metric : str, default="precision_at_10"
        Which metric of ``versus_truth``.

    Returns
    -------
    pandas.DataFrame
        ``method``, ``scoring``, ``spearman``, ``spearman_p``, ``precision_at_k``,
        ``precision_chance``, ``k``, ``n_regions``, ``top_reliance``, ``top_method`` (and the truth
        columns with ``versus_truth``).
    """
    one = reliance[reliance["factor"] == ONE_REGION]
    if one.empty:
        raise BrainsexError("the reliance table has no one-region rows (a phantom with planted regions is needed)")
    strength = dict(zip(one["region"].astype(str), one["delta_logit"].abs(), strict=True))
    rng = np.random.default_rng(seed)
    rows = []
    for (method, scoring), r in rankings.items():
        if "name" not in r.columns:
            raise BrainsexError(f"ranking {method} · {scoring} has no 'name' column")
        present = r[r["n_voxels"] > 0] if "n_voxels" in r.columns else r
        order = [str(n) for n in present["name"] if str(n) in strength]
        n = len(order)
        kk = min(int(k), n)
        if n < 2 or kk < 1:
            rows.append({"method": method, "scoring": scoring, "spearman": np.nan, "spearman_p": np.nan,
                         "precision_at_k": np.nan, "precision_chance": np.nan, "k": kk, "n_regions": n,
                         "top_reliance": "", "top_method": ""})
            continue
        method_score = -np.arange(n, dtype=float)  # first in the ranking scores highest
        rel = np.array([strength[name] for name in order])
        rho = float(stats.spearmanr(method_score, rel).statistic) if np.ptp(rel) > 0 else np.nan
        perm = np.array([stats.spearmanr(rng.permutation(method_score), rel).statistic for _ in range(int(n_perm))])
        p = float((1 + np.sum(perm >= rho)) / (1 + len(perm))) if np.isfinite(rho) else np.nan
        top_rel = [order[i] for i in np.argsort(-rel, kind="stable")[:kk]]
        top_method = order[:kk]
        rows.append({"method": method, "scoring": scoring, "spearman": rho, "spearman_p": p,
                     "precision_at_k": len(set(top_rel) & set(top_method)) / kk, "precision_chance": kk / n,
                     "k": kk, "n_regions": n, "top_reliance": "; ".join(top_rel), "top_method": "; ".join(top_method)})
    out = pd.DataFrame(rows)
    if versus_truth is not None:
        t = versus_truth[versus_truth["metric"] == truth_metric]
        if t.empty:
            raise BrainsexError(f"versus_truth has no {truth_metric!r} rows (metrics: {sorted(set(versus_truth['metric']))})")
        t = t[["method", "scoring", "observed", "chance", "p_value"]].rename(
            columns={"observed": "truth_observed", "chance": "truth_chance", "p_value": "truth_p_value"})
        out = out.merge(t, on=["method", "scoring"], how="left")
    return out


def tracking_methods(scores: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """The explanation rankings whose order follows the model's reliance (Spearman p < ``alpha``).

    Parameters
    ----------
    scores : pandas.DataFrame
        :func:`explanation_vs_reliance`'s table.
    alpha : float, default=0.05
        Significance level of the one-sided permutation test.
    """
    hit = scores[(scores["spearman_p"] < alpha) & (scores["spearman"] > 0)]
    return [f"{m} · {sc}" for m, sc in zip(hit["method"], hit["scoring"], strict=True)]
