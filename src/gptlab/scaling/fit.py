"""Scaling-law fits in the forms of Hoffmann et al. 2022 (Chinchilla) and Kaplan et al. 2020.

- Approach 2, isoFLOP parabolas: at each compute budget C, loss is a parabola in ln N; its vertex
  is N_opt(C), and D_opt(C) = C / flops_per_token(N_opt). Straight lines in log-log then give
  N_opt ∝ C^a and D_opt ∝ C^b.
- Approach 3, parametric: L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising the Huber
  loss (delta = 1e-3) between predicted and observed log-loss with L-BFGS, started from the best
  points of Hoffmann et al.'s grid of initialisations. Compute-optimal exponents:
  a = beta / (alpha + beta), b = alpha / (alpha + beta).
- Kaplan's L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (their eq. 1.5, N without
  embeddings), fitted the same way; L(N) = (N_c / N)^alpha_N is its data-rich limit.
- Bootstrap intervals: approach 2 resamples the residuals of the parabolas; the parametric fits
  resample runs (the pairs bootstrap of Besiroglu et al. 2024).

All numbers are plain numpy; torch only supplies L-BFGS and autograd, in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class Runs:
    """The finished runs of a sweep, one array entry per run. Several seeds of one (budget, N)
    point are several runs: each is an observation of the same expected loss, so the fits
    weight a point by its number of seeds and the bootstraps see the seed-to-seed noise."""

    budget: np.ndarray  # the C each run was given (groups the isoFLOP curves)
    params: np.ndarray  # N, all parameters
    non_embedding_params: np.ndarray
    tokens: np.ndarray  # D
    flops_per_token: np.ndarray
    loss: np.ndarray  # final validation loss, nats/token

    def __post_init__(self) -> None:
        arrays = {f.name: np.asarray(getattr(self, f.name), dtype=np.float64) for f in fields(self)}
        if len({a.shape for a in arrays.values()}) != 1:
            raise ValueError(
                f"Runs arrays differ in length: { {k: len(v) for k, v in arrays.items()} }"
            )
        for name, array in arrays.items():
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, index: np.ndarray) -> Runs:
        return Runs(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def with_loss(self, loss: np.ndarray) -> Runs:
        return replace(self, loss=np.asarray(loss, dtype=np.float64))

    @property
    def budgets(self) -> np.ndarray:
        return np.unique(self.budget)

    def point_means(self) -> Runs:
        """One entry per sweep point (budget, N), its loss averaged over the point's runs (its
        seeds): the expected loss a law predicts, without the seed-to-seed noise."""
        points, index = np.unique(np.stack([self.budget, self.params]), axis=1, return_inverse=True)
        index = index.ravel()
        first = np.array([np.flatnonzero(index == i)[0] for i in range(points.shape[1])])
        counts = np.bincount(index)
        return self.take(first).with_loss(np.bincount(index, weights=self.loss) / counts)


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x ** exponent, fitted by least squares in log-log."""

    coef: float
    exponent: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.coef * np.asarray(x, dtype=np.float64) ** self.exponent

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> PowerLaw:
        if len(np.unique(x)) < 2:
            raise ValueError(f"a power law needs >= 2 distinct x values, got {len(np.unique(x))}")
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        return cls(coef=float(np.exp(intercept)), exponent=float(slope))


def flops_per_token_law(runs: Runs) -> PowerLaw:
    """flops_per_token as a function of N across the sweep's model shapes: it turns a model size
    into the tokens a budget buys, D = C / flops_per_token(N), between and beyond the runs."""
    return PowerLaw.fit(runs.params, runs.flops_per_token)


# ----------------------------------------------------------------------------- approach 2


@dataclass(frozen=True)
class IsoFLOPCurve:
    budget: float
    coeffs: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0 with x = ln N
    n_opt: float
    d_opt: float
    loss_opt: float
    n_range: tuple[float, float]  # the model sizes the parabola was fitted over

    def loss(self, n: np.ndarray) -> np.ndarray:
        return np.polyval(self.coeffs, np.log(n))

    @property
    def inside(self) -> bool:
        """Whether the vertex lies within the sampled sizes (else it is an extrapolation)."""
        return self.n_range[0] <= self.n_opt <= self.n_range[1]


def fit_isoflop(budget: float, params: np.ndarray, loss: np.ndarray, fpt: PowerLaw) -> IsoFLOPCurve:
    """The parabola in ln N through one budget's runs and its vertex."""
    if len(np.unique(params)) < 3:
        raise ValueError(
            f"budget {budget:.3g}: an isoFLOP parabola needs >= 3 model sizes, "
            f"got {len(np.unique(params))}"
        )
    coeffs = np.polyfit(np.log(params), loss, 2)
    if coeffs[0] <= 0:
        raise ValueError(
            f"budget {budget:.3g}: the losses do not curve upward in ln N (no minimum); "
            "the sizes do not bracket the optimum"
        )
    x_opt = -coeffs[1] / (2 * coeffs[0])
    n_opt = float(np.exp(x_opt))
    return IsoFLOPCurve(
        budget=float(budget),
        coeffs=tuple(float(c) for c in coeffs),
        n_opt=n_opt,
        d_opt=float(budget / fpt(n_opt)),
        loss_opt=float(np.polyval(coeffs, x_opt)),
        n_range=(float(params.min()), float(params.max())),
    )


@dataclass(frozen=True)
class IsoFLOPFit:
    curves: list[IsoFLOPCurve]
    n_opt: PowerLaw  # N_opt(C) = coef * C^a
    d_opt: PowerLaw  # D_opt(C) = coef * C^b
    skipped: list[str]  # budgets without a usable parabola, and why

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent

    def tokens_per_param(self, budget: float) -> float:
        return float(self.d_opt(budget) / self.n_opt(budget))


def fit_isoflops(runs: Runs, fpt: PowerLaw | None = None) -> IsoFLOPFit:
    """Chinchilla approach 2 over every budget that has a parabola with a minimum."""
    fpt = fpt or flops_per_token_law(runs)
    curves, skipped = [], []
    for budget in runs.budgets:
        at = runs.budget == budget
        try:
            curves.append(fit_isoflop(budget, runs.params[at], runs.loss[at], fpt))
        except ValueError as e:
            skipped.append(str(e))
    if len(curves) < 2:
        raise ValueError(
            f"approach 2 needs isoFLOP minima at >= 2 budgets, got {len(curves)}: {skipped}"
        )
    c = np.array([curve.budget for curve in curves])
    n_opt = PowerLaw.fit(c, np.array([curve.n_opt for curve in curves]))
    d_opt = PowerLaw.fit(c, np.array([curve.d_opt for curve in curves]))
    return IsoFLOPFit(curves=curves, n_opt=n_opt, d_opt=d_opt, skipped=skipped)


def parabola_residuals(runs: Runs, fit: IsoFLOPFit) -> tuple[np.ndarray, np.ndarray]:
    """(fitted loss, residual) of every run on a budget with a parabola; NaN elsewhere."""
    fitted = np.full(len(runs), np.nan)
    for curve in fit.curves:
        at = runs.budget == curve.budget
        fitted[at] = curve.loss(runs.params[at])
    return fitted, runs.loss - fitted


# ----------------------------------------------------------------------------- approaches 3, Kaplan

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _columns(theta: torch.Tensor) -> list[torch.Tensor]:
    """The parameters of theta (..., P) as P tensors (..., 1) that broadcast against the runs."""
    return [t.unsqueeze(-1) for t in theta.unbind(-1)]


def chinchilla_log_loss(
    theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor
) -> torch.Tensor:
    """ln L for theta = (ln A, ln B, ln E, alpha, beta): LSE(a - alpha ln N, b - beta ln D, e)."""
    a, b, e, alpha, beta = _columns(theta)
    terms = torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e)
    return torch.logsumexp(torch.stack(terms), dim=0)


def kaplan_log_loss(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """ln L for theta = (ln N_c, ln D_c, alpha_N, alpha_D)."""
    log_nc, log_dc, alpha_n, alpha_d = _columns(theta)
    terms = torch.broadcast_tensors(alpha_n / alpha_d * (log_nc - log_n), log_dc - log_d)
    return alpha_d * torch.logsumexp(torch.stack(terms), dim=0)


# Hoffmann et al.'s grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
# {0, 5, ..., 25}. Kaplan's: exponents around their 0.076 / 0.095, N_c and D_c over 15 decades.
CHINCHILLA_GRID = np.array(
    [
        (a, b, e, alpha, beta)
        for a, b in itertools.product(range(0, 30, 5), repeat=2)
        for e in np.arange(-1, 1.01, 0.5)
        for alpha, beta in itertools.product(np.arange(0, 2.01, 0.5), repeat=2)
    ],
    dtype=np.float64,
)
KAPLAN_GRID = np.array(
    [
        (log_nc, log_dc, alpha_n, alpha_d)
        for log_nc, log_dc in itertools.product(range(5, 40, 5), repeat=2)
        for alpha_n, alpha_d in itertools.product((0.05, 0.1, 0.2, 0.4), repeat=2)
    ],
    dtype=np.float64,
)


def huber_objective(pred: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean Huber loss over the runs (last axis), divided by delta so that L-BFGS's tolerances
    see gradients of order one."""
    return (
        F.huber_loss(pred, target.expand_as(pred), delta=delta, reduction="none").mean(-1) / delta
    )


def fit_huber_lbfgs(
    predict: Predictor,
    grid: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_loss: np.ndarray,
    starts: int = 8,
    extra_start: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
) -> tuple[np.ndarray, float]:
    """Minimise the Huber loss of `predict` over theta: the objective is evaluated on the whole
    grid at once, then L-BFGS refines the `starts` best grid points (and `extra_start`, such as
    the full-data optimum when refitting a bootstrap resample); returns the best optimum.

    Refining the best grid points rather than all of them keeps a fit to about a second while
    still starting in every basin the grid finds promising."""
    x_n, x_d, y = (torch.as_tensor(v, dtype=torch.float64) for v in (log_n, log_d, log_loss))
    with torch.no_grad():
        on_grid = huber_objective(predict(torch.as_tensor(grid), x_n, x_d), y, delta)
    on_grid = torch.nan_to_num(on_grid, nan=torch.inf)
    initial = [grid[i] for i in torch.argsort(on_grid)[:starts].tolist()]
    if extra_start is not None:
        initial.append(np.asarray(extra_start, dtype=np.float64))
    best_theta, best_value = None, np.inf
    for start in initial:
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=1000,
            tolerance_grad=1e-10,
            tolerance_change=1e-13,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure(theta: torch.Tensor = theta, optimizer: torch.optim.LBFGS = optimizer):
            optimizer.zero_grad()
            value = huber_objective(predict(theta, x_n, x_d), y, delta)
            value.backward()
            return value

        optimizer.step(closure)
        with torch.no_grad():
            value = float(huber_objective(predict(theta, x_n, x_d), y, delta))
        if np.isfinite(value) and value < best_value:
            best_theta, best_value = theta.detach().numpy().copy(), value
    if best_theta is None:
        raise ValueError("the fit diverged from every starting point (no finite optimum)")
    return best_theta, best_value


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    grid: ClassVar[np.ndarray] = CHINCHILLA_GRID
    log_loss = staticmethod(chinchilla_log_loss)

    @staticmethod
    def model_size(runs: Runs) -> np.ndarray:
        return runs.params

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> ChinchillaLaw:
        a, b, e, alpha, beta = (float(t) for t in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    def loss(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """N_opt ∝ C^a under C = 6 N D."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def theta(self) -> np.ndarray:
        """The parameters as `chinchilla_log_loss` takes them."""
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    def optimum(self, budget: float, fpt: PowerLaw) -> tuple[float, float]:
        """(N_opt, D_opt) at budget C with D = C / flops_per_token(N): the model's own FLOP
        accounting, found on a fine grid of N instead of the closed form for C = 6 N D."""
        n = np.exp(np.linspace(np.log(1e2), np.log(1e12), 20001))
        d = budget / fpt(n)
        with np.errstate(over="ignore"):  # a wild bootstrap fit may overflow at the grid's ends
            i = int(np.argmin(self.loss(n, d)))
        return float(n[i]), float(d[i])


@dataclass(frozen=True)
class KaplanLaw:
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, N without embeddings."""

    n_c: float
    d_c: float
    alpha_n: float
    alpha_d: float

    grid: ClassVar[np.ndarray] = KAPLAN_GRID
    log_loss = staticmethod(kaplan_log_loss)

    @staticmethod
    def model_size(runs: Runs) -> np.ndarray:
        return runs.non_embedding_params

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> KaplanLaw:
        log_nc, log_dc, alpha_n, alpha_d = (float(t) for t in theta)
        return cls(n_c=math.exp(log_nc), d_c=math.exp(log_dc), alpha_n=alpha_n, alpha_d=alpha_d)

    def loss(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return ((self.n_c / n) ** (self.alpha_n / self.alpha_d) + self.d_c / d) ** self.alpha_d

    def loss_n(self, n: np.ndarray) -> np.ndarray:
        """L(N): the data-rich limit, (N_c / N)^alpha_N."""
        return (self.n_c / np.asarray(n, dtype=np.float64)) ** self.alpha_n

    @property
    def theta(self) -> np.ndarray:
        """The parameters as `kaplan_log_loss` takes them."""
        return np.array([np.log(self.n_c), np.log(self.d_c), self.alpha_n, self.alpha_d])


LawT = TypeVar("LawT", "ChinchillaLaw", "KaplanLaw")


def fit_law(law: type[LawT], runs: Runs, starts: int = 8, near: LawT | None = None) -> LawT:
    """Fit `law` (ChinchillaLaw: approach 3, or KaplanLaw) to `runs` by `fit_huber_lbfgs`;
    `near`: an earlier fit to start from as well (a bootstrap refit starts from the full fit)."""
    theta, _ = fit_huber_lbfgs(
        law.log_loss,
        law.grid,
        np.log(law.model_size(runs)),
        np.log(runs.tokens),
        np.log(runs.loss),
        starts=starts,
        extra_start=None if near is None else near.theta,
    )
    return law.from_theta(theta)


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_intervals(
    statistics: Callable[[Runs], dict[str, float]],
    resample: Callable[[np.random.Generator], Runs],
    n_resamples: int,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict[str, tuple[float, float]], int]:
    """Percentile intervals of `statistics` over `n_resamples` resampled data sets, and how many
    resamples failed to fit (a resample may, say, lose the minimum of an isoFLOP curve)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failed = 0
    for _ in range(n_resamples):
        try:
            values = statistics(resample(rng))
        except ValueError:
            failed += 1
            continue
        for key, value in values.items():
            samples.setdefault(key, []).append(value)
    tail = 100 * (1 - level) / 2
    intervals = {
        key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for key, v in samples.items()
    }
    return intervals, failed


def pairs_resampler(runs: Runs) -> Callable[[np.random.Generator], Runs]:
    """Draw len(runs) runs with replacement."""
    return lambda rng: runs.take(rng.integers(0, len(runs), len(runs)))


def residual_resampler(runs: Runs, fit: IsoFLOPFit) -> Callable[[np.random.Generator], Runs]:
    """Fitted parabola values plus residuals drawn with replacement from all parabolas.

    Residuals of a 3-parameter fit to m points are smaller than the noise by sqrt((m - 3) / m)
    on average, so the pooled residuals are scaled back up by sqrt(M / (M - 3 * curves))."""
    fitted, residuals = parabola_residuals(runs, fit)
    keep = np.isfinite(fitted)
    kept, fitted, residuals = runs.take(keep), fitted[keep], residuals[keep]
    dof = len(residuals) - 3 * len(fit.curves)
    if dof < 1:
        raise ValueError(
            "the isoFLOP parabolas pass exactly through their runs (3 per budget): "
            "the residual bootstrap needs more than 3 runs on some budget"
        )
    residuals = residuals * np.sqrt(len(residuals) / dof)
    return lambda rng: kept.with_loss(fitted + rng.choice(residuals, size=len(residuals)))
