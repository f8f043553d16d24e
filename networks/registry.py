# SPDX-License-Identifier: Apache-2.0
"""Named network configurations: a factory per configuration, registered next to its network.

A network file registers its papers' configurations as factories (``@register_network``) whose name is the
function's name, so tests, benchmarks and cards build "D-Net as the official code builds it" by name instead of
copying its arguments:

    >>> from networks import create_network, list_networks
    >>> list_networks("dnet*")
    ['dnet_official', 'dnet_paper']
    >>> net = create_network("dnet_official", out_channels=16)  # any constructor argument can be overridden

Every module of :mod:`networks.nets` is imported when the networks are listed or created by name, so a network
file added there is found without being listed anywhere else.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

__all__ = ["NetworkEntry", "create_network", "import_network_modules", "list_networks", "network_entry",
           "register_network"]

NETWORK_PACKAGE = "networks.nets"


@dataclass(frozen=True)
class NetworkEntry:
    """A registered configuration: its name, factory and an input of its own size, ``(B, C, *spatial)``."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]

    @property
    def description(self) -> str:
        """The first paragraph of the factory's docstring, on one line."""
        doc = inspect.getdoc(self.factory) or ""
        return " ".join(doc.split("\n\n")[0].split())


_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(*, input_shape: Sequence[int]) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the decorated factory under its function name.

    Args:
        input_shape: an input of the configuration, ``(B, C, *spatial)``, at the batch and size the benchmarks
            measure it at (``python -m benchmarks.speed``); the tests run it on the meta device.

    A factory takes keyword overrides of any constructor argument and returns the network.
    """

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        known = _REGISTRY.get(name)
        # a module imported again (importlib.reload) registers its factories again; another module may not take a name
        if known is not None and known.factory.__module__ != factory.__module__:
            raise ValueError(f"network {name!r} is registered by both {known.factory.__module__} and "
                             f"{factory.__module__}")
        _REGISTRY[name] = NetworkEntry(name, factory, tuple(int(s) for s in input_shape))
        return factory

    return register


def import_network_modules(package: str = NETWORK_PACKAGE) -> list[ModuleType]:
    """Import every module of ``package`` (each registers its configurations); return them, sorted by name."""
    root = importlib.import_module(package)
    return [importlib.import_module(f"{package}.{info.name}")
            for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda info: info.name)]


def list_networks(pattern: str = "*") -> list[str]:
    """Names of the registered configurations matching the shell-style ``pattern``, sorted."""
    import_network_modules()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def network_entry(name: str) -> NetworkEntry:
    """The registered configuration ``name`` (a ``KeyError`` lists the known names)."""
    if name not in _REGISTRY:
        import_network_modules()
    if name not in _REGISTRY:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_network(name: str, **overrides: Any) -> nn.Module:
    """Build the registered configuration ``name``, with ``overrides`` of its constructor arguments."""
    return network_entry(name).factory(**overrides)
