# SPDX-License-Identifier: Apache-2.0
"""Inference wrappers around the networks, usable wherever MONAI expects a network (inferers, evaluators)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MonteCarloUncertainty"]


class MonteCarloUncertainty(nn.Module):
    """
    Monte-Carlo inference as a plain forward: the mean class probabilities with a voxelwise uncertainty map
    appended as one more channel.

    MONAI's inferers and evaluators call ``network(x)``; this module turns that call into
    ``network.predict_with_uncertainty(x, num_samples, measure)`` (as in
    :meth:`networks.CSAMUNet.predict_with_uncertainty`), so a sliding-window inferer stitches probabilities and
    uncertainty together. ``transforms.SplitUncertaintyd``
    separates them again in postprocessing. Put the module in eval mode (the evaluators do).

    Args:
        network: a module with ``predict_with_uncertainty(x, num_samples, measure) -> (probabilities, uncertainty)``.
        num_samples: Monte-Carlo samples per window (>= 1).
        measure: ``"entropy"`` (predictive entropy, in nats) or ``"variance"`` (variance of the class
            probabilities across samples, averaged over classes).

    Shapes:
        input ``(B, C_in, *spatial)``, output ``(B, C_out + 1, *spatial)``: probabilities, then the uncertainty.
    """

    def __init__(self, network: nn.Module, num_samples: int = 8, measure: str = "entropy") -> None:
        super().__init__()
        if not callable(getattr(network, "predict_with_uncertainty", None)):
            raise TypeError(f"{type(network).__name__} has no predict_with_uncertainty method.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if measure not in ("entropy", "variance"):
            raise ValueError(f"measure must be 'entropy' or 'variance', got {measure!r}.")
        self.network = network
        self.num_samples = int(num_samples)
        self.measure = measure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities, uncertainty = self.network.predict_with_uncertainty(x, self.num_samples, self.measure)
        return torch.cat([probabilities, uncertainty], dim=1)
