# SPDX-License-Identifier: Apache-2.0
"""The package layout, the one thing setup.cfg cannot say (everything else is there).

The bundles install with the code: ``bundles/`` of the checkout becomes ``bundletools/_bundles/`` of the installed
package (its spec, configs, card and licence per bundle; never ``models/``, ``eval/`` or ``segmentations/``), so
``bundletools-infer <name>`` finds them by name in any working directory (:mod:`bundletools.bundles`). A
checkout, and an editable install of it, keeps using ``bundles/`` itself.
"""

from setuptools import find_packages, setup

CODE = ["networks", "transforms", "bundletools"]
BUNDLES = "bundletools._bundles"  # a folder of data, not a module: nothing imports it

setup(
    packages=find_packages(include=[name for package in CODE for name in (package, f"{package}.*")]) + [BUNDLES],
    package_dir={BUNDLES: "bundles"},
    package_data={
        "bundletools": ["templates/*.json", "templates/*.conf"],
        BUNDLES: ["*/spec.json", "*/LICENSE", "*/configs/*.json", "*/configs/*.conf", "*/docs/*"],
    },
)
