# SPDX-License-Identifier: Apache-2.0
"""Every bundle runs unchanged in MONAI Deploy App SDK's ``MonaiBundleInferenceOperator``.

That operator reads a bundle's ``configs/inference.json`` and ``metadata.json``, drops the ``preprocessing``
transforms whose class name contains ``LoadImage`` (and the ``postprocessing`` ones containing ``SaveImage``),
and feeds the rest ``{"image": volume}``: the volume its ``DICOMSeriesToVolumeOperator`` made of a series, as a
MetaTensor without a channel axis (``original_channel_dim`` "no_channel", RAS ``affine``, ``space`` RAS, no file
name). It takes the ``device`` and ``inferer`` keys, builds ``network`` (else ``network_def``) and loads
``models/model.pt`` into it, and hands ``postprocessing`` the prediction with the preprocessed image (``Invertd``).

- ``test_the_sdk_segments_a_dicom_series_as_the_batch_runner_does``: the SDK for real, nothing stubbed, in its
  own venv (``.venv-deploy``: ``bash scripts/setup_deploy.sh`` installs monai-deploy-app-sdk 4.0.0, the Holoscan
  runtime it brings, and this project; ``$MONAI_DEPLOY_PYTHON`` names another). The example application
  ``deploy/app.py`` runs, as a user runs it, the SDK's DICOM loader, series selector, series-to-volume
  converter, bundle inference operator and DICOM SEG writer in a Holoscan graph on a DICOM study made from a
  real Task04 case (a sagittal T1 series beside a localizer and a CT series, which the selector must pass over),
  for every bundle with seeded random weights. Its SEG must reference that series, be on its grid, and hold
  the labels the batch runner gives the same series (its own DICOM SEG, compared per source slice). Skipped
  without the venv, failed instead when ``REQUIRE_MONAI_DEPLOY=1``.
- ``test_preprocessing_without_the_loader_takes_an_in_memory_volume``: no SDK needed; what the operator relies
  on in every bundle's config: exactly the loader is dropped, and what remains takes the volume it builds.
"""

from __future__ import annotations

import shutil
import subprocess

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from tests.utils import (ALL_BUNDLES, BUNDLES, CASE, REPO, batch, deploy_python, random_model, shared_data,
                         subprocess_env, write_mr_series)

# a sagittal series (rows along A, columns along I, slices stacked towards R): every axis flipped or permuted on the
# way to RAS and back, with direction cosines that DICOM's decimal strings hold exactly. Oblique cosines are
# rounded in the files, and the SDK's affine (from the first and last slice positions) and ITK's (from the slice
# normal) then differ by about 1e-5, which moves the grid MONAI resamples to by a fraction of a voxel. The pixels
# are square: the SDK's affine takes the spacing between rows for both in-plane axes.
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: the axes in LPS
SPACING = (1.0, 1.0, 1.5)
ORIGIN = (-12.5, 30.25, 4.0)


def _parser(bundle: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    parser.read_meta(BUNDLES / bundle / "configs" / "metadata.json")
    return parser


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_preprocessing_without_the_loader_takes_an_in_memory_volume(bundle):
    preprocessing = _parser(bundle).get_parsed_content("preprocessing")
    kept = [t for t in preprocessing.transforms if "LoadImage" not in type(t).__name__]
    assert len(kept) == len(preprocessing.transforms) - 1  # the loader, and only it
    assert type(kept[0]).__name__ == "EnsureChannelFirstd"  # the channel axis is a step of its own
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    volume = MetaTensor(torch.randint(0, 200, (35, 51, 24), dtype=torch.int16),
                        meta={"affine": torch.as_tensor(affine), "original_affine": affine, "space": "RAS",
                              "original_channel_dim": "no_channel", "spatial_shape": np.array([35, 51, 24])})
    image = Compose(kept)({"image": volume})["image"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.dtype == torch.float32


def _random_model_with_varied_labels(bundle: str, root, image_file) -> None:
    """``root/models/model.pt``: the bundle's seeded random weights (:func:`tests.utils.random_model`) with the
    bias of the output layer moved so that every class wins about as often on ``image_file``. Random networks
    mostly score one class highest everywhere, and a label map of one value would not show an axis flipped."""
    random_model(bundle, root)
    parser = _parser(bundle)
    parser.update({"device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(root / "models" / "model.pt"))
    inferer = parser.get_parsed_content("inferer")
    image = parser.get_parsed_content("preprocessing")({"image": str(image_file)})["image"][None].as_tensor()

    def mean_logits() -> torch.Tensor:
        with torch.no_grad():
            logits = inferer(image, network)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits  # deep supervision: the prediction
        return logits[0].flatten(1).mean(1)

    mean = mean_logits()
    for name, parameter in reversed(list(network.named_parameters())):
        if name.endswith("bias") and parameter.shape == mean.shape:
            with torch.no_grad():
                parameter -= mean
            if mean_logits().abs().max() < 1e-3:  # the output layer's: the class means are now equal
                torch.save(network.state_dict(), root / "models" / "model.pt")
                return
            with torch.no_grad():
                parameter += mean
    raise AssertionError(f"{bundle}: no bias of the output layer found")


def _source_labels(seg_file, uids: list[str]) -> np.ndarray:
    """The SEG's label of every pixel of every source slice, ``(slices, rows, columns)``: 0 where it has no frame."""
    seg = highdicom.seg.segread(seg_file)
    return np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                        skip_overlap_checks=True,
                                                        assert_missing_frames_are_empty=True))


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_the_sdk_segments_a_dicom_series_as_the_batch_runner_does(bundle, tmp_path):
    python = deploy_python()
    data = shared_data("Task04_Hippocampus")
    image = np.asarray(nib.load(data / "imagesTr" / f"{CASE}.nii.gz").dataobj)
    study = pydicom.uid.generate_uid()
    series = tmp_path / "study" / "t1"
    write_mr_series(series, image, SPACING, ORIGIN, SAGITTAL, study_uid=study, description="T1")
    # what the selector passes over: a localizer of 3 slices and a CT series with more slices than the T1
    others = tmp_path / "study" / "others"
    write_mr_series(others, image[:, :, 10:13], SPACING, ORIGIN, np.eye(3), study_uid=study, series_number=2,
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), prefix="LOC")
    write_mr_series(others, np.concatenate([image, image], axis=2), SPACING, ORIGIN, np.eye(3), study_uid=study,
                    series_number=3, modality="CT", prefix="CT")
    root = tmp_path / "models" / bundle  # -m tmp_path/models: a MAP's /opt/holoscan/models/<bundle>
    shutil.copytree(BUNDLES / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "segmentations"))
    _random_model_with_varied_labels(bundle, root, data / "imagesTr" / f"{CASE}.nii.gz")

    sdk_out = tmp_path / "sdk"
    proc = subprocess.run([str(python), str(REPO / "deploy" / "app.py"), "-i", str(tmp_path / "study"), "-o",
                           str(sdk_out), "-m", str(root.parent), "-w", str(tmp_path / "work")], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (sdk_seg,) = sdk_out.glob("*.dcm")

    report = batch(tmp_path / "study" / "t1", tmp_path / "runner", root, bundle, dicom_seg=True)
    assert report["summary"]["succeeded"] == 1, report["cases"]
    runner_seg = tmp_path / "runner" / "t1_seg.dcm"

    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir()]
    seg = pydicom.dcmread(sdk_seg, stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == slices[0].SeriesInstanceUID  # the T1 series
    assert (seg.Rows, seg.Columns) == (slices[0].Rows, slices[0].Columns)
    uids = [ds.SOPInstanceUID for ds in slices]
    sdk, ours = _source_labels(sdk_seg, uids), _source_labels(runner_seg, uids)
    assert sdk.shape == ours.shape == (image.shape[2], image.shape[1], image.shape[0])
    assert set(np.unique(ours)) == {0, 1, 2}
    # the same labels on the same grid; a voxel whose classes tie within float rounding may go either way (the
    # runner sums its convolutions with another number of threads)
    assert np.mean(sdk != ours) < 1e-3, f"{np.sum(sdk != ours)} of {sdk.size} pixels differ"
