# SPDX-License-Identifier: Apache-2.0
"""The collection's networks, one per file.

Every module of this package is imported here and the names in its ``__all__`` exported (and again as
``networks.<name>``), so a new network is one new file: nothing lists the files.
"""

from __future__ import annotations

from networks.registry import import_network_modules

__all__: list[str] = []
for _module in import_network_modules(__name__):
    for _name in _module.__all__:
        if _name in __all__:
            raise ImportError(f"{_module.__name__} exports {_name!r}, which another network module exports too")
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
