# SPDX-License-Identifier: Apache-2.0
"""Benchmarks: scripts that print their figures, not tests. Run each as a module from the repository root
(``python -m benchmarks.speed list``), so they share their helpers (``benchmarks.train_budget``,
``benchmarks.reference``) by plain imports."""
