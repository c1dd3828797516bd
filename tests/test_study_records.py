"""Reading committed validity-study folders for the chapter (validity.read_study, study_grid_summary)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from brainsex import BrainsexError
from brainsex.io import write_table
from brainsex.run import ValidityDir
from brainsex.validity import read_study, study_grid_summary


def _table() -> pd.DataFrame:
    rows = []
    for vs in (8.0, 2.0):
        rows.append(("volume", vs, "-", "-", "truth_map", "abs_effect", "precision_at_10", 0.9, 0.08, None))
        rows.append(("volume", vs, "-", "-", "tbm_perfect_warps", "t", "precision_at_10", 0.8 if vs == 2 else 0.5,
                     0.08, None))
        for width, acc in (("demo", 0.7 if vs == 2 else 0.6), ("paper", 0.55)):
            for method, prec in (("saliency", 0.1), ("occlusion", 0.3 if width == "demo" else 0.0)):
                rows.append(("volume", vs, "brain", width, method, "weighted_score", "precision_at_10", prec, 0.09, acc))
                rows.append(("volume", vs, "brain", width, method, "weighted_score", "average_precision", 0.99, 0.1, acc))
    return pd.DataFrame(rows, columns=["effect", "voxel_size", "zscore", "width", "method", "scoring", "metric",
                                       "observed", "chance", "accuracy"])


def test_grid_summary_reads_one_grid_and_names_the_best_explanation():
    s = study_grid_summary(_table(), 2.0)
    assert s["accuracy"] == {"demo": 0.7, "paper": 0.55}
    assert s["best_method"]["demo"] == ("occlusion", "weighted_score", 0.3, 0.09)  # not the AP row's 0.99
    assert s["best_method"]["paper"][0] == "saliency"
    assert s["morphometry"] == {"truth_map": (0.9, 0.08), "tbm_perfect_warps": (0.8, 0.08)}
    assert s["chance"] == pytest.approx(0.09)
    assert study_grid_summary(_table(), 8.0)["morphometry"]["tbm_perfect_warps"] == (0.5, 0.08)
    with pytest.raises(BrainsexError, match="no precision_at_10 rows for the volume effect at 4 mm"):
        study_grid_summary(_table(), 4.0)


def test_read_study_with_and_without_its_record(tmp_path):
    missing = read_study(tmp_path / "none")
    assert missing.table is None and "no study table" in missing.made
    out = ValidityDir(tmp_path / "study")
    out.root.mkdir(parents=True)
    write_table(_table(), out.study_table)
    assert read_study(out.root).made == "no record of the command was found"
    out.study_info.write_text(json.dumps({"date": "2026-12-03T16:00:00+00:00", "seconds": 5400,
                                          "command": "python -m brainsex.validity study --voxel-sizes 8 2"}))
    rec = read_study(out.root)
    assert rec.made == "made on 2026-12-03 in 1.5 h with `python -m brainsex.validity study --voxel-sizes 8 2`"
    assert len(rec.table) == len(_table())
    out.study_info.write_text("{broken")
    with pytest.raises(BrainsexError, match="validity_study.json: not valid JSON"):
        read_study(out.root)
