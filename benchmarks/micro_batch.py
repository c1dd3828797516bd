"""Batch normalisation under gradient accumulation, measured on the demo (issue 18).

With micro-batches the optimiser still steps on the gradient of the whole batch of 16, but each batch
normalisation layer normalises every micro-batch with that micro-batch's own mean and variance (noisier
than a batch of 16's), and its running statistics, used at evaluation, are updated once per micro-batch.
This script trains the demo's model (the demo profile's settings, the chapter's split) once per
``--micro`` value and reports test accuracy and AUC, so the effect of that difference is measured, not
assumed:

    python -m benchmarks.micro_batch --micro 16 4 --out benchmarks/results

It runs the demo's chapters 00-01 (phantom, preprocessing) into ``--run-dir`` when they have not run
there yet (about 3 minutes on 2 cores), then one training per micro-batch (about 4 minutes each).
Writes ``micro_batch_bn_<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

from benchmarks._common import REPO_ROOT, ensure_brainsex_importable, markdown_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro_batch", description=__doc__.splitlines()[0])
    p.add_argument("--micro", type=int, nargs="+", default=[16, 4])
    p.add_argument("--run-dir", default=str(REPO_ROOT / "runs" / "demo-microbatch"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    ensure_brainsex_importable()

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from brainsex.book import plan_build, run_notebooks
    from brainsex.io import read_table
    from brainsex.profiles import resolve_profile
    from brainsex.split import stratified_split
    from brainsex.train import TrainConfig, predict, train

    run = Path(args.run_dir)
    plan = plan_build(REPO_ROOT, "demo", run_dir=run)
    plan = dataclasses.replace(plan, notebooks=[nb for nb in plan.notebooks
                                                if nb.stem in ("00_cohort", "01_preprocessing")])
    run_notebooks(plan)
    params = resolve_profile("demo")
    table = read_table(run / "preprocess" / "preprocessed.tsv")
    table = table[table["status"] == "ok"].reset_index(drop=True)
    split = stratified_split(table, by=("sex", "vendor", "field"), fractions=(0.8, 0.1, 0.1), seed=params["seed"])
    test = split[split["split"] == "test"].reset_index(drop=True)
    y = (test["sex"] == "M").to_numpy(dtype=int)
    rows = []
    for m in args.micro:
        config = TrainConfig(epochs=int(params["epochs"]), batch_size=int(params["batch_size"]), lr=float(params["lr"]),
                             seed=int(params["seed"]), device="cpu", select=params["select"], micro_batch=int(m))
        t0 = time.perf_counter()
        res = train(split, config, out_dir=run / f"train_micro{m}", channels=params["channels"], resume="auto",
                    progress=False)
        seconds = time.perf_counter() - t0
        prob = predict(res.model, test, device="cpu", progress=False)["prob_male"].to_numpy()
        last = res.history.iloc[-1]
        rows.append({"micro_batch": m, "steps_per_batch": res.memory.accumulation_steps,
                     "test_accuracy": float(np.mean((prob >= 0.5) == y)), "test_auc": float(roc_auc_score(y, prob)),
                     "val_accuracy": float(last["val_acc"]), "train_accuracy": float(last["train_acc"]),
                     "train_seconds": seconds, "n_test": len(test)})
        print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"micro_batch_bn_{date}.json").write_text(json.dumps({"date": date, "profile": "demo", "rows": rows},
                                                                indent=2))
    cols = ["micro_batch", "steps_per_batch", "test_accuracy", "test_auc", "val_accuracy", "train_accuracy",
            "train_seconds", "n_test"]
    text = [f"# Batch normalisation with micro-batches, demo profile ({date})", "",
            "Effective batch 16 in every row (gradients accumulated over the micro-batches); only the batch "
            f"statistics differ. Demo settings (4 mm phantom, slim SFCN, {params['epochs']} epochs, seed "
            f"{params['seed']}, {params['select']} epoch kept).", "",
            markdown_table(rows, cols)]
    (out / f"micro_batch_bn_{date}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
