# SPDX-License-Identifier: Apache-2.0
"""``python <app folder>``: what a MAP runs (the packager takes a folder with a ``__main__.py``)."""

from app import main

main()
