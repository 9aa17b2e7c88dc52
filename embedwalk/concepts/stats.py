"""Streaming sufficient statistics for linear read-outs of activations.

Everything in :mod:`embedwalk.concepts` (ridge regressions, class-mean / LDA
probes, their cross-validation) needs only second moments of the data, so we
accumulate those once, in one pass, and never hold the activations in memory.

Three accumulators share one interface (``update`` / ``merge`` /
``all_reduce`` / ``save`` / ``load``):

* :class:`MomentStats` -- count, means and *centred* cross-products of a pair
  X [n, p], Y [n, q].
* :class:`ClassStats` -- per-class count and mean of X plus the pooled
  within-class scatter.
* :class:`FoldedStats` -- one accumulator per cross-validation fold; rows go to
  a fold by a hash of their *group* id (prompt, entity), never by token, so
  k-fold CV needs a single pass: train(f) is the merge of the other folds.

Why centred float64 moments: activations sit far from the origin (a residual
stream with a mean of a few hundred on some dimensions is normal).  Raw sums
E[xx^T] - E[x]E[x]^T then cancel catastrophically; merging centred pieces with
Chan et al.'s parallel formula keeps the error at float64 round-off no matter
the offset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk.errors import EmbedwalkError
from .fitted import describe_identity, identity_of, merged_identity

__all__ = [
    "MomentStats",
    "ClassStats",
    "FoldedStats",
    "group_folds",
    "tensor_batches",
    "save_tensors",
    "load_tensors",
]

ACC = torch.float64
FORMAT_VERSION = 1
_META_KEY = "embedwalk"

ArrayLike = Any  # torch.Tensor | np.ndarray | Sequence


# --------------------------------------------------------------------------- helpers


def _as_tensor(a: ArrayLike) -> Tensor:
    if isinstance(a, Tensor):
        return a
    return torch.as_tensor(np.asarray(a))


def _rows(a: ArrayLike, device: torch.device | None) -> Float[Tensor, "n d"]:
    """A fresh float64 [n, d] copy on ``device`` (fresh, so we may edit it in place)."""
    t = _as_tensor(a)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise EmbedwalkError(f"expected a [n, d] array, got shape {tuple(t.shape)}")
    return t.to(device=device or t.device, dtype=ACC, copy=True)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write tensors to safetensors with ``meta`` as JSON in the file header (no pickle)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if _META_KEY not in header:
        raise EmbedwalkError(f"{path} is not an embedwalk statistics file")
    return tensors, json.loads(header[_META_KEY])


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device(device: torch.device | None, group=None) -> torch.device:
    # gloo reduces CPU tensors only; NCCL wants CUDA tensors.
    if torch.distributed.get_backend(group) == "gloo":
        return torch.device("cpu")
    if device is not None and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _all_reduce(t: Tensor, device: torch.device | None, group=None, op: str = "SUM") -> Tensor:
    buf = t.to(_comm_device(device, group)).contiguous()
    torch.distributed.all_reduce(buf, op=getattr(torch.distributed.ReduceOp, op), group=group)
    return buf.to(device or "cpu")


def _agree_shape(dims: tuple[int, ...] | None, n_dims: int, group=None) -> tuple[int, ...] | None:
    """The accumulator shape any rank has seen (None if no rank has data).

    A rank that saw no batch must still join every collective, or the others hang;
    this lets it size empty statistics instead of raising."""
    t = torch.tensor(dims if dims is not None else [-1] * n_dims, dtype=ACC)
    agreed = _all_reduce(t, None, group, op="MAX")
    if agreed[0] < 0:
        return None
    if dims is not None and tuple(int(v) for v in agreed) != tuple(dims):
        raise EmbedwalkError(f"ranks hold statistics of different shapes ({dims} here)")
    return tuple(int(v) for v in agreed)


# --------------------------------------------------------------------------- folds

_U64 = np.uint64


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # A fixed, well-mixed integer hash: identical in every process and Python
    # session (unlike hash(), which is salted per interpreter).
    with np.errstate(over="ignore"):
        z = z + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def group_folds(groups: ArrayLike, n_folds: int, seed: int = 0) -> Int[np.ndarray, " n"]:
    """Fold index in ``[0, n_folds)`` for each row, a deterministic hash of its group id.

    Integer ids hash with splitmix64, any other id by the blake2b digest of
    ``str(id)``.  The same id lands in the same fold in every batch, process and
    session, so a group can never be split across folds.  Folds are balanced only
    in expectation: with few groups some folds may be small or empty.
    """
    if n_folds < 2:
        raise EmbedwalkError(f"n_folds must be >= 2 (cross-validation holds one fold out), got {n_folds!r}")
    if isinstance(groups, Tensor):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1:
        g = g.reshape(-1)
    if g.dtype.kind in "iub":
        key = _splitmix64(np.array([seed], dtype=np.int64).astype(_U64))[0]
        h = _splitmix64(g.astype(np.int64).astype(_U64) ^ key)
        return (h % _U64(n_folds)).astype(np.int64)
    # Strings / objects: hash each distinct id once.
    uniq, inverse = np.unique(g.astype(str), return_inverse=True)
    salt = int(seed).to_bytes(8, "little", signed=True)
    folds = np.array(
        [
            int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8, salt=salt).digest(), "little")
            % n_folds
            for u in uniq
        ],
        dtype=np.int64,
    )
    return folds[inverse.reshape(-1)]


# --------------------------------------------------------------------------- moments


class MomentStats:
    """Count, means and centred cross-products of X [n, p] and Y [n, q], in float64.

    ``sxx = Σ (x - x̄)(x - x̄)ᵀ``, ``sxy = Σ (x - x̄)(y - ȳ)ᵀ``, ``syy = Σ (y - ȳ)(y - ȳ)ᵀ``.
    ``Y`` is optional (q = 0) when only the covariance of X is wanted.

    Inputs may be any float dtype on any device; the accumulator lives on the
    device of the first batch unless ``device`` is given, and takes its sizes
    from the first batch unless they are given.

    ``source`` (a model or an activation store the rows come from) records the model and
    residual basis in ``fitted_in`` (:mod:`embedwalk.concepts.fitted`); it is saved with the
    statistics, passed on to fits, and merging statistics of another model or basis raises
    EmbedwalkError. Without it ``fitted_in`` is None (unknown).
    """

    def __init__(
        self,
        n_features: int | None = None,
        n_targets: int | None = None,
        *,
        device: torch.device | str | None = None,
        source=None,
    ):
        self.n: int = 0
        self.fitted_in: dict | None = identity_of(source)
        self.device = torch.device(device) if device is not None else None
        self.mean_x: Tensor | None = None
        self.mean_y: Tensor | None = None
        self.sxx: Tensor | None = None
        self.sxy: Tensor | None = None
        self.syy: Tensor | None = None
        if n_features is not None:
            self._init(n_features, n_targets or 0, self.device or torch.device("cpu"))

    # -- construction ---------------------------------------------------------
    def _init(self, p: int, q: int, device: torch.device) -> None:
        self.device = torch.device(device)
        z = lambda *s: torch.zeros(*s, dtype=ACC, device=self.device)  # noqa: E731
        self.mean_x, self.mean_y = z(p), z(q)
        self.sxx, self.sxy, self.syy = z(p, p), z(p, q), z(q, q)

    @property
    def initialised(self) -> bool:
        return self.sxx is not None

    @property
    def n_features(self) -> int | None:
        return None if self.sxx is None else self.sxx.shape[0]

    @property
    def n_targets(self) -> int | None:
        return None if self.syy is None else self.syy.shape[0]

    def empty_like(self) -> "MomentStats":
        return MomentStats(self.n_features, self.n_targets, device=self.device, source=self.fitted_in)

    def copy(self) -> "MomentStats":
        out = MomentStats(device=self.device, source=self.fitted_in)
        out.n = self.n
        for k in ("mean_x", "mean_y", "sxx", "sxy", "syy"):
            v = getattr(self, k)
            setattr(out, k, None if v is None else v.clone())
        return out

    def __repr__(self) -> str:
        return (f"MomentStats(n={self.n}, p={self.n_features}, q={self.n_targets}, "
                f"fitted_in={describe_identity(self.fitted_in)!r})")

    # -- accumulation -----------------------------------------------------------
    def update(
        self,
        x: Float[Tensor, "n p"],
        y: Float[Tensor, "n q"] | None = None,
        groups: ArrayLike | None = None,
    ) -> "MomentStats":
        """Absorb a batch.  ``groups`` is accepted so every accumulator can be driven
        by the same loop; a single accumulator has no folds and ignores it."""
        x = _rows(x, self.device)
        y = x.new_zeros(x.shape[0], 0) if y is None else _rows(y, x.device)
        if x.shape[0] != y.shape[0]:
            raise EmbedwalkError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if not self.initialised:
            self._init(x.shape[1], y.shape[1], x.device)
        elif (x.shape[1], y.shape[1]) != (self.n_features, self.n_targets):
            raise EmbedwalkError(
                f"batch has p={x.shape[1]}, q={y.shape[1]}; stats have "
                f"p={self.n_features}, q={self.n_targets}"
            )
        b = x.shape[0]
        if b == 0:
            return self
        # Centre the batch on its own mean (exact in float64), then merge.
        mx, my = x.mean(0), y.mean(0)
        x.sub_(mx)
        y.sub_(my)
        self._absorb(b, mx, my, x.T @ x, x.T @ y, y.T @ y)
        return self

    def _absorb(self, n_b, mx_b, my_b, sxx_b, sxy_b, syy_b) -> None:
        # Chan, Golub & LeVeque (1979): the cross-products of the union are the
        # two centred parts plus a rank-one term in the difference of means.
        n_a = self.n
        n = n_a + n_b
        dx = mx_b - self.mean_x
        dy = my_b - self.mean_y
        w = n_a * n_b / n
        self.sxx += sxx_b + w * torch.outer(dx, dx)
        self.sxy += sxy_b + w * torch.outer(dx, dy)
        self.syy += syy_b + w * torch.outer(dy, dy)
        self.mean_x += dx * (n_b / n)
        self.mean_y += dy * (n_b / n)
        self.n = n

    def merge(self, other: "MomentStats") -> "MomentStats":
        """Fold ``other`` into ``self`` (in place) and return ``self``.

        Raises EmbedwalkError when both record a model / residual basis and they differ."""
        self.fitted_in = _merge_identity(self, other)
        if not other.initialised or other.n == 0:
            if not self.initialised and other.initialised:
                self._init(other.n_features, other.n_targets, other.device)
            return self
        if not self.initialised:
            self._init(other.n_features, other.n_targets, other.device)
        if (other.n_features, other.n_targets) != (self.n_features, self.n_targets):
            raise EmbedwalkError("cannot merge statistics of different shapes")
        d = self.device
        self._absorb(
            other.n,
            other.mean_x.to(d),
            other.mean_y.to(d),
            other.sxx.to(d),
            other.sxy.to(d),
            other.syy.to(d),
        )
        return self

    def __add__(self, other: "MomentStats") -> "MomentStats":
        return self.copy().merge(other)

    def all_reduce(self, group=None) -> "MomentStats":
        """Combine the statistics of all ranks (in place); a no-op without torch.distributed.

        Two sum-reductions: first counts and n·mean give the global means, then
        each rank re-centres its scatter on those (parallel-axis theorem) so the
        second sum is exact -- summing raw, uncentred moments would reintroduce
        the cancellation we avoid everywhere else.
        """
        if not _dist_ready():
            return self
        dims = (self.n_features, self.n_targets) if self.initialised else None
        shape = _agree_shape(dims, 2, group)
        if shape is None:
            return self
        if not self.initialised:
            self._init(*shape, self.device or torch.device("cpu"))
        d = self.device
        head = _all_reduce(
            torch.cat([torch.tensor([float(self.n)], dtype=ACC, device=d),
                       self.n * self.mean_x, self.n * self.mean_y]),
            d, group,
        )
        n = head[0].item()
        p = self.n_features
        gx = head[1 : 1 + p] / max(n, 1.0)
        gy = head[1 + p :] / max(n, 1.0)
        dx, dy = self.mean_x - gx, self.mean_y - gy
        parts = [
            self.sxx + self.n * torch.outer(dx, dx),
            self.sxy + self.n * torch.outer(dx, dy),
            self.syy + self.n * torch.outer(dy, dy),
        ]
        flat = _all_reduce(torch.cat([t.reshape(-1) for t in parts]), d, group)
        sizes = [t.numel() for t in parts]
        self.sxx, self.sxy, self.syy = (
            c.reshape(t.shape) for c, t in zip(flat.split(sizes), parts)
        )
        self.mean_x, self.mean_y, self.n = gx, gy, int(round(n))
        return self

    # -- derived quantities -----------------------------------------------------
    def cov_xx(self, ddof: int = 1) -> Float[Tensor, "p p"]:
        return self.sxx / max(self.n - ddof, 1)

    def cov_xy(self, ddof: int = 1) -> Float[Tensor, "p q"]:
        return self.sxy / max(self.n - ddof, 1)

    def cov_yy(self, ddof: int = 1) -> Float[Tensor, "q q"]:
        return self.syy / max(self.n - ddof, 1)

    def corr_xy(self) -> Float[Tensor, "p q"]:
        sx = self.sxx.diagonal().clamp_min(0).sqrt()
        sy = self.syy.diagonal().clamp_min(0).sqrt()
        return self.sxy / (sx[:, None] * sy[None, :]).clamp_min(torch.finfo(ACC).tiny)

    # -- persistence ------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialised:
            return {"n": torch.tensor(0.0, dtype=ACC)}
        return {
            "n": torch.tensor(float(self.n), dtype=ACC),
            "mean_x": self.mean_x, "mean_y": self.mean_y,
            "sxx": self.sxx, "sxy": self.sxy, "syy": self.syy,
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], device=None, fitted_in: dict | None = None) -> "MomentStats":
        out = cls(device=device, source=fitted_in)
        if "sxx" in sd:
            dev = torch.device(device) if device is not None else sd["sxx"].device
            out._init(sd["sxx"].shape[0], sd["syy"].shape[0], dev)
            for k in ("mean_x", "mean_y", "sxx", "sxy", "syy"):
                setattr(out, k, sd[k].to(device=dev, dtype=ACC).clone())
        out.n = int(round(sd["n"].item()))
        return out

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.state_dict(),
                     {"class": "MomentStats", "format_version": FORMAT_VERSION, **self._meta()})

    def _meta(self) -> dict:
        return {"fitted_in": self.fitted_in}

    @classmethod
    def load(cls, path: str | Path, device=None) -> "MomentStats":
        sd, meta = load_tensors(path)
        _check_class(meta, cls.__name__)
        return cls.from_state_dict(sd, device, fitted_in=meta.get("fitted_in"))


# --------------------------------------------------------------------------- classes


class ClassStats:
    """Per-class count and mean of X [n, p] and the pooled within-class scatter.

    ``sw = Σ_c Σ_{i∈c} (x_i - μ_c)(x_i - μ_c)ᵀ`` -- all that class-mean and LDA
    probes need.  Labels are integers in ``[0, n_classes)``.  ``source`` and
    ``fitted_in`` as for :class:`MomentStats`.
    """

    def __init__(
        self,
        n_classes: int,
        n_features: int | None = None,
        *,
        device: torch.device | str | None = None,
        class_names: Sequence[str] | None = None,
        source=None,
    ):
        self.fitted_in: dict | None = identity_of(source)
        if class_names is not None and len(class_names) != n_classes:
            raise EmbedwalkError("class_names must have n_classes entries")
        self.n_classes = int(n_classes)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.device = torch.device(device) if device is not None else None
        self.counts: Tensor | None = None
        self.means: Tensor | None = None
        self.sw: Tensor | None = None
        if n_features is not None:
            self._init(n_features, self.device or torch.device("cpu"))

    def _init(self, p: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.counts = torch.zeros(self.n_classes, dtype=ACC, device=self.device)
        self.means = torch.zeros(self.n_classes, p, dtype=ACC, device=self.device)
        self.sw = torch.zeros(p, p, dtype=ACC, device=self.device)

    @property
    def initialised(self) -> bool:
        return self.sw is not None

    @property
    def n_features(self) -> int | None:
        return None if self.sw is None else self.sw.shape[0]

    @property
    def n(self) -> int:
        return 0 if self.counts is None else int(round(self.counts.sum().item()))

    def empty_like(self) -> "ClassStats":
        return ClassStats(self.n_classes, self.n_features, device=self.device,
                          class_names=self.class_names, source=self.fitted_in)

    def copy(self) -> "ClassStats":
        out = ClassStats(self.n_classes, device=self.device, class_names=self.class_names,
                         source=self.fitted_in)
        if self.initialised:
            out.counts, out.means, out.sw = self.counts.clone(), self.means.clone(), self.sw.clone()
        return out

    def __repr__(self) -> str:
        return (f"ClassStats(n={self.n}, n_classes={self.n_classes}, p={self.n_features}, "
                f"fitted_in={describe_identity(self.fitted_in)!r})")

    def update(
        self,
        x: Float[Tensor, "n p"],
        y: Int[Tensor, " n"],
        groups: ArrayLike | None = None,
    ) -> "ClassStats":
        x = _rows(x, self.device)
        labels = _as_tensor(y).reshape(-1).to(device=x.device, dtype=torch.long)
        if labels.shape[0] != x.shape[0]:
            raise EmbedwalkError(f"x has {x.shape[0]} rows but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise EmbedwalkError(f"labels must lie in [0, {self.n_classes})")
        if not self.initialised:
            self._init(x.shape[1], x.device)
        elif x.shape[1] != self.n_features:
            raise EmbedwalkError(f"batch has p={x.shape[1]}, stats have p={self.n_features}")
        if x.shape[0] == 0:
            return self
        C, p = self.n_classes, x.shape[1]
        counts = torch.bincount(labels, minlength=C).to(ACC)
        sums = torch.zeros(C, p, dtype=ACC, device=x.device).index_add_(0, labels, x)
        means = sums / counts.clamp_min(1)[:, None]
        x.sub_(means[labels])
        self._absorb(counts, means, x.T @ x)
        return self

    def _absorb(self, n_b, mu_b, sw_b) -> None:
        # Chan's update, one class at a time but vectorised: the pooled scatter
        # gains Σ_c w_c δ_c δ_cᵀ with w_c = n_a n_b / n for that class.
        n_a = self.counts
        n = n_a + n_b
        safe = n.clamp_min(1)
        d = mu_b - self.means
        w = n_a * n_b / safe
        self.sw += sw_b + (d * w[:, None]).T @ d
        self.means += d * (n_b / safe)[:, None]
        self.counts = n

    def merge(self, other: "ClassStats") -> "ClassStats":
        if other.n_classes != self.n_classes:
            raise EmbedwalkError("cannot merge ClassStats with different n_classes")
        self.fitted_in = _merge_identity(self, other)
        if not other.initialised:
            return self
        if not self.initialised:
            self._init(other.n_features, other.device)
        if other.n_features != self.n_features:
            raise EmbedwalkError("cannot merge statistics of different shapes")
        d = self.device
        self._absorb(other.counts.to(d), other.means.to(d), other.sw.to(d))
        return self

    def __add__(self, other: "ClassStats") -> "ClassStats":
        return self.copy().merge(other)

    def all_reduce(self, group=None) -> "ClassStats":
        """Combine across ranks in place (same two-stage scheme as MomentStats)."""
        if not _dist_ready():
            return self
        shape = _agree_shape((self.n_features,) if self.initialised else None, 1, group)
        if shape is None:
            return self
        if not self.initialised:
            self._init(shape[0], self.device or torch.device("cpu"))
        d = self.device
        head = _all_reduce(
            torch.cat([self.counts[:, None], self.counts[:, None] * self.means], 1), d, group
        )
        counts = head[:, 0]
        means = head[:, 1:] / counts.clamp_min(1)[:, None]
        delta = self.means - means
        sw = self.sw + (delta * self.counts[:, None]).T @ delta
        self.sw = _all_reduce(sw, d, group)
        self.counts, self.means = counts, means
        return self

    # -- derived quantities -----------------------------------------------------
    @property
    def priors(self) -> Float[Tensor, " c"]:
        return self.counts / self.counts.sum().clamp_min(1)

    @property
    def mean(self) -> Float[Tensor, " p"]:
        return self.priors @ self.means

    def within_cov(self, ddof: int = 0) -> Float[Tensor, "p p"]:
        """Pooled within-class covariance ``sw / (n - ddof)`` (ddof=0 as scikit-learn's LDA)."""
        return self.sw / max(self.n - ddof, 1)

    def between_scatter(self) -> Float[Tensor, "p p"]:
        d = self.means - self.mean
        return (d * self.counts[:, None]).T @ d

    def total_scatter(self) -> Float[Tensor, "p p"]:
        return self.sw + self.between_scatter()

    # -- persistence ------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if not self.initialised:
            return {"counts": torch.zeros(self.n_classes, dtype=ACC)}
        return {"counts": self.counts, "means": self.means, "sw": self.sw}

    def _meta(self) -> dict:
        return {"n_classes": self.n_classes, "class_names": self.class_names, "fitted_in": self.fitted_in}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], device=None, **meta) -> "ClassStats":
        out = cls(meta.get("n_classes", sd["counts"].shape[0]), device=device,
                  class_names=meta.get("class_names"), source=meta.get("fitted_in"))
        if "sw" in sd:
            dev = torch.device(device) if device is not None else sd["sw"].device
            out.device = dev
            out.counts, out.means, out.sw = (sd[k].to(device=dev, dtype=ACC).clone()
                                             for k in ("counts", "means", "sw"))
        return out

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.state_dict(),
                     {"class": "ClassStats", "format_version": FORMAT_VERSION, **self._meta()})

    @classmethod
    def load(cls, path: str | Path, device=None) -> "ClassStats":
        sd, meta = load_tensors(path)
        _check_class(meta, cls.__name__)
        return cls.from_state_dict(sd, device, **meta)


# --------------------------------------------------------------------------- folds


_ACCUMULATORS = {"MomentStats": MomentStats, "ClassStats": ClassStats}


def _merge_identity(a, b) -> dict | None:
    """The identity after merging ``b`` into ``a``: two known identities must agree; otherwise an
    empty side takes the other's and data of unknown origin makes the union unknown."""
    if a.fitted_in is not None and b.fitted_in is not None:
        return merged_identity(a.fitted_in, b.fitted_in, f"this {type(a).__name__} object")
    if b.n == 0:
        return a.fitted_in
    if a.n == 0:
        return b.fitted_in
    return merged_identity(a.fitted_in, b.fitted_in, f"this {type(a).__name__} object")


def _check_class(meta: dict, name: str) -> None:
    if meta.get("class") != name:
        raise EmbedwalkError(f"file holds {meta.get('class')!r}, not {name!r}")


class FoldedStats:
    """One accumulator per cross-validation fold, rows routed by group id.

    >>> fs = FoldedStats(5, seed=0)                     # MomentStats per fold
    >>> fs.update(x, y, groups=prompt_ids)              # every batch
    >>> fs.train(2), fs.test(2)                         # stats for fold 2's split

    ``accumulator`` builds an empty per-fold accumulator: ``MomentStats`` (the
    default), or e.g. ``lambda: ClassStats(n_classes)`` for probes.  ``source`` (a model
    or store) records every fold's ``fitted_in`` as for :class:`MomentStats`.
    """

    def __init__(
        self,
        n_folds: int = 5,
        seed: int = 0,
        accumulator: Callable[[], Any] = MomentStats,
        *,
        source=None,
    ):
        if n_folds < 2:
            raise EmbedwalkError(f"n_folds must be >= 2 (cross-validation holds one fold out), got {n_folds!r}")
        self.n_folds = int(n_folds)
        self.seed = int(seed)
        self.folds = [accumulator() for _ in range(self.n_folds)]
        ident = identity_of(source)
        if ident is not None:
            for a in self.folds:
                a.fitted_in = ident

    @property
    def fitted_in(self) -> dict | None:
        """The model and residual basis of the rows (None: unknown), as the folds record it."""
        idents = [a.fitted_in for a in self.folds if a.n > 0] or [self.folds[0].fitted_in]
        return idents[0] if all(i == idents[0] for i in idents) else None

    def __repr__(self) -> str:
        return (f"FoldedStats(n_folds={self.n_folds}, seed={self.seed}, counts={self.counts}, "
                f"fitted_in={describe_identity(self.fitted_in)!r})")

    def fold_of(self, groups: ArrayLike) -> Int[np.ndarray, " n"]:
        return group_folds(groups, self.n_folds, self.seed)

    @property
    def counts(self) -> list[int]:
        return [f.n for f in self.folds]

    def update(
        self,
        x: Float[Tensor, "n p"],
        y: Tensor | None = None,
        groups: ArrayLike | None = None,
        *,
        folds: ArrayLike | None = None,
    ) -> "FoldedStats":
        """Route each row to its group's fold.  ``folds`` (one index per row)
        overrides the hash, e.g. to reproduce an external split -- the caller then
        answers for keeping groups whole."""
        if folds is None:
            if groups is None:
                raise EmbedwalkError(
                    "FoldedStats.update needs `groups`: folds are assigned by group "
                    "(prompt / entity), never by token"
                )
            folds = self.fold_of(groups)
        f = _as_tensor(folds).reshape(-1).cpu().numpy().astype(np.int64)
        x = _as_tensor(x)
        if f.shape[0] != x.shape[0]:
            raise EmbedwalkError(f"{f.shape[0]} fold/group ids for {x.shape[0]} rows")
        if f.size and (f.min() < 0 or f.max() >= self.n_folds):
            raise EmbedwalkError(f"fold ids must lie in [0, {self.n_folds})")
        y = None if y is None else _as_tensor(y)
        order = np.argsort(f, kind="stable")
        bounds = np.searchsorted(f[order], np.arange(self.n_folds + 1))
        for k in range(self.n_folds):
            if bounds[k] == bounds[k + 1]:
                continue
            rows = torch.from_numpy(order[bounds[k] : bounds[k + 1]]).to(x.device)
            self.folds[k].update(x[rows], None if y is None else y[rows.to(y.device)])
        # Folds that got nothing yet still need shapes for merge / all_reduce.
        template = next((a for a in self.folds if a.initialised), None)
        if template is not None:
            for k, a in enumerate(self.folds):
                if not a.initialised:
                    self.folds[k] = template.empty_like()
        return self

    def test(self, fold: int):
        """Statistics of the held-out rows of ``fold``."""
        return self.folds[fold]

    def train(self, fold: int):
        """Statistics of every row *not* in ``fold`` (merge of the other folds)."""
        out = self.folds[(fold + 1) % self.n_folds].copy()
        for k, a in enumerate(self.folds):
            if k not in (fold, (fold + 1) % self.n_folds):
                out.merge(a)
        return out

    def total(self):
        out = self.folds[0].copy()
        for a in self.folds[1:]:
            out.merge(a)
        return out

    def merge(self, other: "FoldedStats") -> "FoldedStats":
        if (other.n_folds, other.seed) != (self.n_folds, self.seed):
            raise EmbedwalkError("cannot merge FoldedStats with different n_folds/seed")
        merged_identity(self.fitted_in, other.fitted_in, "this FoldedStats object")  # refuse before changing any fold
        for a, b in zip(self.folds, other.folds):
            a.merge(b)
        return self

    def all_reduce(self, group=None) -> "FoldedStats":
        for a in self.folds:
            a.all_reduce(group)
        return self

    def save(self, path: str | Path) -> None:
        tensors, fold_meta = {}, []
        for k, a in enumerate(self.folds):
            tensors.update({f"fold{k}.{name}": t for name, t in a.state_dict().items()})
            fold_meta.append(a._meta() if hasattr(a, "_meta") else {})
        meta = {
            "class": "FoldedStats", "format_version": FORMAT_VERSION,
            "n_folds": self.n_folds, "seed": self.seed,
            "accumulator": type(self.folds[0]).__name__, "fold_meta": fold_meta,
        }
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "FoldedStats":
        sd, meta = load_tensors(path)
        _check_class(meta, cls.__name__)
        acc = _ACCUMULATORS[meta["accumulator"]]
        out = cls(meta["n_folds"], meta["seed"])
        out.folds = []
        for k in range(meta["n_folds"]):
            prefix = f"fold{k}."
            part = {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
            out.folds.append(acc.from_state_dict(part, device, **meta["fold_meta"][k]))
        return out


def tensor_batches(
    x: Tensor,
    y: Tensor | None = None,
    groups: ArrayLike | None = None,
    batch_size: int = 4096,
) -> list[tuple]:
    """Cut in-memory tensors into a re-iterable list of ``(x, y[, groups])`` batches,
    the format every streaming fitter in :mod:`embedwalk.concepts` reads."""
    x = _as_tensor(x)
    y = None if y is None else _as_tensor(y)
    g = None if groups is None else (groups if isinstance(groups, Tensor) else np.asarray(groups))
    out = []
    for s in range(0, x.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        item = (x[sl], None if y is None else y[sl])
        out.append(item if g is None else item + (g[sl],))
    return out
