"""How closely generated videos follow their visual condition: the correlation between the edge
maps of the generated frames and of the control video.

Edges are compared after a 5x5 box blur, so an edge one or two pixels off still counts (a
diffusion model decoded from a latent grid 8x coarser does not place edges to the pixel). The
number is Pearson's r over all pixels of a clip; a control that steers generation shows a higher
r with its own video's edges than with another video's (the mismatched baseline).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLUR = 5


def blurred(edges: np.ndarray) -> torch.Tensor:
    """(t, h, w) edge maps, any scale -> (t, h, w) float, box-blurred."""
    maps = torch.as_tensor(np.asarray(edges), dtype=torch.float32)[:, None]
    return F.avg_pool2d(maps, BLUR, stride=1, padding=BLUR // 2, count_include_pad=False)[:, 0]


def edge_correlation(generated_edges: np.ndarray, control_edges: np.ndarray) -> float:
    """Pearson's r between two clips' blurred edge maps (t, h, w); 0 when either is constant."""
    if generated_edges.shape != control_edges.shape:
        raise ValueError(f"edge maps differ in shape: {generated_edges.shape} vs {control_edges.shape}")
    a, b = blurred(generated_edges).flatten().double(), blurred(control_edges).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else 0.0
