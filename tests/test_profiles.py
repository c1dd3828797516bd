import pytest

from brainsex import BrainsexError
from brainsex.profiles import load_profiles, parse_override, resolve_profile


def test_shipped_profiles_have_the_same_keys():
    profiles = load_profiles()
    assert {"demo", "smoke", "paper"} <= set(profiles)
    keys = {name: set(p["params"]) for name, p in profiles.items()}
    assert keys["demo"] == keys["smoke"] == keys["paper"]


def test_paper_profile_is_the_papers_settings():
    p = resolve_profile("paper")
    assert p["voxel_size"] == 1.0 and p["epochs"] == 50 and p["batch_size"] == 16 and p["lr"] == 0.01
    assert p["channels"] == [32, 64, 128, 256, 256, 64]


def test_override_replaces_and_parses():
    p = resolve_profile("demo", {"epochs": parse_override("3"), "channels": parse_override("[1, 2]")})
    assert p["epochs"] == 3 and p["channels"] == [1, 2]
    assert parse_override("0.5") == 0.5 and parse_override("abc") == "abc" and parse_override("true") is True


def test_unknown_profile_is_named():
    with pytest.raises(BrainsexError, match="unknown profile 'nope'.*demo"):
        resolve_profile("nope")


def test_unknown_parameter_is_named():
    with pytest.raises(BrainsexError, match="unknown parameter 'epohcs'"):
        resolve_profile("demo", {"epohcs": 3})
    # a parameter that a notebook declares is fine even if the profile lacks it
    assert resolve_profile("demo", {"threshold": 0.3}, known={"threshold"})["threshold"] == 0.3


def test_notebook_parameter_cells_are_the_demo_profile():
    """profiles.yaml is the single source of defaults: each chapter's parameter cell repeats the demo
    profile's values (so that a chapter run by hand, or on Colab, is the demo), never other ones."""
    from pathlib import Path

    from brainsex.book import notebook_parameters, toc_notebooks

    root = Path(__file__).resolve().parents[1]
    demo = resolve_profile("demo")
    checked = 0
    for nb in toc_notebooks(root):
        params = notebook_parameters(nb)
        assert params.get("profile") == "demo" and params.get("run_dir") == "runs/demo", nb.stem
        for key in set(params) & set(demo):
            assert params[key] == demo[key], (nb.stem, key, params[key], demo[key])
            checked += 1
    assert checked >= 20


def test_study_profile_is_separate_from_the_book_profiles():
    assert "study" not in load_profiles() and set(load_profiles("study")) == {"study"}
    study = resolve_profile("study", kind="study")
    assert study["select"] in ("val_loss", "last") and study["voxel_sizes"]
    with pytest.raises(BrainsexError, match="unknown profile 'study'"):
        resolve_profile("study")
