"""The metric panel on per-image features: FID, KID, precision / recall, density / coverage, each with a bootstrap
standard error over the generated samples.

Every number is the definition of the library that published it, on the same features FID uses (recomputed in
torch on the features' device where the bootstrap needs it fast, with the fixed reference's part computed once,
and tested equal to the library):
- KID: torch-fidelity's `kid_features_to_metric` (Binkowski et al. 2018: unbiased MMD^2 with the cubic
  polynomial kernel, averaged over random subsets of `kid_subset_size`), recomputed in torch, tested equal.
- precision / recall: torch-fidelity's `prc_features_to_metric` (Kynkaanniemi et al. 2019, k = 3), in torch.
- density / coverage: `prdc.compute_prdc`'s definitions (Naeem et al. 2020, the authors' package, k = 5),
  recomputed in torch, tested equal.
- FID: eval.fid's Frechet distance (equal to torch-fidelity's `fid_statistics_to_metric`); its bootstrap
  replicates through `FrechetToReference` (the same distance by a symmetric eigendecomposition).
- CMMD: eval/cmmd.py, the RBF-kernel MMD of Jayasumana et al. 2024 (on CLIP embeddings).

The standard error is a bootstrap over the generated images only: the reference set is fixed by the protocol, so
the interval says how much the number would move with another draw of samples from the same model. Rows drawn
twice make a bootstrap replicate's k-NN radii and its MMD U-statistic slightly biased; the spread (the SE) is what
is reported, never a replicate's mean.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from eval.fid import FeatureStats, fid_between, frechet_distance
from harness.errors import FluidbenchError

# cmmd (eval/cmmd.py) is meant for unit-norm CLIP embeddings (its kernel width is fixed): asked for by name only
SAMPLE_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage", "cmmd")
DEFAULT_METRICS = SAMPLE_METRICS[:-1]


@dataclass(frozen=True)
class PanelSettings:
    """The panel's settings, recorded with every result (torch-fidelity's and prdc's defaults)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    kid_subsets: int = 100
    kid_subset_size: int = 1000     # shrunk to the smaller set when either has fewer images
    prc_neighborhood: int = 3       # torch-fidelity's k for precision / recall
    dc_neighborhood: int = 5        # prdc's k for density / coverage (the paper's recommendation)
    n_boot: int = 100               # bootstrap replicates for the standard errors; 0 = none
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in SAMPLE_METRICS]
        if unknown:
            raise FluidbenchError(f"metrics: unknown {', '.join(unknown)} (expected some of "
                                  f"{', '.join(SAMPLE_METRICS)})")
        if self.n_boot == 1 or self.n_boot < 0:
            raise FluidbenchError(f"n_boot={self.n_boot}: need 0 (no standard errors) or at least 2")


def _as_features(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().float()  # float32, as torch-fidelity's extractors give them
    if x.ndim != 2 or len(x) < 2:
        raise FluidbenchError(f"{what} features of shape {tuple(x.shape)}: expected (N >= 2, D)")
    return x


def fid_features(generated: torch.Tensor, reference: FeatureStats) -> float:
    stats = FeatureStats(reference.sum.shape[0])
    stats.update(generated)
    return fid_between(stats, reference)


def kid(generated: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
    """KID as torch-fidelity's `kid_features_to_metric` computes it (the same subsets, drawn by the same
    `np.random.RandomState(seed)` calls; the unbiased MMD^2 of its `mmd2`, polynomial kernel (x.y / d + 1)^3),
    with the kernels as torch matmuls on the features' device: the bootstrap recomputes it hundreds of times.
    With both sets no larger than `subset_size` every subset is the whole set (the MMD^2 does not depend on the
    order of the rows), so one subset gives the same number."""
    size = min(subset_size, len(generated), len(reference))
    if size == len(generated) == len(reference):
        subsets = 1
    x_all, y_all = generated.double(), reference.to(generated.device).double()
    gamma = 1.0 / x_all.shape[1]
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), size, replace=False)).to(x_all.device)]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), size, replace=False)).to(y_all.device)]
        k_xx, k_yy, k_xy = (((a @ b.T) * gamma + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (size * (size - 1))
        mmds.append(float(off_diagonal - 2 * k_xy.sum() / size ** 2))
    return float(np.mean(mmds))


def knn_radius(features: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row (the row itself, at distance 0, not counted),
    in chunks so that no (N, N) matrix is held at once."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(chunk)])


def _any_inside(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor, strict: bool = False,
                chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point: is it inside some centre's ball (<=, or < when strict), and how many balls hold it."""
    hits, counts = [], []
    for part in points.split(chunk):
        d = torch.cdist(part, centres)  # (chunk, centres)
        inside = d < radius[None] if strict else d <= radius[None]
        hits.append(inside.any(1))
        counts.append(inside.sum(1))
    return torch.cat(hits), torch.cat(counts)


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = 3,
                     reference_radius: torch.Tensor | None = None) -> dict[str, float]:
    """Improved precision and recall as torch-fidelity's `prc_features_to_metric` computes them (generated = its
    input1, real = input2; `<=` against the k-NN radii), in chunks, with the fixed reference's radii computed
    once: a generated image is precise if inside some real image's k-NN ball, a real one recalled if inside
    some generated image's."""
    reference_radius = knn_radius(reference, k) if reference_radius is None else reference_radius
    precise, _ = _any_inside(generated, reference, reference_radius)
    recalled, _ = _any_inside(reference, generated, knn_radius(generated, k))
    return {"precision": precise.float().mean().item(), "recall": recalled.float().mean().item()}


def density_coverage(generated: torch.Tensor, reference: torch.Tensor, k: int = 5,
                     reference_radius: torch.Tensor | None = None) -> dict[str, float]:
    """Density and coverage as prdc's `compute_prdc` defines them (strict `<` against each real image's k-NN
    radius, the image itself not counted), in torch: prdc's sklearn call holds every distance and forks 8
    joblib workers. Only the reference's radii enter, so they are computed once."""
    ref, gen = reference.double(), generated.double()
    radius = knn_radius(ref, k) if reference_radius is None else reference_radius.double()
    _, held = _any_inside(gen, ref, radius, strict=True)  # (N,) real balls holding each generated image
    nearest = torch.cat([torch.cdist(part, gen).min(1).values for part in ref.split(4096)])
    return {"density": float(held.double().mean() / k), "coverage": float((nearest < radius).double().mean())}


def standardised_stats(stats: FeatureStats, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the features divided per dimension by `scale` (the reference's std)."""
    return stats.mean / scale, stats.cov / np.outer(scale, scale)


def fid_standardised(generated: FeatureStats, reference: FeatureStats) -> float:
    """FID on features whitened per dimension by the reference's std: a unit-free FID whose size does not depend
    on how large the extractor's activations happen to be (raw Shapes-FID values in the thousands say nothing
    on their own). Dimensions where the reference is constant are left unscaled."""
    std = np.sqrt(np.clip(np.diagonal(reference.cov), 0, None))
    scale = np.where(std > 0, std, 1.0)
    return frechet_distance(*standardised_stats(generated, scale), *standardised_stats(reference, scale))


class FrechetToReference:
    """FID of many generated sets against one fixed reference, for the bootstrap: with R = S_ref^(1/2) computed
    once, tr sqrt(S_gen S_ref) = sum sqrt(eig(R S_gen R)) (the same eigenvalues; both matrices symmetric PSD), so a
    replicate costs one symmetric eigendecomposition on the features' device instead of scipy's general sqrtm.
    `scale` divides every feature (the standardised FID)."""

    def __init__(self, reference: FeatureStats, device: torch.device, scale: np.ndarray | None = None):
        scale = np.ones_like(reference.mean) if scale is None else scale
        mean, cov = standardised_stats(reference, scale)
        self.mean = torch.as_tensor(mean, device=device)
        cov = torch.as_tensor(cov, device=device)
        w, v = torch.linalg.eigh(cov)
        self.root = (v * w.clamp(min=0).sqrt()) @ v.T  # (D, D) symmetric square root
        self.trace = float(torch.trace(cov))
        self.scale = torch.as_tensor(scale, device=device)

    def __call__(self, features: torch.Tensor) -> float:
        g = features.double() / self.scale  # (N, D)
        mean = g.mean(0)
        centred = g - mean
        cov = centred.T @ centred / (len(g) - 1)
        eig = torch.linalg.eigvalsh(self.root @ cov @ self.root).clamp(min=0)
        return float(((mean - self.mean) ** 2).sum() + torch.trace(cov) + self.trace - 2 * eig.sqrt().sum())


def bootstrap_se(metric: Callable[[torch.Tensor], dict[str, float]], generated: torch.Tensor, n_boot: int,
                 seed: int = 0) -> dict[str, float]:
    """Standard deviation over `n_boot` replicates of `metric(generated[rows])`, rows drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    replicates: dict[str, list[float]] = {}
    for _ in range(n_boot):
        rows = torch.randint(len(generated), (len(generated),), generator=generator)
        for key, value in metric(generated[rows]).items():
            replicates.setdefault(key, []).append(value)
    return {key: float(np.std(values, ddof=1)) for key, values in replicates.items()}


def panel(generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
          settings: PanelSettings = PanelSettings(), reference_stats: FeatureStats | None = None,
          device: str | torch.device | None = None) -> dict:
    """Every metric of `settings.metrics` for per-image generated features (N, D) against reference features
    (M, D), each with `<metric>_se`; `fid_standardised` beside FID. `reference_stats` (float64 sums of the same
    reference features) is used for FID when given, so the value equals eval.fid's from the cached statistics.
    The metrics run on `device` (default: the CPU); the point values of FID are eval.fid's scipy ones there too."""
    gen, ref = _as_features(generated, "generated"), _as_features(reference, "reference")
    device = torch.device(device or "cpu")
    gen, ref = gen.to(device), ref.to(device)
    if gen.shape[1] != ref.shape[1]:
        raise FluidbenchError(f"generated features have {gen.shape[1]} dimensions, the reference {ref.shape[1]}")
    if reference_stats is None:
        reference_stats = FeatureStats(ref.shape[1])
        reference_stats.update(ref)
    wanted = set(settings.metrics)
    for names, k in ((("precision", "recall"), settings.prc_neighborhood), (("density", "coverage"),
                                                                          settings.dc_neighborhood)):
        if wanted & set(names) and min(len(gen), len(ref)) <= k:
            raise FluidbenchError(f"metrics: {' and '.join(names)} need more than {k} generated and reference "
                                  f"images (k-NN radii), got {len(gen)} and {len(ref)}; leave them out")

    if "fid" in wanted:
        std = np.sqrt(np.clip(np.diagonal(reference_stats.cov), 0, None))
        frechet = FrechetToReference(reference_stats, device)
        frechet_standardised = FrechetToReference(reference_stats, device, np.where(std > 0, std, 1.0))

    # the fixed reference's k-NN radii, once for every replicate
    radius_pr = knn_radius(ref, settings.prc_neighborhood) if wanted & {"precision", "recall"} else None
    radius_dc = knn_radius(ref.double(), settings.dc_neighborhood) if wanted & {"density", "coverage"} else None

    def measure(g: torch.Tensor, exact: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        if "fid" in wanted and exact:
            stats = FeatureStats(g.shape[1])
            stats.update(g)
            out["fid"] = fid_between(stats, reference_stats)
            out["fid_standardised"] = fid_standardised(stats, reference_stats)
        elif "fid" in wanted:
            out["fid"], out["fid_standardised"] = frechet(g), frechet_standardised(g)
        if "kid" in wanted:
            out["kid"] = kid(g, ref, settings.kid_subsets, settings.kid_subset_size, settings.seed)
        if wanted & {"precision", "recall"}:
            pr = precision_recall(g, ref, settings.prc_neighborhood, radius_pr)
            out |= {k: v for k, v in pr.items() if k in wanted}
        if wanted & {"density", "coverage"}:
            dc = density_coverage(g, ref, settings.dc_neighborhood, radius_dc)
            out |= {k: v for k, v in dc.items() if k in wanted}
        if "cmmd" in wanted:
            from eval.cmmd import mmd_rbf

            out["cmmd"] = mmd_rbf(g, ref)
        return out

    result = measure(gen, exact=True)
    if settings.n_boot:
        se = bootstrap_se(measure, gen, settings.n_boot, settings.seed)
        result |= {f"{key}_se": value for key, value in se.items()}
    return {**result, "n_generated": len(gen), "n_reference": len(ref), "panel": asdict(settings)}
