# SPDX-License-Identifier: Apache-2.0
"""What the tests share, in one module: paths, the bundles and networks (found, never listed), commands run as a
user runs them, inputs made at test time (DICOM series, weights files) and checks that hold for every network.

Fixtures live in ``conftest.py`` (pytest finds them); everything a test imports comes from here.
"""

from __future__ import annotations

import inspect
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser

from bundletools.bundles import bundle_names
from networks import network_entry
from networks.nets.transunet import TransUNet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))
BUNDLES = REPO / "bundles"
# every bundle under bundles/ (bundletools.bundles): a new bundle gets every per-bundle test without an edit here
ALL_BUNDLES = bundle_names()
UNET = "unet_segmentation"
CASE = "hippocampus_001"  # the Task04 case the DICOM tests make series of
AXIAL = np.eye(3)  # slice directions (LPS columns) of an axial series


# ------------------------------------------------------------------------------------- data and environment
def skip_or_fail(message: str, require_var: str) -> None:
    """Skip the test, or fail it when the environment variable ``require_var`` is ``1`` (as CI sets)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{message} and {require_var}=1")
    pytest.skip(message)


def shared_data(name: str) -> Path:
    """``../shared/data/<name>``; skips without it, fails instead when ``REQUIRE_SHARED_DATA=1`` (CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        skip_or_fail(f"real data {path} is not available", "REQUIRE_SHARED_DATA")
    return path


def shared_schema(name: str) -> Path:
    """``../shared/schemas/<name>`` (MONAI's metadata schema, for offline ``verify_metadata``)."""
    path = SHARED_DATA.parent / "schemas" / name
    if not path.is_file():
        skip_or_fail(f"{path} is not available", "REQUIRE_SHARED_DATA")
    return path


def venv_command(what: str, env_var: str, default: Path, setup_script: str, require_var: str) -> Path:
    """A command of one of the side venvs (MONAI Label, nnU-Net, MONAI Deploy): ``$<env_var>``, else ``default``
    (made by ``bash scripts/<setup_script>``). Skips without it; fails instead when ``<require_var>=1`` (CI)."""
    path = Path(os.environ.get(env_var, default))
    if not (path.is_file() and os.access(path, os.X_OK)):
        skip_or_fail(f"{what} is not installed at {path} (bash scripts/{setup_script}, or set {env_var})", require_var)
    return path


def monailabel_executable() -> Path:
    """The ``monailabel`` command of the MONAI Label venv (``REQUIRE_MONAILABEL=1`` in CI)."""
    return venv_command("MONAI Label", "MONAILABEL_BIN", REPO / ".venv-monailabel" / "bin" / "monailabel",
                        "setup_monailabel.sh", "REQUIRE_MONAILABEL")


def nnunet_python() -> Path:
    """The python of nnU-Net's venv (``REQUIRE_NNUNET=1`` turns its skip into a failure)."""
    return venv_command("nnU-Net", "NNUNET_PYTHON", REPO / ".venv-nnunet" / "bin" / "python", "setup_nnunet.sh",
                        "REQUIRE_NNUNET")


def deploy_python() -> Path:
    """The python of the MONAI Deploy App SDK venv (``REQUIRE_MONAI_DEPLOY=1`` in CI)."""
    return venv_command("MONAI Deploy App SDK", "MONAI_DEPLOY_PYTHON", REPO / ".venv-deploy" / "bin" / "python",
                        "setup_deploy.sh", "REQUIRE_MONAI_DEPLOY")


def subprocess_env() -> dict[str, str]:
    """Environment of the commands the tests start: without PYTHONPATH, so that nothing depends on it.

    The one exception is this checkout itself: when the tests were started with it on PYTHONPATH (a git worktree
    of a repository installed in editable mode from elsewhere), the commands must run this checkout's code too.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if str(REPO) in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


# ------------------------------------------------------------------------------ commands, as a user runs them
def run_bundle(args: list[str], cwd: Path, check: bool = True, timeout: int = 900, torchrun: int = 0,
               module: str = "monai.bundle"):
    """Run ``python -m monai.bundle <args>`` (or under torchrun with that many processes) as a user would;
    ``module`` runs another command line the same way."""
    launcher = [sys.executable, "-m", module]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                    "-m", module]
    env = subprocess_env()
    # explicit UTF-8: GDCM (SimpleITK's DICOM I/O, used in-process by some tests) resets the locale to "C", and
    # the default decoding would then be ASCII
    proc = subprocess.run(launcher + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n{proc.output[-6000:]}")
    return proc


# ----------------------------------------------------------------------- the package as pip installs it
# what a wheel is built from (nothing else of the checkout: no models, runs or data)
SOURCE_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "LICENSE")
SOURCE_FOLDERS = ("networks", "transforms", "bundletools", "bundles")
PROJECT_MODULES = ("bundletools", "networks", "transforms")


def copy_source(dest: Path) -> Path:
    """The files a wheel of this checkout is built from, copied to ``dest`` (so the build leaves nothing here)."""
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy(REPO / name, dest / name)
    for name in SOURCE_FOLDERS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns(
            "__pycache__", "models", "eval", "segmentations", "runs"))
    return dest


def build_wheel(dest: Path) -> Path:
    """A wheel of this checkout (``pip wheel --no-deps``, offline, with the running environment's setuptools)."""
    src = copy_source(dest / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(dest / "wheels"), str(src)], check=True, capture_output=True, text=True,
                   timeout=600, cwd=dest)
    (wheel,) = (dest / "wheels").glob("monai_segmentation_bundles-*.whl")
    return wheel


def fresh_venv(dest: Path) -> Path:
    """A new venv at ``dest`` (its ``bin/python``) that sees the packages of the running environment (torch, MONAI,
    pip, ...) through a ``.pth`` file, but not this project: neither its editable install nor a copy."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, capture_output=True,
                   timeout=300)
    python = dest / "bin" / "python"
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    deps = dest.parent / f"{dest.name}-deps"  # one link per installed distribution or module, the project's left out
    deps.mkdir()
    for folder in map(Path, site.getsitepackages()):
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            name = entry.name
            if (name.endswith(".pth") or name.startswith(("__editable__", "monai_segmentation_bundles"))
                    or name in PROJECT_MODULES or (deps / name).exists()):
                continue
            (deps / name).symlink_to(entry)
    (site_dir / "_deps.pth").write_text(f"{deps}\n")
    return python


def config_list(bundle: str, *names: str) -> str:
    """A ``--config_file`` value: one file, or several merged as MONAI does."""
    files = [str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


def random_model(bundle: str, root: Path, **overrides) -> Path:
    """``<root>/models/model.pt`` with the randomly initialised (seeded) weights of the bundle's network_def."""
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    parser.update(overrides)
    torch.manual_seed(0)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return root


def evaluator(scans: Path, out: Path, root: Path, bundle: str = UNET, **overrides):
    """The bundle's evaluator over ``scans``, as ``python -m monai.bundle run`` builds it (with the bundle's
    metadata.json, which names the DICOM SEG's segments)."""
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    parser.read_meta(BUNDLES / bundle / "configs" / "metadata.json")
    parser.update({"bundle_root": str(root), "dataset_dir": str(scans), "output_dir": str(out), "num_workers": 0,
                   **overrides})
    return parser.get_parsed_content("evaluator")


def batch(scans: Path, out: Path, root: Path, bundle: str = UNET, **overrides) -> dict:
    """The report of :func:`evaluator`'s run (no exit status)."""
    runner = evaluator(scans, out, root, bundle, **overrides)
    runner.exit_on_failure = False
    return runner.run()


def by_input(report: dict) -> dict[str, dict]:
    return {Path(c["input"]).name: c for c in report["cases"]}


# ----------------------------------------------------------------------------------- inputs made at test time
def write_dicom_series(folder: Path, volume_zyx: np.ndarray, spacing, origin, direction, uid: str,
                       modality: str = "MR") -> None:
    """One DICOM file per slice with the position and orientation tags that carry the geometry (SimpleITK's
    writer: no ImageType, an empty PatientID)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = direction
    for i in range(image.GetDepth()):
        s = image[:, :, i]
        s.SetMetaData("0020|000e", uid)  # series instance UID
        s.SetMetaData("0020|0032", "\\".join(f"{c:.6f}" for c in image.TransformIndexToPhysicalPoint((0, 0, i))))
        s.SetMetaData("0020|0037", "\\".join(f"{c:.6f}" for c in (d[0], d[3], d[6], d[1], d[4], d[7])))
        s.SetMetaData("0020|0013", str(i + 1))  # instance number
        s.SetMetaData("0008|0060", modality)
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(s)


def strip_preamble(folder: Path) -> None:
    for f in folder.iterdir():
        f.write_bytes(f.read_bytes()[132:])  # no preamble, no "DICM": the file starts with the meta group


def read_reference(path: Path) -> sitk.Image:
    """An input as SimpleITK reads it (a DICOM folder as a series)."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def write_mr_series(folder: Path, volume_xyz: np.ndarray, spacing, origin_lps, direction_lps: np.ndarray, *,
                    modality: str = "MR", image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M"),
                    series_number: int = 1, description: str = "", study_uid: str | None = None,
                    patient_id: str = "T1", prefix: str = "IM") -> None:
    """One MR Image Storage file per slice of ``volume_xyz`` (x: columns, y: rows, z: slices), with the geometry
    of an ITK image of that spacing, origin and direction (columns: the axes in LPS), in shuffled file names
    (``<prefix><number>``). ``folder`` may hold other series: several calls with one ``study_uid`` make a study
    (``modality`` goes into the MR files as it is, for tests of series selection)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = study_uid or generate_uid(), generate_uid()
    frame_of_reference = generate_uid(entropy_srcs=[study])  # one per study
    order = np.random.default_rng(0).permutation(volume_xyz.shape[2])
    for k in range(volume_xyz.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Test^Hippo", patient_id
        ds.ImageType = list(image_type)
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyID, ds.StudyDate, ds.StudyTime = "1", "20240101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = series_number, k + 1, "test"
        if description:
            ds.SeriesDescription = description
        position = np.asarray(origin_lps) + direction_lps[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction_lps[:, 0], *direction_lps[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        plane = np.ascontiguousarray(volume_xyz[:, :, k].T.astype(np.int16))
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"{prefix}{order[k]:04d}", enforce_file_format=True)


# ----------------------------------------------- Google's R50+ViT-B_16.npz, synthetic, for TransUNet's loader
NPZ = {"hidden": 64, "layers": 2, "heads": 4, "mlp": 128, "width": 32, "units": (2, 1, 1), "grid": 14}


def npz_model(in_channels: int = 3, img_size: int = 224) -> TransUNet:
    torch.manual_seed(0)
    return TransUNet(
        in_channels,
        9,
        img_size,
        hidden_size=NPZ["hidden"],
        num_layers=NPZ["layers"],
        num_heads=NPZ["heads"],
        mlp_dim=NPZ["mlp"],
        resnet_block_units=NPZ["units"],
        resnet_width_factor=NPZ["width"] / 64,
        decoder_channels=(32, 16, 16, 8),
        decoder_head_channels=64,
    )


def make_vit_r50_npz(path, drop: str | None = None, reshape: tuple[str, tuple] | None = None) -> dict:
    """Random arrays named and shaped as in Google's ``R50+ViT-B_16.npz`` (Flax HWIO / (in, out) layouts)."""
    rng = np.random.default_rng(0)
    hidden, heads, mlp, width = NPZ["hidden"], NPZ["heads"], NPZ["mlp"], NPZ["width"]
    head_dim = hidden // heads
    arrays = {}

    def put(name, *shape):
        arrays[name] = rng.standard_normal(shape).astype(np.float32)

    put("conv_root/kernel", 7, 7, 3, width)
    put("gn_root/scale", width)
    put("gn_root/bias", width)
    in_ch = width
    for block, units in enumerate(NPZ["units"], start=1):
        mid = width * 2 ** (block - 1)
        out = 4 * mid
        for unit in range(1, units + 1):
            prefix = f"block{block}/unit{unit}"
            put(f"{prefix}/conv1/kernel", 1, 1, in_ch, mid)
            put(f"{prefix}/conv2/kernel", 3, 3, mid, mid)
            put(f"{prefix}/conv3/kernel", 1, 1, mid, out)
            norms = [("gn1", mid), ("gn2", mid), ("gn3", out)]
            if unit == 1:
                put(f"{prefix}/conv_proj/kernel", 1, 1, in_ch, out)
                norms.append(("gn_proj", out))
            for name, channels in norms:
                put(f"{prefix}/{name}/scale", channels)
                put(f"{prefix}/{name}/bias", channels)
            in_ch = out
    put("embedding/kernel", 1, 1, in_ch, hidden)
    put("embedding/bias", hidden)
    put("Transformer/posembed_input/pos_embedding", 1, 1 + NPZ["grid"] ** 2, hidden)
    for layer in range(NPZ["layers"]):
        prefix = f"Transformer/encoderblock_{layer}"
        for name in ("query", "key", "value"):
            put(f"{prefix}/MultiHeadDotProductAttention_1/{name}/kernel", hidden, heads, head_dim)
            put(f"{prefix}/MultiHeadDotProductAttention_1/{name}/bias", heads, head_dim)
        put(f"{prefix}/MultiHeadDotProductAttention_1/out/kernel", heads, head_dim, hidden)
        put(f"{prefix}/MultiHeadDotProductAttention_1/out/bias", hidden)
        put(f"{prefix}/MlpBlock_3/Dense_0/kernel", hidden, mlp)
        put(f"{prefix}/MlpBlock_3/Dense_0/bias", mlp)
        put(f"{prefix}/MlpBlock_3/Dense_1/kernel", mlp, hidden)
        put(f"{prefix}/MlpBlock_3/Dense_1/bias", hidden)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            put(f"{prefix}/{norm}/scale", hidden)
            put(f"{prefix}/{norm}/bias", hidden)
    put("Transformer/encoder_norm/scale", hidden)
    put("Transformer/encoder_norm/bias", hidden)
    put("cls", 1, 1, hidden)
    put("head/kernel", hidden, 21843)
    put("head/bias", 21843)

    if drop is not None:
        del arrays[drop]
    if reshape is not None:
        put(*reshape[:1], *reshape[1])
    np.savez(path, **arrays)
    return arrays


# -------------------------------------------------------------------------------------------------- networks
# a new network file as a contributor writes one (the scratch_network fixture puts it next to the networks)
SCRATCH_NETWORK = '''"""A scratch network: one strided convolution down, one transposed convolution up."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from networks.registry import register_network

__all__ = ["ScratchNet", "scratch_tiny"]


class ScratchNet(nn.Module):
    """Conv 3 stride 2, ReLU, transposed conv 2 stride 2 to ``out_channels``; sizes must be even."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: int = 8) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.size_divisor = (2,) * spatial_dims
        self.down = Conv[Conv.CONV, spatial_dims](in_channels, channels, kernel_size=3, stride=2, padding=1)
        self.up = Conv[Conv.CONVTRANS, spatial_dims](channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % 2 for size in x.shape[2:]):
            raise ValueError(f"ScratchNet needs every spatial size divisible by 2, got {list(x.shape[2:])}.")
        return self.up(torch.relu(self.down(x)))


@register_network(input_shape=(1, 1, 16, 16, 16))
def scratch_tiny(**overrides: Any) -> ScratchNet:
    """The scratch network, 3D, 1 input channel, 3 classes."""
    return ScratchNet(**({"spatial_dims": 3, "in_channels": 1, "out_channels": 3} | overrides))
'''


def assert_network_conventions(name: str) -> None:
    """The face every network of the collection shows, for the registered configuration ``name`` (built on the
    meta device: shapes only, so paper-sized configurations cost nothing): MONAI's argument names (``spatial_dims``
    where the network has a choice, then ``in_channels``, ``out_channels``; one width name, ``channels``), the
    ``spatial_dims`` and ``size_divisor`` attributes, its registered input giving an output of the same size, and
    an input padded with ``DivisiblePad(k=net.size_divisor)`` (what the configs use) working where the unpadded
    one is refused."""
    from monai.transforms import DivisiblePad

    entry = network_entry(name)
    with torch.device("meta"):
        net = entry.factory().eval()
    names = list(inspect.signature(type(net)).parameters)
    start = (["spatial_dims"] if "spatial_dims" in names else []) + ["in_channels", "out_channels"]
    assert names[: len(start)] == start, f"{type(net).__name__}{names}"
    assert {"channels", "feature_sizes", "embed_dims", "features"} & set(names) <= {"channels"}

    shape = entry.input_shape
    assert len(net.size_divisor) == net.spatial_dims == len(shape) - 2
    assert all(size % divisor == 0 for size, divisor in zip(shape[2:], net.size_divisor)), (shape, net.size_divisor)
    with torch.no_grad():
        out = net(torch.zeros(shape, device="meta"))
        assert out.shape[0] == shape[0] and out.shape[2:] == shape[2:]
        odd = [s + 1 if d > 1 else s for s, d in zip(shape[2:], net.size_divisor)]
        padded = DivisiblePad(k=net.size_divisor)(torch.zeros(shape[1], *odd)).shape
        assert net(torch.zeros(shape[0], *padded, device="meta")).shape[2:] == padded[1:]
        with pytest.raises(ValueError, match="divisible by"):
            net(torch.zeros(shape[0], shape[1], *odd, device="meta"))
