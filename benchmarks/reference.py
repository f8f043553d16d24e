# SPDX-License-Identifier: Apache-2.0
"""Build the authors' own networks from a local clone of their repository, for side-by-side timing only.

Nothing of the authors' code is in this repository: each loader imports the official files from the path the user
gives (``--reference /path/to/clone``) and stands in, for that import only, for the few third-party names they
import but that this project does not install (timm's ``DropPath``/``to_2tuple``/``trunc_normal_``,
``ml_collections.ConfigDict``, and torchvision/matplotlib imports that the network never uses). Each stand-in
is a plain equivalent (MONAI's ``DropPath``, torch's ``trunc_normal_``), so the official module computes what
it computes with those packages installed. The authors' package name (``networks``) clashes with this
project's, so their modules are loaded under private names and ``sys.modules`` is restored afterwards.

Repositories (HEADs read for the figures in the cards):

- D-Net: https://github.com/sotiraslab/DLK (``networks/DNet.py``, ``networks/DNet_blocks.py``)
- TransUNet: https://github.com/Beckschen/TransUNet (``networks/vit_seg_modeling*.py``, ``vit_seg_configs.py``)
- U-KAN: https://github.com/CUHK-AIM-Group/U-KAN (``Seg_UKAN/archs.py``, ``Seg_UKAN/kan.py``)
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from monai.networks.layers import DropPath
from torch import nn

__all__ = ["official_dnet", "official_transunet", "official_ukan"]


class _ConfigDict(dict):
    """The part of ``ml_collections.ConfigDict`` TransUNet's configs use: a dict with attribute access."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _stub_modules() -> dict[str, types.ModuleType]:
    """Modules the official files import; only the names below are used by the networks."""
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_layers = types.ModuleType("timm.models.layers")
    timm_layers.DropPath = DropPath
    timm_layers.to_2tuple = _to_2tuple
    timm_layers.trunc_normal_ = nn.init.trunc_normal_
    timm.models = timm_models
    timm_models.layers = timm_layers
    ml_collections = types.ModuleType("ml_collections")
    ml_collections.ConfigDict = _ConfigDict
    torchvision = types.ModuleType("torchvision")
    tv_transforms = types.ModuleType("torchvision.transforms")
    tv_utils = types.ModuleType("torchvision.utils")
    tv_utils.save_image = None
    torchvision.transforms, torchvision.utils = tv_transforms, tv_utils
    matplotlib = types.ModuleType("matplotlib")
    pyplot = types.ModuleType("matplotlib.pyplot")
    matplotlib.pyplot = pyplot
    return {
        "timm": timm,
        "timm.models": timm_models,
        "timm.models.layers": timm_layers,
        "ml_collections": ml_collections,
        "torchvision": torchvision,
        "torchvision.transforms": tv_transforms,
        "torchvision.utils": tv_utils,
        "matplotlib": matplotlib,
        "matplotlib.pyplot": pyplot,
    }


@contextlib.contextmanager
def _patched_modules(modules: dict[str, types.ModuleType], only_missing: bool = False) -> Iterator[None]:
    """Put ``modules`` into ``sys.modules`` (with ``only_missing``: where no real one is installed) for a while."""
    if only_missing:
        installed = {name for name in modules if importlib.util.find_spec(name.split(".")[0]) is not None}
        modules = {name: module for name, module in modules.items() if name not in installed}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _load(name: str, path: Path) -> types.ModuleType:
    """Execute the file ``path`` as a module called ``name``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --reference must be a clone of the official repository.")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_dnet(root: str | Path, in_channels: int, out_channels: int, deep_supervision: bool = True) -> nn.Module:
    """The official D-Net (HEAD) at its defaults: widths 48-768, 2 DLK blocks per level."""
    root = Path(root) / "networks"
    with _patched_modules(_stub_modules(), only_missing=True):
        blocks = _load("_official_dnet_blocks", root / "DNet_blocks.py")
        # DNet.py imports its blocks as ``networks.DNet_blocks``, and ``networks`` is this project's package
        package = types.ModuleType("networks")
        package.DNet_blocks = blocks
        with _patched_modules({"networks": package, "networks.DNet_blocks": blocks}):
            dnet = _load("_official_dnet", root / "DNet.py")
    return dnet.DNet(in_channels, None, None, None, out_channels, deep_supervision)


def official_transunet(root: str | Path, out_channels: int, img_size: int = 224) -> nn.Module:
    """The official TransUNet R50-ViT-B/16 as ``train.py`` builds it (``n_skip`` 3, grid ``img_size / 16``)."""
    package_dir = Path(root) / "networks"
    if not (package_dir / "vit_seg_modeling.py").is_file():
        raise FileNotFoundError(f"{package_dir}: no vit_seg_modeling.py; --reference must be a TransUNet clone.")
    # a package of their folder under a private name, so that its relative imports work
    package = types.ModuleType("_official_transunet")
    package.__path__ = [str(package_dir)]
    with _patched_modules(_stub_modules(), only_missing=True), _patched_modules({"_official_transunet": package}):
        modeling = importlib.import_module("_official_transunet.vit_seg_modeling")
    config = modeling.CONFIGS["R50-ViT-B_16"]
    config.n_classes = out_channels
    config.n_skip = 3
    config.patches.grid = (img_size // 16, img_size // 16)
    return modeling.VisionTransformer(config, img_size=img_size, num_classes=out_channels)


def official_ukan(root: str | Path, out_channels: int, channels: tuple[int, int, int] = (128, 160, 256)) -> nn.Module:
    """The official segmentation U-KAN as ``train.py`` builds it (``embed_dims`` from ``--input_list``)."""
    root = Path(root) / "Seg_UKAN"
    with _patched_modules(_stub_modules(), only_missing=True):
        kan = _load("_official_ukan_kan", root / "kan.py")
        utils = _load("_official_ukan_utils", root / "utils.py")
        with _patched_modules({"kan": kan, "utils": utils}):
            archs = _load("_official_ukan_archs", root / "archs.py")
    return archs.UKAN(out_channels, 3, embed_dims=list(channels))
