"""The build refuses to publish subject-level data of non-shareable cohorts."""

from __future__ import annotations

import pandas as pd
import pytest

from brainsex.book import build
from brainsex.privacy import PrivacyError, protected_ids, scan_html
from tests.conftest import write_notebook


def _participants(run_dir, rows):
    (run_dir / "cohort").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run_dir / "cohort" / "participants.tsv", sep="\t", index=False)


def test_protected_ids_only_from_non_shareable(tmp_path):
    _participants(tmp_path, [
        {"participant_id": "sub-ADNI0001", "cohort": "ADNI", "shareable": False},
        {"participant_id": "sub-P001", "cohort": "phantom", "shareable": True},
    ])
    assert protected_ids(tmp_path) == {"sub-ADNI0001"}
    assert protected_ids(tmp_path / "nothing") == set()


def test_scan_matches_whole_tokens(tmp_path):
    (tmp_path / "a.html").write_text("<td>sub-01</td><td>sub-010</td>")
    (tmp_path / "b.html").write_text("<td>xsub-01x</td>")
    assert scan_html(tmp_path, {"sub-01"}) == {"a.html": ["sub-01"]}


@pytest.mark.slow
def test_build_over_non_shareable_cohort_is_refused(mini_book, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    _participants(run_dir, [{"participant_id": f"sub-CC{i:04d}", "cohort": "CC-359", "shareable": False}
                            for i in range(5)])
    # a chapter that (wrongly) prints a per-subject table of the non-shareable cohort
    write_notebook(mini_book / "notebooks" / "b.py",
                   "import pandas as pd\n"
                   "pd.read_csv(run_dir + '/cohort/participants.tsv', sep='\\t')",
                   params='run_dir = "."\nseed = 0\n')
    with pytest.raises(PrivacyError, match=r"refusing to publish.*sub-CC000"):
        build(mini_book, "smoke", run_dir=run_dir, out=out)
    assert not (out / "html").exists()  # nothing was published

    # aggregate-only output is fine
    write_notebook(mini_book / "notebooks" / "b.py",
                   "import pandas as pd\n"
                   "pd.read_csv(run_dir + '/cohort/participants.tsv', sep='\\t').groupby('cohort').size()",
                   params='run_dir = "."\nseed = 0\n')
    html = build(mini_book, "smoke", run_dir=run_dir, out=out)
    assert (html / "notebooks" / "b.html").is_file()
    assert not scan_html(html, protected_ids(run_dir))


def test_exclusions_of_non_shareable_cohorts_are_protected(tmp_path, repo_root):
    (tmp_path / "cohort").mkdir()
    pd.DataFrame([{"participant_id": "sub-X9", "cohort": "ADNI", "reason": "missing sex"},
                  {"participant_id": "sub-P9", "cohort": "phantom", "reason": "corrupt image"}]).to_csv(
        tmp_path / "cohort" / "exclusions.tsv", sep="\t", index=False)
    assert protected_ids(tmp_path, repo_root / "data_manifest.yaml") == {"sub-X9"}
