"""ACE-Merging (arXiv 2603.02945, CVPR 2026): Algorithm 1, Eqs. 5-19.

Per 2-D weight (d_out, d_in): estimate each task's input second moment from the column
Gram of its centered task vector, normalize the estimators when task energies are
heterogeneous, add a collective structural prior, solve the closed-form merge, and, when
heterogeneous, refine the singular spectrum. Non-matrix parameters get the plain mean,
as in the authors' code.

Details that follow the authors' code (METHODS.md): unbiased variance in gamma and 1e-12
inside the log and the denominator; centering over the output axis; the prior is the
mean row of sum_t S~_t broadcast onto every row (so the system matrix is not symmetric);
the heterogeneous eps is divided by each task's trace; the residual uses the uncentered
task vectors; k = int(r * k_frac); a pseudo-inverse if the linear solve fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from acemerge.errors import AceMergeError
from acemerge.methods.lowrank import factored_svd, numerical_rank
from acemerge.methods.registry import (
    Factored,
    Method,
    MethodParams,
    compute_dtype_of,
    register,
)
from acemerge.methods.shrinkage import auto_ridge_ratio
from acemerge.methods.spectral import top_svd
from acemerge.methods.symmetric import GramSums, cholesky_lower

Tensor = torch.Tensor

LOG_FLOOR = 1e-12  # added inside log and to denominators, as the authors do

#: Named eps values: the paper's Sec. 5.1 per model family, and the authors' code default.
EPS_PRESETS: dict[str, float] = {
    "default": 1e-5,
    "gpt2": 4e-2,
    "roberta-base": 2e-4,
    "authors-code": 1e-2,
}

#: The ablation ladder of the paper's Table 4: which components each rung switches on.
_COMPONENTS = ("adaptive_normalization", "collective_prior", "spectral_refinement")
ABLATIONS: dict[str, dict[str, bool]] = {
    rung: {name: i < n_on for i, name in enumerate(_COMPONENTS)}
    for rung, n_on in (("E1", 0), ("E2", 1), ("E3", 2), ("E4", 3))
}


class AceParams(MethodParams):
    """ACE-Merging's parameters; defaults are the paper's (Sec. 5.1).

    Beyond the paper (named options, off by default): ``eps_mode=relative`` makes eps a
    multiple of each task's mean proxy eigenvalue, ``eps=auto`` computes that multiple per
    layer and task with ``auto_rule``, ``eps=paper`` takes the paper's per-model value
    from the base's config.json, and ``heterogeneity=log_std`` is a scale-free branch test.
    """

    eps: float | Literal["auto", "paper"] = Field(
        default=1e-5,
        description="Tikhonov strength: a number >= 0, auto (per layer and task, see "
        "auto_rule), paper (the paper's per-model value, from config.json) or a preset: "
        + ", ".join(f"{k}={v:g}" for k, v in EPS_PRESETS.items()),
    )
    eps_mode: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="absolute (paper): eps is added as is; relative: eps is rho, the ridge "
        "is rho * tr(S_t) / d_in (the task's mean eigenvalue), the same for every model",
    )
    auto_rule: Literal["ledoit_wolf", "oas", "mp_edge"] = Field(
        default="ledoit_wolf",
        description="eps=auto: Ledoit-Wolf or OAS shrinkage of the rows of C_t, or the "
        "Marchenko-Pastur noise edge",
    )
    eps_fallback: float | None = Field(
        default=None, ge=0,
        description="eps=auto where the estimate is undefined (zero task vector, d_out = 1); "
        "None: the paper's eps for the model (1e-5 without a config)",
    )
    tau: float = Field(default=0.3, ge=0, description="heterogeneity threshold on gamma")
    heterogeneity: Literal["gamma", "log_std"] = Field(
        default="gamma",
        description="branch statistic: gamma (Eq. 7, paper) or log_std, the sample std of "
        "ln e_t (scale-free), compared with tau_log_std",
    )
    tau_log_std: float = Field(
        default=1.0, ge=0,
        description="heterogeneity=log_std: threshold in nats (1.0: energies spread by a "
        "factor e)",
    )
    k_frac: float = Field(default=0.3, gt=0, le=1, description="spectral rank fraction")
    adaptive_normalization: bool = Field(default=True, description="Eqs. 8-9, 13 (E2)")
    collective_prior: bool = Field(default=True, description="Eqs. 11-13 (E3)")
    spectral_refinement: bool = Field(default=True, description="Eqs. 15-19 (E4)")
    refine_rank: Literal["numerical", "paper"] = Field(
        default="numerical",
        description="numerical: k = min(int(r k_frac), numerical rank of W_fused), so no "
        "direction of a zero singular value is added (low-rank experts); never changes a "
        "full-rank result. paper: k = int(r k_frac) always",
    )
    solver: Literal["solve", "inverse"] = Field(
        default="solve", description="linear solve (default) or the explicit inverse"
    )
    ablation: Literal["E1", "E2", "E3", "E4"] | None = Field(
        default=None, description="Table 4 rung: sets the three component switches"
    )

    @model_validator(mode="before")
    @classmethod
    def _ablation_rung(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("ablation") is None:
            return data
        rung = ABLATIONS.get(data["ablation"])
        if rung is None:
            return data  # the field's own validation reports the bad name
        clashes = [k for k, v in rung.items() if k in data and data[k] != v]
        if clashes:
            raise ValueError(f"ablation {data['ablation']} sets {clashes[0]}={rung[clashes[0]]}")
        return {**data, **rung}

    @field_validator("eps", mode="before")
    @classmethod
    def _eps_preset(cls, value: object) -> object:
        if isinstance(value, str) and value not in ("auto", "paper"):
            if value in EPS_PRESETS:
                return EPS_PRESETS[value]
            try:
                value = float(value)
            except ValueError:
                raise ValueError(
                    f"not a number, auto, paper or a preset ({', '.join(EPS_PRESETS)})"
                ) from None
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ValueError("must be >= 0")
        return value


def paper_eps(model_config: dict | None) -> float:
    """The paper's eps for a model (Sec. 5.1): GPT-2 4e-2, RoBERTa-base 2e-4, else 1e-5.

    RoBERTa-base is told from its config: model_type roberta, 12 layers, width 768.
    """
    config = model_config or {}
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "gpt2":
        return EPS_PRESETS["gpt2"]
    if (model_type == "roberta" and config.get("num_hidden_layers") == 12
            and config.get("hidden_size") == 768):
        return EPS_PRESETS["roberta-base"]
    return EPS_PRESETS["default"]


def resolve_for_model(params: AceParams, model_config: dict | None) -> AceParams:
    """Fill in what depends on the model: eps=paper, and eps=auto's fallback."""
    updates: dict[str, object] = {}
    if params.eps == "paper":
        updates["eps"] = paper_eps(model_config)
    if params.eps == "auto" and params.eps_fallback is None:
        updates["eps_fallback"] = paper_eps(model_config)
    return params.model_copy(update=updates) if updates else params


@dataclass(frozen=True)
class Heterogeneity:
    """Per-layer statistics of Stage 1: task energies, gamma, log_std and the branch taken."""

    energies: Tensor
    gamma: float
    heterogeneous: bool
    log_std: float = 0.0


def task_energies(task_vectors: list[Tensor]) -> Tensor:
    """e_t = ||D_t||_F^2 = Tr(D_t^T D_t) of the uncentered task vectors (Eq. 12, App. A.4),
    accumulated in float64."""
    return torch.stack([torch.linalg.vector_norm(tv, dtype=torch.float64) ** 2
                        for tv in task_vectors])


def heterogeneity_gamma(energies: Tensor) -> float:
    """gamma = Var_t[log e_t] / (Mean_t[log e_t])^2 (Eq. 7), unbiased variance."""
    if energies.numel() < 2:
        return 0.0
    logs = torch.log(energies.double() + LOG_FLOOR)
    return float(logs.var(unbiased=True) / (logs.mean() ** 2 + LOG_FLOOR))


def heterogeneity_log_std(energies: Tensor) -> float:
    """Sample std of ln e_t (unbiased): scale-free, unlike gamma, whose denominator
    (Mean ln e_t)^2 vanishes when the energies are near 1."""
    if energies.numel() < 2:
        return 0.0
    return float(torch.log(energies.double() + LOG_FLOOR).std(unbiased=True))


def heterogeneity(task_vectors: list[Tensor], tau: float = 0.3, statistic: str = "gamma",
                  tau_log_std: float = 1.0) -> Heterogeneity:
    """Stage 1 of Algorithm 1: energies, gamma and whether gamma > tau (or, with
    ``statistic="log_std"``, whether log_std > tau_log_std)."""
    return heterogeneity_of(task_energies(task_vectors), tau, statistic, tau_log_std)


def heterogeneity_of(energies: Tensor, tau: float = 0.3, statistic: str = "gamma",
                     tau_log_std: float = 1.0) -> Heterogeneity:
    """:func:`heterogeneity` from the task energies."""
    gamma, log_std = heterogeneity_gamma(energies), heterogeneity_log_std(energies)
    heterogeneous = log_std > tau_log_std if statistic == "log_std" else gamma > tau
    return Heterogeneity(energies=energies, gamma=gamma, heterogeneous=heterogeneous,
                         log_std=log_std)


def task_ridge(centered: Tensor, proxy: Tensor, params: AceParams) -> float:
    """The ridge added to task t's raw proxy C_t^T C_t (Eq. 10's eps; Eq. 9 divides it by
    the trace): eps as given, rho * mean eigenvalue (relative), or eps=auto's estimate.
    ``proxy`` may be C^T C or C C^T: only its trace and Frobenius norm are read."""
    d_in = centered.shape[1]
    mean_eigenvalue = float(torch.trace(proxy)) / d_in
    if params.eps == "auto":
        rho = auto_ridge_ratio(params.auto_rule, centered, proxy)
        if rho is None:
            _warn_once(f"eps=auto is undefined for a layer of shape {tuple(centered.shape)} "
                       f"(zero task vector or d_out = 1): eps {params.eps_fallback:g} used")
            return float(params.eps_fallback or 0.0)
        return rho * mean_eigenvalue
    if params.eps == "paper":
        raise AceMergeError("eps=paper is resolved from the base model's config.json: merge "
                            "through acemerge.merge / merge_state_dicts(config=...)")
    return fixed_ridge(mean_eigenvalue, params)


def fixed_ridge(mean_eigenvalue: float, params: AceParams) -> float:
    """A number eps as a ridge: as is (the paper), or rho times the mean eigenvalue."""
    assert isinstance(params.eps, float | int)
    return params.eps * mean_eigenvalue if params.eps_mode == "relative" else params.eps


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a message once per process (the first layer where it happens)."""
    key = message.split(" for a layer")[0]
    if key not in _WARNED:
        _WARNED.add(key)
        logging.getLogger("acemerge").warning("ace: %s (said once)", message)


def solve_right(numerator: Tensor, system: Tensor, solver: str) -> Tensor:
    """numerator @ system^-1 (Eq. 14); pseudo-inverse if the system is singular."""
    try:
        if solver == "inverse":
            result = numerator @ torch.linalg.inv(system)
        else:
            result = torch.linalg.solve(system, numerator, left=False)
        if torch.isfinite(result).all():
            return result
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        pass
    return numerator @ torch.linalg.pinv(system)


def solve_prior_system(numerator: Tensor, symmetric: Tensor, prior_row: Tensor | None
                       ) -> Tensor | None:
    """numerator @ (A + 1 c^T)^-1 for symmetric positive definite A (Eq. 14 with the prior
    of Eq. 13): a Cholesky factor of A and Sherman-Morrison for the rank-one term,
        X = Y - (Y 1) (A^-1 c)^T / (1 + c^T A^-1 1),   Y = numerator A^-1,
    half the factorization work of LU on the non-symmetric system. None when A is not
    numerically positive definite or the rank-one update is singular (callers fall back)."""
    factor = cholesky_lower(symmetric)
    if factor is None:
        return None
    y = torch.cholesky_solve(numerator.T, factor).T  # numerator A^-1 (A symmetric)
    if prior_row is None:
        return y if torch.isfinite(y).all() else None
    ones = torch.ones_like(prior_row)
    w, v = torch.cholesky_solve(torch.stack([ones, prior_row], dim=1), factor).unbind(dim=1)
    denominator = 1.0 + float(prior_row @ w)
    if abs(denominator) < 1e-12:
        return None
    result = y - torch.outer(y.sum(dim=1), v / denominator)
    return result if torch.isfinite(result).all() else None


def top_singular_part(matrix: Tensor, rank: int, cap_dtype: torch.dtype | None
                      ) -> tuple[float, Tensor] | None:
    """sigma_iso and U_k V_k^T of W_fused's top ``rank`` singular triplets (Eqs. 18-19),
    with k capped at the numerical rank when ``cap_dtype`` is given (tolerance of that
    dtype); None for k = 0. The triplets come from :func:`top_svd` (a float64 Gram
    eigendecomposition on CPU where sigma_k >= GRAM_MIN_RATIO sigma_1: there the spectrum
    is exact wherever a tolerance can fall below sigma_k)."""
    top = top_svd(matrix, rank)
    if cap_dtype is not None:
        rank = min(rank, numerical_rank(top.spectrum, tuple(matrix.shape), cap_dtype))
    if rank == 0:
        return None
    return float(top.s[:rank].mean()), top.u[:, :rank] @ top.vh[:rank]


def ace_matrix(task_vectors: list[Tensor], params: AceParams) -> Tensor:
    """Algorithm 1 for one (d_out, d_in) weight: returns the merged task vector."""
    dtype = compute_dtype_of(task_vectors[0])
    stats = heterogeneity(task_vectors, params.tau, params.heterogeneity,
                          params.tau_log_std)  # Eq. 7
    normalize = stats.heterogeneous and params.adaptive_normalization
    refine = stats.heterogeneous and params.spectral_refinement

    d_out, d_in = task_vectors[0].shape
    device = task_vectors[0].device
    sums = GramSums(d_out, d_in, dtype, device)  # sum_t Sigma~_t and sum_t C_t Sigma~_t
    eps_sum = 0.0
    # the residual's sum_t D_t Sigma~_t is rebuilt from the numerator (see below):
    ridge_terms = torch.zeros_like(sums.numerator) if refine else None  # sum_t eps_t C_t
    mean_terms = torch.zeros(d_in, dtype=dtype, device=device) if refine else None
    task_sum = torch.zeros_like(sums.numerator) if refine else None  # sum_t D_t

    for tv in task_vectors:  # in-place accumulation: no d_in x d_in temporaries
        delta = tv.to(dtype)
        mean_row = delta.mean(dim=0)  # mu_t
        centered = delta - mean_row  # Eq. 5: mean over the d_out axis
        # Eq. 6's proxy Sigma^_t = C^T C, or the row Gram C C^T for wide weights (the same
        # trace and Frobenius norm, all the ridge rules read)
        small = sums.small_gram(centered)
        ridge = task_ridge(centered, small, params)  # eps (paper), or relative / auto
        if normalize:
            trace = float(torch.trace(small)) + LOG_FLOOR
            scale, eps_t = 1.0 / trace, ridge / trace  # Eqs. 8, 9
        else:
            scale, eps_t = 1.0, ridge  # Eq. 10
        sums.add(centered, small, scale)  # Sigma~_t (Eq. 15; + eps_t I below), C_t Sigma~_t
        sums.numerator.add_(centered, alpha=eps_t)  # W~_t Sigma_t,reg = C_t Sigma~_t + eps_t C_t
        eps_sum += eps_t
        if refine:
            ridge_terms.add_(centered, alpha=eps_t)
            mean_terms.add_((centered @ mean_row) @ centered, alpha=scale)  # (C mu)^T C
            task_sum.add_(delta)
    numerator, sum_reg = sums.finish()
    sum_reg.diagonal().add_(eps_sum)  # sum_t Sigma_t,reg
    # Eq. 11: the mean row of sum_t Sigma~_t, i.e. of sum_reg without the ridge's eps_sum I
    prior_row = sum_reg.mean(dim=0) - eps_sum / d_in

    prior = None
    if params.collective_prior:
        if normalize:
            prior_row = prior_row / (stats.energies.mean().to(dtype) + LOG_FLOOR)  # Eqs. 12-13
        prior = prior_row  # the system is sum_reg + 1 c^T (c^T broadcast onto every row)
    merged_pre = None if params.solver == "inverse" else \
        solve_prior_system(numerator, sum_reg, prior)
    if merged_pre is None:
        system = sum_reg if prior is None else sum_reg + prior.unsqueeze(0)
        merged_pre = solve_right(numerator, system, params.solver)  # Eq. 14
    if not refine:
        return merged_pre

    # Eqs. 16-17. D_t = C_t + 1 mu_t^T, so D_t Sigma~_t = C_t Sigma~_t + 1 (mu_t^T Sigma~_t):
    # sum_t D_t Sigma~_t = numerator - sum_t eps_t C_t + 1 sum_t mu_t^T Sigma~_t.
    weighted_sum = numerator.sub_(ridge_terms).add_(mean_terms)  # merged_pre is solved
    residual = torch.addmm(weighted_sum, task_sum, sum_reg, alpha=-1.0 / len(task_vectors))
    rank = int(min(d_out, d_in) * params.k_frac)
    if rank == 0:
        return merged_pre
    cap = dtype if params.refine_rank == "numerical" else None
    top = top_singular_part(merged_pre + residual, rank, cap)  # W_fused's top-k
    if top is None:
        return merged_pre
    sigma_iso, directions = top  # Eq. 18
    return merged_pre + sigma_iso * directions  # Eq. 19


# --- the same rule on factored task vectors D_t = B_t A_t (LoRA experts) ------------------
#
# With R = sum_t r_t, A = [A_1; ...; A_T] (R x d_in), B~_t = B_t - 1 mean_row(B_t) (Eq. 5),
# G_t = B~_t^T B~_t and K = A A^T: S_t = A_t^T G_t A_t (Eq. 6), so
#   numerator  sum_t C_t R_t = [B~_t] blockdiag(K_tt G~_t + eps_t I) A,
#   system     eps I + A^T Gd A + 1 c^T,  c^T = a^T Gd A,  a = A 1 / d_in  (Eqs. 11-13),
# i.e. eps I + U V with U = [A^T, 1], V = Q A, Q = [Gd; a^T Gd] (Gd = blockdiag(G~_t)), and
# Woodbury gives W_pre = [B~_t] Z A with Z = P (I - [K, A 1] (eps I + Q [K, A 1])^-1 Q) / eps.
# The residual (Eqs. 16-17) is [B_t] (blockdiag(K_tt G~_t) - (K Gd + eps I) / T) A, so
# W_fused = [B~_t, B_t] Z_f A has rank <= R: its SVD comes from two QRs and a small SVD.
# The small algebra runs in float64. eps = 0, eps=auto and refine_rank=paper with k above
# the numerical rank fall back to the dense rule (None).


def _factored_energies(factors: list[Factored]) -> Tensor:
    """||B_t A_t||_F^2 = tr((B^T B)(A A^T)) for every task."""
    return torch.stack([((f.left.T @ f.left).double() * (f.right @ f.right.T).double()).sum()
                        for f in factors])


def ace_low_rank(factors: list[Factored], params: AceParams) -> Factored | None:
    """Algorithm 1 on factored task vectors; equals :func:`ace_matrix` on the products."""
    if params.eps in ("auto", "paper") or params.solver != "solve":
        return None
    dtype = compute_dtype_of(factors[0].left)
    d_out, d_in = factors[0].shape
    energies = _factored_energies(factors)
    het = heterogeneity_of(energies, params.tau, params.heterogeneity,
                           params.tau_log_std).heterogeneous
    normalize = het and params.adaptive_normalization
    refine = het and params.spectral_refinement
    a_cat = torch.cat([f.right for f in factors]).double()  # R x d_in
    b_raw = [f.left.double() for f in factors]
    b_centered = [b - b.mean(dim=0, keepdim=True) for b in b_raw]
    k_full = a_cat @ a_cat.T
    blocks, eps_total, p_blocks, g_blocks = _blocks(factors, b_centered, params, normalize,
                                                    d_in)
    if eps_total <= 0:
        return None
    gd, p = torch.block_diag(*g_blocks), torch.block_diag(*p_blocks)
    ones_sum = a_cat.sum(dim=1, keepdim=True)  # A 1
    q, u_cols = gd, k_full
    if params.collective_prior:
        prior = (ones_sum.T / d_in) @ gd
        if normalize:
            prior = prior / (float(energies.mean()) + LOG_FLOOR)
        q, u_cols = torch.cat([gd, prior]), torch.cat([k_full, ones_sum], dim=1)
    core = eps_total * torch.eye(q.shape[0], dtype=torch.float64) + q @ u_cols
    try:
        z = p @ (torch.eye(p.shape[0], dtype=torch.float64)
                 - u_cols @ torch.linalg.solve(core, q)) / eps_total
    except RuntimeError:
        return None
    left_pre = torch.cat(b_centered, dim=1)
    merged = Factored(left_pre, z @ a_cat)
    if not refine:
        return Factored(merged.left.to(dtype), merged.right.to(dtype))
    return _refined(merged, b_raw, a_cat, z, blocks, gd, k_full, eps_total, params,
                    (d_out, d_in), dtype)


def _blocks(factors: list[Factored], b_centered: list[Tensor], params: AceParams,
            normalize: bool, d_in: int) -> tuple[list[Tensor], float, list[Tensor], list[Tensor]]:
    """Per task: K_tt G~_t, and eps_t; their sum; P_t = K_tt G~_t + eps_t I; G~_t."""
    kg, p_blocks, g_blocks, eps_total = [], [], [], 0.0
    for f, b in zip(factors, b_centered, strict=True):
        a = f.right.double()
        k_tt, g = a @ a.T, b.T @ b
        trace = float((g * k_tt).sum())  # tr(S_t)
        ridge = fixed_ridge(trace / d_in, params)
        scale = 1.0 / (trace + LOG_FLOOR) if normalize else 1.0
        eps_t = ridge * scale
        g_tilde = g * scale
        kg.append(k_tt @ g_tilde)
        p_blocks.append(kg[-1] + eps_t * torch.eye(len(g), dtype=torch.float64))
        g_blocks.append(g_tilde)
        eps_total += eps_t
    return kg, eps_total, p_blocks, g_blocks


def _refined(merged: Factored, b_raw: list[Tensor], a_cat: Tensor, z: Tensor,
             kg_blocks: list[Tensor], gd: Tensor, k_full: Tensor, eps_total: float,
             params: AceParams, shape: tuple[int, int], dtype: torch.dtype) -> Factored | None:
    """Eqs. 16-19 in factored form."""
    n_tasks = len(b_raw)
    residual = torch.block_diag(*kg_blocks) - (k_full @ gd + eps_total * torch.eye(
        len(k_full), dtype=torch.float64)) / n_tasks
    left = torch.cat([merged.left, torch.cat(b_raw, dim=1)], dim=1)  # [B~, B]
    core_f = torch.cat([z, residual])  # W_fused = left @ core_f @ A
    u_full, s, vh_full = factored_svd(left, core_f @ a_cat)
    rank = int(min(shape) * params.k_frac)
    if rank == 0:
        return Factored(merged.left.to(dtype), merged.right.to(dtype))
    available = numerical_rank(s, shape, dtype)
    if params.refine_rank == "paper" and rank > available:
        return None  # the paper's k would pick directions of zero singular values
    rank = min(rank, available)
    if rank == 0:
        return Factored(merged.left.to(dtype), merged.right.to(dtype))
    sigma_iso = float(s[:rank].mean())  # Eq. 18
    return Factored(torch.cat([merged.left, sigma_iso * u_full[:, :rank]], dim=1).to(dtype),
                    torch.cat([merged.right, vh_full[:rank]]).to(dtype))  # Eq. 19


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=ace_low_rank,
        low_rank_except="eps=auto, eps=0, solver=inverse, or refine_rank=paper "
        "where k exceeds the numerical rank",
        name="ace",
        params=AceParams,
        matrix_rule=ace_matrix,
        resolve=resolve_for_model,
        paper="ACE-Merging, arXiv 2603.02945 (CVPR 2026)",
        summary="closed-form merge with task covariances estimated from the task vectors",
    )
)
