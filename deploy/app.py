# SPDX-License-Identifier: Apache-2.0
"""A MONAI Deploy application that segments a DICOM series with one of this project's bundles, unchanged.

The operators are MONAI Deploy App SDK's own (https://github.com/Project-MONAI/monai-deploy-app-sdk, 4.0):

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator
        -> MonaiBundleInferenceOperator (the bundle's configs/inference.json) -> DICOMSegmentationWriterOperator

The bundle operator reads the bundle's ``configs/inference.json`` and ``configs/metadata.json``, keeps its
``preprocessing`` minus the loader (``transforms.LoadImageSeriesd``: every transform whose class name contains
``LoadImage`` is dropped), its ``inferer`` and ``postprocessing``, builds ``network`` and loads
``models/model.pt`` into it; the labels come back on the series' grid and the SEG writer references the series.

Run it (in the venv of ``scripts/setup_deploy.sh``), from the repository root::

    .venv-deploy/bin/python deploy/app.py -i DICOM_FOLDER -o OUT -m bundles/unet_segmentation

``-m`` is a bundle folder with a trained ``models/model.pt``, or a folder holding one such bundle folder (a MAP's
``/opt/holoscan/models``). The series selected is the one with the most images among those of the bundle's
modality (``network_data_format.inputs.image.modality`` of its metadata) that are ORIGINAL/PRIMARY and not a
localizer. ``OUT`` gets one DICOM SEG file. See ``deploy/README.md`` for packaging it as a MAP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.sr.coding import Code

from bundletools.dicomseg import SEGMENT_CODES, segment_names

GENERIC_CODES = (("85756007", "Tissue"), ("85756007", "Tissue"), None)


def find_bundle(model_path: str | Path) -> Path:
    """The bundle folder: ``model_path`` itself when it holds ``configs/inference.json``, else its one sub-folder
    that does (the packager copies ``--models`` folders into ``/opt/holoscan/models/<name>``)."""
    path = Path(model_path)
    if (path / "configs" / "inference.json").is_file():
        return path
    bundles = sorted(p for p in path.glob("*") if (p / "configs" / "inference.json").is_file()) if path.is_dir() else []
    if len(bundles) != 1:
        raise ValueError(f"{path}: not a bundle folder, and it holds {len(bundles)} bundle folders, not one")
    return bundles[0]


def selection_rules(metadata: dict) -> str:
    """The series selector's rules (its JSON): the bundle's input modality, ORIGINAL and PRIMARY, no localizer."""
    modality = metadata["network_data_format"]["inputs"]["image"].get("modality", "")
    conditions = {"ImageType": ["ORIGINAL", "PRIMARY", "!LOCALIZER"]}
    if modality:
        conditions["Modality"] = f"(?i)^{modality}$"
    return json.dumps({"selections": [{"name": f"{modality or 'any'} series", "conditions": conditions}]})


def segment_descriptions(metadata: dict) -> list[SegmentDescription]:
    """One description per label but 0, named from ``outputs.pred.channel_def``, coded as the batch runner's SEG
    codes them (:data:`bundletools.dicomseg.SEGMENT_CODES`)."""
    descriptions = []
    for name in segment_names(metadata).values():
        (category, meaning_c), (kind, meaning_t), _ = SEGMENT_CODES.get(name.lower(), GENERIC_CODES)
        descriptions.append(SegmentDescription(
            segment_label=name, segmented_property_category=Code(category, "SCT", meaning_c),
            segmented_property_type=Code(kind, "SCT", meaning_t), algorithm_name=str(metadata.get("name", "")),
            algorithm_version=str(metadata.get("version", ""))))
    return descriptions


class BundleSegmentationApp(Application):
    """DICOM study in, DICOM SEG of the bundle's labels out; see the module docstring."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        bundle = find_bundle(app_context.model_path)
        # the SDK makes a generic model without a network of a model path that is a folder, and its bundle
        # operator would then use that instead of the bundle's network: it loads the bundle from bundle_path
        app_context.models = None
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        logging.info(f"bundle {bundle} ({metadata.get('name')} {metadata.get('version')})")

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(app_context.input_path),
                                         name="study_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=selection_rules(metadata), all_matched=True,
                                               sort_by_sop_instance_count=True, name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        segment = MonaiBundleInferenceOperator(
            self, input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)], app_context=app_context,
            bundle_path=bundle, bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="bundle_inference")
        writer = DICOMSegmentationWriterOperator(self, segment_descriptions=segment_descriptions(metadata),
                                                 output_folder=Path(app_context.output_path), name="dicom_seg_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, segment, {("image", "image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(segment, writer, {("pred", "seg_image")})


def main() -> None:
    BundleSegmentationApp().run()


if __name__ == "__main__":
    main()
