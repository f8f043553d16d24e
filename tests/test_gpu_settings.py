# SPDX-License-Identifier: Apache-2.0
"""The bundles' GPU settings (issue 22) on a machine without one: chosen by the device, composing, and harmless.

CI has no GPU, so these tests check what a CPU can: that every bundle's ``train.json`` picks the GPU settings when
CUDA is reported and today's CPU settings otherwise, that the settings a CPU can run (the in-thread loader, the
memory format, determinism, sparse training-state writes) train, that the cached training volumes survive an epoch
unchanged (the cache is not copied for each sample any more), and that inference reads NIfTI without ITK (the GPU
machine has none). The GPU figures themselves come from ``python -m benchmarks.gpu_check``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import monai.inferers
import torch
from monai.bundle import ConfigParser

from tests.utils import ALL_BUNDLES, BUNDLES, REPO, UNET, random_model, subprocess_env



def _train_config(bundle: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "train.json")
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_the_device_chooses_the_training_settings(bundle, monkeypatch):
    cpu = _train_config(bundle)
    assert cpu.get_parsed_content("amp") is False
    assert str(cpu.get_parsed_content("data_device")) == "cpu"
    assert cpu.get_parsed_content("train#dataloader#num_workers") == cpu.get_parsed_content("num_workers")
    assert cpu.get_parsed_content("memory_format") == torch.preserve_format
    assert cpu.get_parsed_content("val_interval") == 1 and cpu.get_parsed_content("save_interval_s") == 0
    assert cpu.get_parsed_content("deterministic") is False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = _train_config(bundle)
    assert gpu.get_parsed_content("amp") is True and gpu.get_parsed_content("amp_dtype") == torch.bfloat16
    assert str(gpu.get_parsed_content("data_device")) == "cuda:0"
    assert gpu.get_parsed_content("train#dataloader#num_workers") == 0  # the cache lives on the GPU
    spatial_dims = len(gpu.get_parsed_content("train#patch_size")) - (1 if bundle == "transunet_segmentation" else 0)
    expected = {"csam_unet_segmentation": torch.preserve_format}.get(
        bundle, torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)
    assert gpu.get_parsed_content("memory_format") == expected
    assert gpu.get_parsed_content("val_interval") == 5 and gpu.get_parsed_content("save_interval_s") == 60
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _train_config(bundle).get_parsed_content("amp_dtype") == torch.float16


def test_loss_scaling_only_for_float16():
    from bundletools.training import fit_loss_scaling

    class Trainer:  # what fit_loss_scaling reads and writes of a SupervisedTrainer
        scaler = "MONAI's GradScaler"

    trainer = Trainer()
    fit_loss_scaling(trainer, torch.float16)
    assert trainer.scaler == "MONAI's GradScaler"
    fit_loss_scaling(trainer, torch.bfloat16)
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and not trainer.scaler.is_enabled()


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_an_epoch_leaves_the_cached_training_volumes_unchanged(bundle, synthetic_msd, tmp_path):
    """The training cache is handed to the random transforms without a copy (``copy_cache: false``): no random
    transform of any bundle may change it in place."""
    parser = _train_config(bundle, bundle_root=str(tmp_path), dataset_dir=str(synthetic_msd), num_workers=0,
                           check_data=False)
    dataset = parser.get_parsed_content("train#dataset")
    before = [{k: v.clone() for k, v in item.items() if isinstance(v, torch.Tensor)} for item in dataset._cache]
    batches = list(parser.get_parsed_content("train#dataloader"))
    assert batches and all(type(b["image"]) is torch.Tensor for b in batches)  # plain tensors reach the network
    for item, saved in zip(dataset._cache, before):
        for key, value in saved.items():
            assert torch.equal(item[key], value), f"{bundle}: the cached {key} changed during an epoch"


@pytest.mark.slow
def test_the_gpu_loader_path_trains_on_the_cpu(synthetic_msd, tmp_path):
    """What the GPU settings change that a CPU can run: batches from one loader thread (no worker processes),
    channels-last input, determinism on, and the training state written only after the last epoch."""
    parser = _train_config(UNET, bundle_root=str(tmp_path), dataset_dir=str(synthetic_msd),
                           epochs=2, num_workers=0, memory_format="$torch.channels_last_3d", deterministic=True,
                           save_interval_s=3600, roi_size=[32, 32, 32])
    writes = []
    from bundletools import handlers

    save = handlers.atomic_torch_save
    handlers.atomic_torch_save = lambda obj, path: (writes.append(path.name), save(obj, path))
    try:
        for _ in parser.get_parsed_content("initialize"):
            pass
        trainer = parser.get_parsed_content("train#trainer")
        trainer.run()
    finally:
        handlers.atomic_torch_save = save
        torch.use_deterministic_algorithms(False)
    assert trainer.state.epoch == 2 and torch.isfinite(torch.tensor(trainer.state.metrics["train_loss"]))
    assert writes.count("training_state.pt") == 1
    assert torch.load(tmp_path / "models" / "training_state.pt", weights_only=True)["epoch"] == 2


def test_inference_reads_nifti_without_itk(tmp_path):
    """The GPU machine has no ITK: a NIfTI folder is segmented with ITK unimportable."""
    import nibabel as nib
    import numpy as np


    root = random_model(UNET, tmp_path / "root")
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 24, 16)).astype(np.float32), np.eye(4)),
             str(scans / "case.nii.gz"))
    script = textwrap.dedent(f"""
        import sys
        class NoITK:
            def find_spec(self, name, path=None, target=None):
                if name == "itk" or name.startswith("itk."):
                    raise ImportError("ITK is not installed here")
        sys.meta_path.insert(0, NoITK())
        from bundletools.infer import main
        main(["{BUNDLES / UNET}", "{scans}", "{tmp_path / 'out'}", "--bundle_root", "{root}", "--num_workers", "0"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "case_seg.nii.gz").is_file()


def test_stitch_limit_and_where_a_case_is_stitched(monkeypatch):
    from types import SimpleNamespace

    from bundletools.inferers import stitch_voxel_limit, stitches_on_device

    assert stitch_voxel_limit("cpu", 3) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=8 * 10**9))
    assert stitch_voxel_limit("cuda:0", 3) == 100_000_000  # a quarter of 8 GB over 5 float32 per voxel

    assert stitches_on_device(SimpleNamespace(), 10**9)  # no window device: the whole case goes to the device
    windows = dict(sw_device="cuda:0", device=None, cpu_thresh=1000)
    assert stitches_on_device(SimpleNamespace(**windows), 1000)
    assert not stitches_on_device(SimpleNamespace(**windows), 1001)  # too large: stitched on the CPU
    assert not stitches_on_device(SimpleNamespace(**{**windows, "device": "cpu"}), 10)  # the CPU, as configured
    assert stitches_on_device(SimpleNamespace(**{**windows, "cpu_thresh": None}), 10**9)


def test_the_device_chooses_where_inference_stitches(monkeypatch):
    for bundle in ALL_BUNDLES:
        parser = ConfigParser()
        parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
        inferer = parser.get_parsed_content("inferer")
        assert str(inferer.device) == "cpu" and inferer.cpu_thresh is None, bundle
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 8e9}))
    for bundle in ALL_BUNDLES:
        parser = ConfigParser()
        parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
        assert parser.get_parsed_content("stitch_device") is None, bundle
        assert parser.get_parsed_content("inferer#cpu_thresh") > 10**7, bundle
        assert parser.get_parsed_content("sw_batch_size") >= 16, bundle


class OutOfMemoryOnce(monai.inferers.SlidingWindowInferer):
    """A sliding window that runs out of device memory stitching on its input's device, as a GPU can."""

    calls: list = []

    def __call__(self, inputs, network, *args, **kwargs):
        OutOfMemoryOnce.calls.append(kwargs.get("device"))
        if "device" not in kwargs:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return super().__call__(inputs, network, *args, **kwargs)


def test_a_case_that_does_not_fit_for_stitching_on_the_device_is_stitched_on_the_cpu(tmp_path):
    import nibabel as nib
    import numpy as np


    root = random_model(UNET, tmp_path / "root")
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 24, 16)).astype(np.float32), np.eye(4)),
             str(scans / "case.nii.gz"))
    parser = ConfigParser()
    parser.read_config(BUNDLES / UNET / "configs" / "inference.json")
    parser.update({"bundle_root": str(root), "dataset_dir": str(scans), "output_dir": str(tmp_path / "out"),
                   "num_workers": 0, "stitch_device": None, "inferer#_target_": "tests.test_gpu_settings.OutOfMemoryOnce"})
    OutOfMemoryOnce.calls.clear()
    report = parser.get_parsed_content("evaluator").run()
    assert [case["status"] for case in report["cases"]] == ["succeeded"]
    assert OutOfMemoryOnce.calls == [None, torch.device("cpu")]
