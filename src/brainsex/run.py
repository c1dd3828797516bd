"""The layout of a run directory: the one module that knows the name of every file a run writes.

Chapters, the command line, the validity study and the benchmarks ask :class:`RunDir` for a path
instead of joining literals, so that a file is renamed in one place::

    <run_dir>/
      cohort/participants.tsv, exclusions.tsv        CohortDir      (chapter 00, brainsex.cohorts)
      cohort/phantom/ ...                            PhantomDir     (brainsex.synthetic.make_cohort)
      preprocess/preprocessed.tsv, qc.tsv, warps/    PreprocessDir  (chapter 01, brainsex.preprocess)
      train/split.tsv, best.pt, last.pt, history.tsv TrainDir       (chapter 02, brainsex.train)
      evaluate/predictions.tsv, ...                  EvaluateDir    (chapter 03)
      tiv/tertiles.tsv, rtiv.json, ...               TivDir         (chapter 04)
      saliency/mean_*.nii.gz, spearman.json          SaliencyDir    (chapter 05)
      atlas/region_scores.tsv                        AtlasDir       (chapter 06)
      validity/*.tsv                                 ValidityDir    (chapter 07)
      notebooks/<chapter>.ipynb, .build/<chapter>.json, build.log   (brainsex.book)

A phantom's own tree (:class:`PhantomDir`) is BIDS-like: ``<pid>/anat/<pid>_T1w.nii.gz`` and its
ground truth under ``ground_truth/``. A real cohort has no ground truth: :attr:`RunDir.truth` is then
``None`` and :attr:`RunDir.has_truth` ``False``.

Nothing here reads or writes a file except :attr:`PhantomDir.has_truth`, which checks the one
marker a complete phantom writes last (``generation.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from brainsex._docs import fill_doc

__all__ = [
    "RunDir",
    "CohortDir",
    "PhantomDir",
    "PreprocessDir",
    "TrainDir",
    "EvaluateDir",
    "TivDir",
    "SaliencyDir",
    "AtlasDir",
    "ValidityDir",
    "BUNDLE_PATTERNS",
    "PHANTOM_COHORT",
]

#: Name (and folder under ``cohort/``) of the embedded synthetic cohort.
PHANTOM_COHORT = "phantom"


@dataclass(frozen=True)
class _Folder:
    """A folder of the run; subclasses name its files."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other


class PhantomDir(_Folder):
    """The tree :func:`brainsex.synthetic.make_cohort` writes (see :mod:`brainsex.synthetic`).

    Parameters
    ----------
    root : str or os.PathLike
        The phantom's root folder (``<run_dir>/cohort/phantom`` in the book).
    """

    @property
    def participants(self) -> Path:
        """``participants.tsv``: the phantom's demographics."""
        return self.root / "participants.tsv"

    @property
    def generation(self) -> Path:
        """``generation.json``: the arguments that made the tree (written last when complete)."""
        return self.root / "generation.json"

    @property
    def description(self) -> Path:
        """``dataset_description.json`` (BIDS)."""
        return self.root / "dataset_description.json"

    @fill_doc
    def image(self, participant_id: str) -> Path:
        """The scanner-space T1w image of a subject: ``<pid>/anat/<pid>_T1w.nii.gz``.

        Parameters
        ----------
        participant_id : str
            %(participant_id)s
        """
        pid = str(participant_id)
        return self.root / pid / "anat" / f"{pid}_T1w.nii.gz"

    @property
    def truth_dir(self) -> Path:
        """``ground_truth/``: everything that was planted."""
        return self.root / "ground_truth"

    @property
    def masks_dir(self) -> Path:
        """``ground_truth/masks/``: the true brain masks."""
        return self.truth_dir / "masks"

    @fill_doc
    def mask(self, participant_id: str) -> Path:
        """The true brain mask of a subject in scanner space: ``ground_truth/masks/<pid>_desc-brain_mask.nii.gz``.

        Parameters
        ----------
        participant_id : str
            %(participant_id)s
        """
        return self.masks_dir / f"{participant_id}_desc-brain_mask.nii.gz"

    @property
    def regions(self) -> Path:
        """``ground_truth/regions.tsv``: the planted regions (label, sign, effect)."""
        return self.truth_dir / "regions.tsv"

    @property
    def poses(self) -> Path:
        """``ground_truth/poses.tsv``: each subject's true pose, scale and scanner settings."""
        return self.truth_dir / "poses.tsv"

    @property
    def effect_map(self) -> Path:
        """``ground_truth/sex_effect_map.nii.gz``: male/female local volume ratio - 1."""
        return self.truth_dir / "sex_effect_map.nii.gz"

    @property
    def contrast_map(self) -> Path:
        """``ground_truth/sex_contrast_map.nii.gz``: the planted intensity effect (when there is one)."""
        return self.truth_dir / "sex_contrast_map.nii.gz"

    def truth_map(self, effect: str = "volume") -> Path:
        """The planted effect map of one kind.

        Parameters
        ----------
        effect : {"volume", "contrast"}, default="volume"
            ``"volume"`` (:attr:`effect_map`) or ``"contrast"`` (:attr:`contrast_map`).

        Raises
        ------
        BrainsexError
            For any other ``effect``.
        """
        if effect not in ("volume", "contrast"):
            from brainsex import BrainsexError

            raise BrainsexError(f"effect must be 'volume' or 'contrast', got {effect!r}")
        return self.effect_map if effect == "volume" else self.contrast_map

    @property
    def has_truth(self) -> bool:
        """Whether this folder holds a phantom (its ``generation.json`` exists)."""
        return self.generation.is_file()


class CohortDir(_Folder):
    """``<run_dir>/cohort/``: the pooled cohort table and the exclusions (chapter 00).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def participants(self) -> Path:
        """``participants.tsv``: one row per usable subject."""
        return self.root / "participants.tsv"

    @property
    def exclusions(self) -> Path:
        """``exclusions.tsv``: excluded subjects and why."""
        return self.root / "exclusions.tsv"

    def cohort(self, name: str) -> Path:
        """The folder of one synthetic cohort inside the run (``cohort/<name>``).

        Parameters
        ----------
        name : str
            The cohort's name in the manifest.
        """
        return self.root / name

    @property
    def phantom(self) -> PhantomDir:
        """The embedded phantom's tree (``cohort/phantom``)."""
        return PhantomDir(self.cohort(PHANTOM_COHORT))


class PreprocessDir(_Folder):
    """``<run_dir>/preprocess/``: preprocessed images and their tables (chapter 01).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def table(self) -> Path:
        """``preprocessed.tsv``: the participants with their preprocessed images and TIV."""
        return self.root / "preprocessed.tsv"

    @property
    def qc(self) -> Path:
        """``qc.tsv``: per-subject status, step times and quality measures."""
        return self.root / "qc.tsv"

    @property
    def qc_flags(self) -> Path:
        """``qc_flags.tsv``: cohort-relative outlier flags (:func:`brainsex.qc.review_registrations`)."""
        return self.root / "qc_flags.tsv"

    @property
    def warps(self) -> Path:
        """``warps/``: cached non-linear transforms to the template (saliency and validity chapters)."""
        return self.root / "warps"

    @fill_doc
    def subject(self, participant_id: str) -> Path:
        """A subject's folder, ``<pid>/`` (the id as given: ``sub-0001``).

        Parameters
        ----------
        participant_id : str
            %(participant_id)s
        """
        return self.root / str(participant_id)

    @fill_doc
    def subject_outputs(self, participant_id: str) -> dict[str, Path]:
        """The files preprocessing writes for a subject (BIDS-derivative names), by column name.

        Parameters
        ----------
        participant_id : str
            %(participant_id)s

        Returns
        -------
        dict
            ``image_pp`` (z-scored, template grid), ``mask_pp``, ``mask_native``, ``rigid_transform``,
            ``affine_transform`` and ``marker`` (written last: the subject is complete).
        """
        pid, d = str(participant_id), self.subject(participant_id)
        return {
            "image_pp": d / f"{pid}_space-template_desc-preproc_T1w.nii.gz",
            "mask_pp": d / f"{pid}_space-template_desc-brain_mask.nii.gz",
            "mask_native": d / f"{pid}_space-T1w_desc-brain_mask.nii.gz",
            "rigid_transform": d / f"{pid}_from-T1w_to-template_mode-rigid_xfm.mat",
            "affine_transform": d / f"{pid}_from-T1w_to-template_mode-affine_xfm.mat",
            "marker": d / f"{pid}_preprocess.json",
        }

    @fill_doc
    def syn_prefix(self, participant_id: str) -> Path:
        """Prefix of a subject's cached non-linear (SyN) transform files, inside its folder.

        Parameters
        ----------
        participant_id : str
            %(participant_id)s
        """
        pid = str(participant_id)
        return self.subject(pid) / f"{pid}_from-rigid_to-template_mode-syn_"


class TrainDir(_Folder):
    """``<run_dir>/train/`` (or any folder :func:`brainsex.train.train` writes to; chapter 02).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def split(self) -> Path:
        """``split.tsv``: participant_id, split (train/val/test), stratum."""
        return self.root / "split.tsv"

    @property
    def best(self) -> Path:
        """``best.pt``: the selected checkpoint (the profile's ``select`` rule)."""
        return self.root / "best.pt"

    @property
    def last(self) -> Path:
        """``last.pt``: the latest epoch, with the state needed to resume."""
        return self.root / "last.pt"

    @property
    def history(self) -> Path:
        """``history.tsv``: one row per epoch."""
        return self.root / "history.tsv"


class EvaluateDir(_Folder):
    """``<run_dir>/evaluate/``: test-set predictions and metrics (chapter 03).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def predictions(self) -> Path:
        """``predictions.tsv``: P(male) per test scan (:func:`brainsex.evaluate.make_predictions_table`)."""
        return self.root / "predictions.tsv"

    @property
    def predictions_with_baseline(self) -> Path:
        """``predictions_with_baseline.tsv``: the predictions with the TIV-only baseline's."""
        return self.root / "predictions_with_baseline.tsv"

    @property
    def subgroup_metrics(self) -> Path:
        """``subgroup_metrics.tsv``: the paper's Table 2."""
        return self.root / "subgroup_metrics.tsv"


class TivDir(_Folder):
    """``<run_dir>/tiv/``: the post-hoc head-size analysis (chapter 04).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def tertiles(self) -> Path:
        """``tertiles.tsv``: accuracy by TIV bin and sex (Table 3)."""
        return self.root / "tertiles.tsv"

    @property
    def rtiv(self) -> Path:
        """``rtiv.json``: the overlap range R_tiv with bootstrap intervals."""
        return self.root / "rtiv.json"

    @property
    def metrics_in_rtiv(self) -> Path:
        """``metrics_in_rtiv.tsv``: metrics inside and outside R_tiv."""
        return self.root / "metrics_in_rtiv.tsv"

    @property
    def rtiv_subset(self) -> Path:
        """``rtiv_subset.tsv``: the balanced subset of correct scans inside R_tiv."""
        return self.root / "rtiv_subset.tsv"


class SaliencyDir(_Folder):
    """``<run_dir>/saliency/``: average saliency maps (chapter 05).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    def mean_map(self, group: str) -> Path:
        """An average map: ``mean_<group>.nii.gz``.

        Parameters
        ----------
        group : str
            ``correct_F``, ``correct_M``, ``correct_all``, ``rtiv_subset`` or a TIV bin and sex
            (spaces and ``·`` are removed).
        """
        key = str(group).replace(" · ", "_").replace(" ", "")
        return self.root / f"mean_{key}.nii.gz"

    def mean_correct(self, sex: str = "all") -> Path:
        """Average map of the correctly classified scans of one sex (``F``, ``M``) or ``all``.

        Parameters
        ----------
        sex : {"F", "M", "all"}, default="all"
            ``"F"``, ``"M"`` or ``"all"``.
        """
        return self.mean_map(f"correct_{sex}")

    @property
    def mean_rtiv_subset(self) -> Path:
        """``mean_rtiv_subset.nii.gz``: the map scored against the atlas (chapter 06)."""
        return self.mean_map("rtiv_subset")

    @property
    def spearman(self) -> Path:
        """``spearman.json``: rank correlations between the average maps."""
        return self.root / "spearman.json"

    @property
    def maps_table(self) -> Path:
        """``maps.tsv``: file name and number of subjects of every average map (for the group-size rule)."""
        return self.root / "maps.tsv"


class AtlasDir(_Folder):
    """``<run_dir>/atlas/``: region scores (chapter 06).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def region_scores(self) -> Path:
        """``region_scores.tsv``: every atlas region's saliency scores, ranked."""
        return self.root / "region_scores.tsv"


class ValidityDir(_Folder):
    """``<run_dir>/validity/``: the validity chapter's tables (chapter 07) and the study's.

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    """

    @property
    def matched_phantom(self) -> Path:
        """``matched_phantom/``: a phantom run matched to a real run (:func:`brainsex.matched.matched_phantom_run`)."""
        return self.root / "matched_phantom"

    @property
    def method_comparison(self) -> Path:
        """``method_comparison.tsv``: every explanation method x scoring against the truth."""
        return self.root / "method_comparison.tsv"

    @property
    def summary(self) -> Path:
        """``validity_summary.tsv``: the comparison with the truth map and TBM rows."""
        return self.root / "validity_summary.tsv"

    @property
    def model_reliance(self) -> Path:
        """``model_reliance.tsv``: the model's logit change per counterfactual factor (:mod:`brainsex.reliance`)."""
        return self.root / "model_reliance.tsv"

    @property
    def explanation_vs_reliance(self) -> Path:
        """``explanation_vs_reliance.tsv``: each explanation ranking scored against the model's reliance."""
        return self.root / "explanation_vs_reliance.tsv"

    def tbm_regions(self, warps: str, n_subjects: int) -> Path:
        """Per-region morphometry table of one kind of warp on ``n_subjects``.

        Parameters
        ----------
        warps : str
            The warp's name as in :attr:`brainsex.validity.PositiveControl.tables` (its first word, before
            a comma or a space, goes into the file name).
        n_subjects : int
            Subjects in the test.
        """
        return self.root / f"tbm_regions_{str(warps).split(',')[0].split(' ')[0]}_{int(n_subjects)}.tsv"

    @property
    def size_experiments(self) -> Path:
        """``size_experiments.tsv``: the run's model beside size-only and region-only phantoms (chapter 07)."""
        return self.root / "size_experiments.tsv"

    @property
    def size_cache(self) -> Path:
        """``size_experiments/table_``: stem of the cached size-experiments table (:mod:`brainsex.cache`)."""
        return self.root / "size_experiments" / "table_"

    def size_variant(self, phantom: str) -> Path:
        """``size_experiments/<phantom>/``: one variant phantom's work folder, laid out like a run.

        Parameters
        ----------
        phantom
            The variant's name (:data:`brainsex.validity.SIZE_PHANTOMS`).
        """
        return self.root / "size_experiments" / str(phantom)

    def size_variant_test(self, phantom: str) -> Path:
        """``size_experiments/<phantom>/preprocess_test/``: the variant's test subjects, preprocessed with eTIV.

        Parameters
        ----------
        phantom
            The variant's name (:data:`brainsex.validity.SIZE_PHANTOMS`).
        """
        return self.size_variant(phantom) / "preprocess_test"

    @property
    def study_table(self) -> Path:
        """``validity_study.tsv``: the validity study's result (:func:`brainsex.validity.study`)."""
        return self.root / "validity_study.tsv"

    @property
    def study_info(self) -> Path:
        """``validity_study.json``: the study's arguments, time and command."""
        return self.root / "validity_study.json"


class RunDir(_Folder):
    """A run directory: every file name a run writes, in one place (see the module docstring).

    Parameters
    ----------
    root : str or os.PathLike
        The run directory (``runs/<profile>`` by default in the book).

    Examples
    --------
    >>> run = RunDir("runs/demo")
    >>> run.preprocess.table.as_posix()
    'runs/demo/preprocess/preprocessed.tsv'
    >>> run.phantom.image("sub-0001").as_posix()
    'runs/demo/cohort/phantom/sub-0001/anat/sub-0001_T1w.nii.gz'
    """

    @property
    def cohort(self) -> CohortDir:
        """``cohort/``."""
        return CohortDir(self.root / "cohort")

    @property
    def phantom(self) -> PhantomDir:
        """The embedded phantom's tree, ``cohort/phantom`` (whether or not it exists)."""
        return self.cohort.phantom

    @property
    def truth(self) -> PhantomDir | None:
        """The phantom holding this run's ground truth, or None (a real cohort has none)."""
        ph = self.phantom
        return ph if ph.has_truth else None

    @property
    def has_truth(self) -> bool:
        """Whether this run's cohort is a phantom with a known truth."""
        return self.truth is not None

    @property
    def preprocess(self) -> PreprocessDir:
        """``preprocess/``."""
        return PreprocessDir(self.root / "preprocess")

    @property
    def train(self) -> TrainDir:
        """``train/``."""
        return TrainDir(self.root / "train")

    @property
    def evaluate(self) -> EvaluateDir:
        """``evaluate/``."""
        return EvaluateDir(self.root / "evaluate")

    @property
    def tiv(self) -> TivDir:
        """``tiv/``."""
        return TivDir(self.root / "tiv")

    @property
    def saliency(self) -> SaliencyDir:
        """``saliency/``."""
        return SaliencyDir(self.root / "saliency")

    @property
    def atlas(self) -> AtlasDir:
        """``atlas/``."""
        return AtlasDir(self.root / "atlas")

    @property
    def validity(self) -> ValidityDir:
        """``validity/``."""
        return ValidityDir(self.root / "validity")

    @property
    def notebooks(self) -> Path:
        """``notebooks/``: the executed chapters."""
        return self.root / "notebooks"

    @fill_doc
    def executed(self, chapter: str) -> Path:
        """The executed notebook of a chapter, ``notebooks/<chapter>.ipynb``.

        Parameters
        ----------
        chapter : str
            %(chapter)s
        """
        return self.notebooks / f"{chapter}.ipynb"

    @property
    def stamps(self) -> Path:
        """``.build/``: one stamp per executed chapter (content hash and wall time)."""
        return self.root / ".build"

    @fill_doc
    def stamp(self, chapter: str) -> Path:
        """The build stamp of a chapter, ``.build/<chapter>.json``.

        Parameters
        ----------
        chapter : str
            %(chapter)s
        """
        return self.stamps / f"{chapter}.json"

    @property
    def build_log(self) -> Path:
        """``build.log``: the last jupyter-book log."""
        return self.root / "build.log"

    def file(self, key: str) -> Path:
        """A file named by a dotted key, e.g. ``"evaluate.subgroup_metrics"`` or ``"tiv.rtiv"``.

        Used by data files that point into a run (``data/paper_reported.yaml``).

        Parameters
        ----------
        key : str
            ``<folder>.<file>``: an attribute of :class:`RunDir` and one of that folder's.

        Raises
        ------
        BrainsexError
            When a part of ``key`` is not a public attribute of the layout, or ``key`` names a folder or
            a function instead of a file.
        """
        from brainsex import BrainsexError

        obj: object = self
        for part in str(key).split("."):
            if part.startswith("_") or not hasattr(type(obj), part):
                raise BrainsexError(f"run file key {key!r}: {part!r} is not a part of the run layout")
            obj = getattr(obj, part)
        if not isinstance(obj, Path):
            raise BrainsexError(f"run file key {key!r} names a folder or a function, not a file")
        return obj


#: Aggregate results of a run that go into the book's downloadable ``results.zip`` (no per-subject
#: rows), as glob patterns relative to the run directory.
BUNDLE_PATTERNS = tuple(
    p.relative_to("R").as_posix() for p in (
        RunDir("R").evaluate.subgroup_metrics, RunDir("R").tiv.tertiles, RunDir("R").tiv.metrics_in_rtiv,
        RunDir("R").tiv.rtiv, RunDir("R").train.history, RunDir("R").saliency.mean_map("*"),
        RunDir("R").saliency.spearman, RunDir("R").atlas.region_scores, RunDir("R").validity / "*.tsv",
        RunDir("R").stamp("*"),
    )
)
