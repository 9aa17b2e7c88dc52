"""Shared helpers for the walk figures and for picking positions: a 2-D PCA and token labels."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = ["pca_2d", "directions", "select_positions", "short"]


def directions(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """Unit vectors: residual states and token vectors live at very different norms, and the
    readout only cares about direction (the final norm rescales), so figures compare directions."""
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pca_2d(x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n 2"], Float[Tensor, "2"]]:
    """Coordinates of ``x`` on its first two principal axes and the variance ratio they explain."""
    x = x.double()
    centred = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2:
        return torch.zeros(x.shape[0], 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    coords = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    coords[:, :k] = centred @ vh[:k].T
    var = s**2
    ratio = torch.zeros(2, dtype=torch.float64)
    ratio[:k] = var[:k] / var.sum().clamp_min(1e-30)
    return coords, ratio


def select_positions(
    mask: Bool[Tensor, "batch pos"],
    positions: Union[str, None, int, Sequence[int]],
) -> tuple[Int[Tensor, "n"], Int[Tensor, "n"], Int[Tensor, "n"]]:
    """Rows, columns and per-prompt positions (counted over real tokens) to read.

    ``"last"``: each prompt's last real token; ``None``: every real token; an int or a list of
    ints: those positions among each prompt's real tokens (negative counts from the end), so
    left and right padding give the same answer.
    """
    rows, cols, pos = [], [], []
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().cpu()
        n = len(real)
        if positions == "last":
            wanted = [n - 1]
        elif positions is None:
            wanted = list(range(n))
        elif isinstance(positions, str):
            raise EmbedwalkError(f"positions must be 'last', None (all) or a list of ints, got {positions!r}")
        else:
            wanted = []
            for p in positions:
                if not isinstance(p, int) or isinstance(p, bool):
                    raise EmbedwalkError(f"positions must be ints, got {p!r}")
                q = p + n if p < 0 else p
                if not 0 <= q < n:
                    raise EmbedwalkError(
                        f"position {p} is out of range for prompt {b}, which has {n} tokens "
                        f"(valid: 0..{n - 1}, or negative from the end)"
                    )
                wanted.append(q)
        for q in wanted:
            rows.append(b)
            cols.append(int(real[q]))
            pos.append(q)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(pos)


def short(s: str, width: int = 12) -> str:
    """A token string safe to print in a table or a figure label."""
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= width else s[: width - 1] + "…"
