"""Cost and accuracy of the eTIV affine registration's settings, on a phantom cohort (issue 17).

The phantom is preprocessed once with ``preprocess_cohort`` (the step timings of its QC rows, and
the rigid transforms the options start from); then, per subject and in a rotating order (so that every
option sees the same machine load), the rigid registration and each eTIV option are run and timed
``--repeats`` times:

    python -m benchmarks.etiv_registration --n 24 --voxel-size 4 --repeats 3 --workdir /tmp/a17

Options (the eTIV affine of :func:`brainsex.preprocess.affine_to_template`):

* ``base``: the default -- started from the rigid transform, 30 iterations at 2 x ``etiv_voxel_mm``
  and 10 at ``etiv_voxel_mm``, sampling 0.25;
* schedules started from the rigid transform with fewer levels, fewer iterations or fewer samples;
* ``affine_only``: one registration serves both -- a 12-parameter affine from the centres of mass with
  the rigid step's schedule, its rigid part (polar decomposition) taken as the pose. This changes the
  model input, so its pose error against the phantom's true pose is reported beside the rigid one's.

Reported per option: median seconds per subject of the eTIV step, of rigid + eTIV, eTIV agreement with
``base`` (Pearson r, median and max absolute difference in ml), Pearson r with the phantom's true TIV
and the median eTIV / true TIV. Writes ``etiv_registration.csv`` and ``etiv_registration.md`` into
``--out`` (default: the work folder). Timings are medians of back-to-back runs in one process; on a
shared machine compare ratios, not absolute seconds.

``--modes`` then runs ``preprocess_cohort`` with both ``PreprocessConfig.registration`` settings
("rigid+affine", the default, and "affine", :func:`brainsex.preprocess.affine_register`) on the
phantom and, with ``--real-run DIR``, on the first ``--real-n`` subjects of an earlier real-data run
(``DIR/preprocess``: its images and native brain masks, so no brain extraction is timed), and reports
step times, eTIV agreement, similarity and how far apart the two poses are
(``etiv_registration_modes.md``). ``--modes-only`` skips the options.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._common import ensure_brainsex_importable, machine_info, machine_markdown, markdown_table

#: (name, iterations, shrink factors, smoothing sigmas, sampling, voxel mm, start from the rigid transform,
#: ANTs random seed); "base" is the default of :func:`brainsex.preprocess.affine_to_template`
OPTIONS: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[float, ...], float, float, bool, int]] = [
    ("base", (30, 10), (2, 1), (1, 0), 0.25, 4.0, True, 1),
    ("base_seed2", (30, 10), (2, 1), (1, 0), 0.25, 4.0, True, 2),
    ("fine20", (20,), (1,), (0,), 0.25, 4.0, True, 1),
    ("fine10", (10,), (1,), (0,), 0.25, 4.0, True, 1),
    ("coarse30", (30,), (2,), (1,), 0.25, 4.0, True, 1),
    ("coarse15", (15,), (2,), (1,), 0.25, 4.0, True, 1),
    ("base_s10", (30, 10), (2, 1), (1, 0), 0.10, 4.0, True, 1),
    ("s10_30x5", (30, 5), (2, 1), (1, 0), 0.10, 4.0, True, 1),
    ("s05", (30, 10), (2, 1), (1, 0), 0.05, 4.0, True, 1),
    ("vox8", (30, 10), (2, 1), (1, 0), 0.25, 8.0, True, 1),
    ("vox8_fine10", (10,), (1,), (0,), 0.25, 8.0, True, 1),
    ("affine_only", (100, 20), (2, 1), (1, 0), 0.2, 4.0, False, 1),
    ("affine_only_60x10", (60, 10), (2, 1), (1, 0), 0.2, 4.0, False, 1),
]


def _rigid_part(matrix: Any, centre: Any) -> Any:
    """The rotation of ``matrix`` (polar decomposition) with the translation that keeps ``centre``'s image."""
    import numpy as np
    from scipy.linalg import polar

    rot, _ = polar(matrix[:3, :3])
    out = np.eye(4)
    out[:3, :3] = rot
    c = np.asarray(centre, float)
    out[:3, 3] = (matrix[:3, :3] @ c + matrix[:3, 3]) - rot @ c
    return out


def _pearson(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.etiv_registration", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--voxel-size", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/etiv_registration")
    p.add_argument("--out", default=None)
    p.add_argument("--modes", action="store_true", help="also compare the two registration settings end to end")
    p.add_argument("--modes-only", action="store_true", help="only compare the two registration settings")
    p.add_argument("--real-run", default=None, help="a run folder whose preprocess/ holds real scans' masks")
    p.add_argument("--real-n", type=int, default=24)
    args = p.parse_args(argv)
    ensure_brainsex_importable()

    import numpy as np
    import pandas as pd

    from brainsex.io import read_table
    from brainsex.preprocess import (
        Reference,
        affine_to_template,
        apply_rigid,
        load_t1,
        preprocess_cohort,
        rigid_error,
        rigid_register,
        skull_strip,
    )
    from brainsex.registration import set_threads, transform_matrix
    from brainsex.run import PhantomDir
    from brainsex.synthetic import make_cohort, pose_matrix

    work = Path(args.workdir)
    out = Path(args.out) if args.out else work
    info = machine_info({"load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg())})
    set_threads(1, 1)
    ph = PhantomDir(work / "cohort")
    make_cohort(ph.root, n=args.n, voxel_size=args.voxel_size, seed=args.seed, progress=False)
    table = read_table(ph.participants)
    table["image"] = [str(ph.image(s)) for s in table["participant_id"]]
    table["mask"] = [str(ph.mask(s)) for s in table["participant_id"]]
    ref = Reference.load(args.voxel_size)
    if args.modes or args.modes_only:
        _modes(args, table, ref, work, out, info)
        if args.modes_only:
            return 0
    pp = preprocess_cohort(table, work / "preprocess", voxel_size=args.voxel_size, n_workers=1, progress=False,
                           resume=False)
    qc = read_table(work / "preprocess" / "qc.tsv").set_index("participant_id")
    steps = [c for c in qc.columns if c.startswith("t_") and qc[c].notna().any()]
    poses = read_table(ph.poses).set_index("participant_id")
    centre = (0.0, -18.0, 18.0)

    tmpl, tmask = ref.registration_template, ref.registration_mask
    scratch = work / "tx"
    scratch.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    subjects = [r for r in pp.to_dict("records") if r["status"] == "ok"]
    n_opt = len(OPTIONS) + 2  # + the rigid registration, + its resampling alone
    for i, row in enumerate(subjects):
        pid = row["participant_id"]
        brain, mask = skull_strip(load_t1(row["image"]), method="mask", mask=row["mask"], reference=ref)
        rigid_tx = qc.loc[pid, "rigid_transform"]
        times: dict[str, list[float]] = {name: [] for name, *_ in OPTIONS}
        times["rigid"], times["resample"] = [], []
        result: dict[str, Any] = {}
        for rep in range(args.repeats + 1):  # repeat 0 warms the caches and is not timed
            for k in range(n_opt):
                j = (k + i + rep) % n_opt  # rotate the order so that no option always runs first
                t0 = time.perf_counter()
                if j == len(OPTIONS):
                    rigid_register(brain, tmpl, mask=mask, template_mask=tmask, target=(ref.shape, ref.affine),
                                   transform_path=scratch / f"{pid}_rigid.mat")
                    name = "rigid"
                elif j == len(OPTIONS) + 1:  # what one registration serving both still has to do
                    apply_rigid(brain, rigid_tx, (ref.shape, ref.affine), mask=mask, reference=ref)
                    name = "resample"
                else:
                    name, its, shrink, sigmas, sampling, vox, from_rigid, seed = OPTIONS[j]
                    os.environ["ANTS_RANDOM_SEED"] = str(seed)
                    result[name] = affine_to_template(
                        brain, tmpl, transform_path=scratch / f"{pid}_{name}.mat",
                        initial_transform=rigid_tx if from_rigid else None, reg_voxel_mm=vox, iterations=its,
                        shrink_factors=shrink, smoothing_sigmas=sigmas, sampling=sampling, template_mask=tmask)
                    os.environ["ANTS_RANDOM_SEED"] = "1"
                if rep:
                    times[name].append(time.perf_counter() - t0)
        same_rigid = bool(np.array_equal(transform_matrix(scratch / f"{pid}_rigid.mat"), transform_matrix(rigid_tx)))
        true_pose = pose_matrix(poses.loc[pid])
        rig_err = rigid_error(transform_matrix(rigid_tx), true_pose, centre)
        for name, *_ in OPTIONS:
            m = result[name]
            pose = rig_err if not name.startswith("affine_only") else rigid_error(_rigid_part(m, centre), true_pose, centre)
            rows.append({"participant_id": pid, "option": name, "seconds": statistics.median(times[name]),
                         "rigid_seconds": statistics.median(times["rigid"]),
                         "resample_seconds": statistics.median(times["resample"]),
                         "etiv_ml": float(ref.tiv_ml * np.linalg.det(m[:3, :3])),
                         "qc_etiv_ml": float(qc.loc[pid, "etiv_ml"]), "tiv_ml": float(row["tiv_ml"]),
                         "rotation_error_deg": pose[0], "translation_error_mm": pose[1],
                         "rigid_repeats_bitwise": same_rigid})
        print(f"{i + 1}/{len(subjects)} {pid}", flush=True)
    df = pd.DataFrame(rows)
    base = df[df["option"] == "base"].set_index("participant_id")
    other = float(qc[[c for c in steps if c not in ("t_rigid_s", "t_etiv_s", "t_total_s")]].sum(axis=1).median())
    summary = []
    for name, its, shrink, _sigmas, sampling, vox, from_rigid, _seed in OPTIONS:
        d = df[df["option"] == name].set_index("participant_id").loc[base.index]
        diff = (d["etiv_ml"] - base["etiv_ml"]).abs()
        # one registration: no separate rigid step; otherwise rigid + eTIV
        # one registration serving both still resamples the image (apply_rigid; the coarse similarity, about
        # 0.02 s, is left out); the others add the rigid step
        per_subject = d["seconds"] + (d["resample_seconds"] if name.startswith("affine_only") else d["rigid_seconds"]) + other
        summary.append({
            "option": name, "schedule": f"{'x'.join(map(str, its))} @ shrink {'x'.join(map(str, shrink))}, "
                                        f"{vox:g} mm, sampling {sampling:g}, "
                                        f"{'from rigid' if from_rigid else 'from centres of mass'}",
            "etiv_s": float(d["seconds"].median()), "subject_s": float(per_subject.median()),
            "subject_ratio": float(per_subject.median()) / float(
                (base["seconds"] + base["rigid_seconds"] + other).median()),
            "r_vs_base": _pearson(d["etiv_ml"], base["etiv_ml"]), "median_abs_diff_ml": float(diff.median()),
            "max_abs_diff_ml": float(diff.max()), "r_vs_true_tiv": _pearson(d["etiv_ml"], d["tiv_ml"]),
            "median_etiv_over_tiv": float((d["etiv_ml"] / d["tiv_ml"]).median()),
            "median_rot_err_deg": float(d["rotation_error_deg"].median()),
            "median_trans_err_mm": float(d["translation_error_mm"].median()),
        })
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "etiv_registration_subjects.csv", index=False)
    pd.DataFrame(summary).to_csv(out / "etiv_registration.csv", index=False)
    base_check = float((base["etiv_ml"] - base["qc_etiv_ml"]).abs().max())
    qc_steps = qc[steps].median().to_dict()
    text = [
        f"# eTIV registration options ({datetime.date.today().isoformat()}, {len(base)} subjects, "
        f"{args.voxel_size:g} mm phantom, true masks)", "", machine_markdown(info), "",
        "Median step seconds per subject in `preprocess_cohort` (n_workers=1): "
        + ", ".join(f"{k} {v:.3f}" for k, v in qc_steps.items()), "",
        f"Rigid transform repeated bit for bit in the timing loop: {bool(df['rigid_repeats_bitwise'].all())}; "
        f"`base` eTIV vs the QC table's: max |diff| {base_check:.3g} ml.", "",
        markdown_table(summary, ["option", "schedule", "etiv_s", "subject_s", "subject_ratio", "r_vs_base",
                                 "median_abs_diff_ml", "max_abs_diff_ml", "r_vs_true_tiv", "median_etiv_over_tiv",
                                 "median_rot_err_deg", "median_trans_err_mm"]),
    ]
    (out / "etiv_registration.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


def _mode_rows(name: str, table: Any, ref: Any, work: Path, voxel_size: float, method: str, truth: Any) -> list[dict]:
    """Both registration settings through ``preprocess_cohort`` on one cohort; one row per setting."""
    import numpy as np

    from brainsex.io import read_table
    from brainsex.preprocess import preprocess_cohort, rigid_error
    from brainsex.registration import transform_matrix
    from brainsex.synthetic import pose_matrix

    qcs = {}
    for mode in ("rigid+affine", "affine"):
        preprocess_cohort(table, work / f"{name}_{mode}", voxel_size=voxel_size, n_workers=1, progress=False,
                          resume=False, reference=ref, registration=mode, method=method)
        qcs[mode] = read_table(work / f"{name}_{mode}" / "qc.tsv")
    a = qcs["rigid+affine"]
    rows = []
    for mode, q in qcs.items():
        ok = (q["status"] == "ok") & (a["status"] == "ok")
        apart = np.array([rigid_error(transform_matrix(x), transform_matrix(y))
                          for x, y in zip(q.loc[ok, "rigid_transform"], a.loc[ok, "rigid_transform"], strict=True)])
        row = {"cohort": name, "registration": mode, "n_ok": int((q["status"] == "ok").sum()), "n": len(q),
               "rigid_s": float(q["t_rigid_s"].median()), "etiv_s": float(q["t_etiv_s"].median()),
               "total_s": float(q["t_total_s"].median()),
               "r_etiv_vs_rigid+affine": float(np.corrcoef(q.loc[ok, "etiv_ml"], a.loc[ok, "etiv_ml"])[0, 1]),
               "median_abs_diff_ml": float(np.median(np.abs(q.loc[ok, "etiv_ml"] - a.loc[ok, "etiv_ml"]))),
               "max_abs_diff_ml": float(np.max(np.abs(q.loc[ok, "etiv_ml"] - a.loc[ok, "etiv_ml"]))),
               "r_etiv_vs_mask_ml": float(np.corrcoef(q.loc[ok, "etiv_ml"], q.loc[ok, "mask_ml"])[0, 1]),
               "similarity_median": float(q.loc[ok, "similarity"].median()),
               "similarity_min": float(q.loc[ok, "similarity"].min()),
               "pose_apart_deg_median": float(np.median(apart[:, 0])), "pose_apart_deg_max": float(apart[:, 0].max()),
               "pose_apart_mm_median": float(np.median(apart[:, 1])), "pose_apart_mm_max": float(apart[:, 1].max())}
        if truth is not None:
            tiv = truth["tiv_ml"].to_numpy(float)[ok.to_numpy()]
            row["r_etiv_vs_true_tiv"] = float(np.corrcoef(q.loc[ok, "etiv_ml"], tiv)[0, 1])
            err = np.array([rigid_error(transform_matrix(tx), pose_matrix(truth["poses"].loc[pid]))
                            for pid, tx in zip(q.loc[ok, "participant_id"], q.loc[ok, "rigid_transform"], strict=True)])
            row.update({"pose_err_deg_median": float(np.median(err[:, 0])), "pose_err_mm_median": float(np.median(err[:, 1])),
                        "pose_err_deg_max": float(err[:, 0].max()), "pose_err_mm_max": float(err[:, 1].max())})
        rows.append(row)
    return rows


def _modes(args: Any, table: Any, ref: Any, work: Path, out: Path, info: dict) -> None:
    """``--modes``: both registration settings end to end, on the phantom and optionally on real scans."""
    import pandas as pd

    from brainsex.io import read_table
    from brainsex.run import PhantomDir

    ph = PhantomDir(work / "cohort")
    truth = {"tiv_ml": table["tiv_ml"], "poses": read_table(ph.poses).set_index("participant_id")}
    rows = _mode_rows("phantom", table, ref, work, args.voxel_size, "mask", truth)
    if args.real_run:
        run = Path(args.real_run)
        done = read_table(run / "preprocess" / "preprocessed.tsv")
        qc = read_table(run / "preprocess" / "qc.tsv").set_index("participant_id")
        done = done[done["status"] == "ok"].head(args.real_n).reset_index(drop=True)
        native = [qc.loc[p if p in qc.index else f"sub-{p}", "mask_native"] for p in done["participant_id"]]
        root = run.resolve().parents[1]  # QC paths are relative to the project root (runs/<name>/...)
        real = pd.DataFrame({"participant_id": done["participant_id"], "image": done["image"],
                             "mask": [str(m if Path(m).is_absolute() else root / m) for m in native]})
        rows += _mode_rows(run.name, real, ref, work, args.voxel_size, "mask", None)
    cols = ["cohort", "registration", "n_ok", "n", "rigid_s", "etiv_s", "total_s", "r_etiv_vs_rigid+affine",
            "median_abs_diff_ml", "max_abs_diff_ml", "r_etiv_vs_mask_ml", "r_etiv_vs_true_tiv", "similarity_median",
            "similarity_min", "pose_apart_deg_median", "pose_apart_deg_max", "pose_apart_mm_median",
            "pose_apart_mm_max", "pose_err_deg_median", "pose_err_mm_median", "pose_err_deg_max", "pose_err_mm_max"]
    pd.DataFrame(rows).to_csv(out / "etiv_registration_modes.csv", index=False)
    text = [f"# Registration settings end to end ({args.voxel_size:g} mm grid)", "", machine_markdown(info), "",
            markdown_table(rows, cols)]
    (out / "etiv_registration_modes.md").write_text("\n".join(text) + "\n")
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
