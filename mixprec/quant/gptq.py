"""GPTQ: error-compensating group quantization driven by the input Hessian of each matrix.

Round-to-nearest treats every weight alone. GPTQ (Frantar et al., 2022) quantizes one input column at
a time and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian H = E[x xᵀ] of the matrix's calibration inputs, so the *output* error ‖(W − Q) X‖ on
those inputs is what gets minimised, not the weight error. The solve is the usual one: dampen H, take
the upper Cholesky factor of H⁻¹, and work through the columns in blocks whose updates to later columns
are applied lazily as one matrix product per block.

The output is the same `QuantizedWeight` as RTN (integer codes + fp16 group scales along the input
dimension), so every later stage works unchanged. Group scales come from RTN's `quantize_groups`, run
on the columns of a group:

* without act-order, a group's scale is chosen when the solve reaches the group, from the weights as
  the earlier columns' error compensation has left them ("dynamic" groups);
* with act-order (columns visited by decreasing Hessian diagonal), the visit order no longer keeps a
  group's columns together, so scales are fixed up front from the original weights ("static"
  groups). That keeps the storage format contiguous groups, with no per-column group index.

Note: GPTQ does not use RTN's MSE clipping search by default (`GPTQSettings.clip_search`;
`QuantConfig.clip_search` is RTN's switch and GPTQ ignores it). On the bundled model, RTN's search
(weighted by diag H) made GPTQ's whole-model held-out KL 2.6x, 1.4x and 1.2x worse at 2, 3 and 4 bits
with act-order: clipping puts large errors on outlier weights, and only the part of an error that the
other inputs can stand in for is compensated. When the search is switched on it is therefore weighted
by what cannot be compensated, the conditional variance 1 / [H⁻¹]ᵢᵢ of each input; that was better
than diag(H) at every bit width and beat no clipping at 4 bits only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from mixprec.core.errors import QuantConfigError
from mixprec.quant.base import (
    INTEGER_CODE_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    QuantizedWeight,
    Quantizer,
    register_quantizer,
)
from mixprec.quant.rtn import quantize_groups

__all__ = ["GPTQSettings", "GPTQQuantizer", "gptq_quantize", "dampened_inverse_factor"]

log = logging.getLogger(__name__)

_DAMP_RETRIES = 4  # each retry multiplies the dampening by 10 when H is numerically not positive definite


@dataclass(frozen=True)
class GPTQSettings:
    """Solver settings of GPTQ; stored in every GPTQ variant's manifest.

    `damp` is added to the Hessian diagonal as a fraction of its mean (it keeps H invertible when
    calibration inputs are rank-deficient, and trades compensation for robustness). `act_order`
    visits columns in order of decreasing H diagonal, so the most active inputs are quantized while
    the most columns remain to absorb their error. `block_size` is the lazy-update block.
    `clip_search` picks group scales with RTN's clipping search (see the module note for why it is off).
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    clip_search: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise QuantConfigError(f"GPTQ damp={self.damp} must be in (0, 1); 0.01 is the usual choice")
        if self.block_size < 1:
            raise QuantConfigError(f"GPTQ block_size={self.block_size} must be positive; 128 is the usual choice")


def dampened_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), so that (H + λI)⁻¹ = UᵀU.

    Dead inputs (zero diagonal: never active in calibration) get a unit diagonal so H stays invertible;
    their columns are then rounded without spreading error. If the factorisation still fails, the
    dampening is raised tenfold a few times before giving up.
    """
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    mean = float(diag.mean())
    for attempt in range(_DAMP_RETRIES + 1):
        lam = damp * (10**attempt) * mean
        chol, info = torch.linalg.cholesky_ex(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("GPTQ: Hessian needed dampening %.3g (asked %.3g) to be invertible",
                                damp * 10**attempt, damp)
                return factor.to(torch.float32)
    raise QuantConfigError(f"GPTQ: the Hessian is not positive definite even with damp={damp * 10**_DAMP_RETRIES:g}; "
                           "check the calibration data (NaN/inf activations?) or raise --damp")


def _column_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of one column under fixed per-row scales and zero points."""
    codes = torch.clamp(torch.round(w / scale) + zero, 0, levels)
    return codes, (codes - zero) * scale


class _Grid:
    """Per-group fp16 scales and zero points [rows, groups], filled up front or group by group.

    Float copies are kept transposed ([groups, rows], contiguous) because the solve reads one
    group's values for every column it quantizes.
    """

    def __init__(self, rows: int, cols: int, config: QuantConfig) -> None:
        self.config = config
        groups = math.ceil(cols / config.group_size)
        self.scales = torch.ones(rows, groups, dtype=torch.float16)
        self.zeros: torch.Tensor | None = None if config.symmetric else torch.zeros(rows, groups, dtype=torch.uint8)
        self._scale_t = torch.ones(groups, rows)
        self._zero_t = torch.full((groups, rows), float(2 ** (config.bits - 1)))

    def _store(self, groups: slice, q: QuantizedWeight) -> None:
        self.scales[:, groups] = q.scales
        self._scale_t[groups] = q.scales.T.to(torch.float32)
        if q.zeros is not None and self.zeros is not None:
            self.zeros[:, groups] = q.zeros
            self._zero_t[groups] = q.zeros.T.to(torch.float32)

    def fit(self, group: int, columns: torch.Tensor, importance: torch.Tensor) -> None:
        """Choose one group's scale from its current columns [rows, width] with RTN's clipping search."""
        self._store(slice(group, group + 1), quantize_groups(columns, self.config, importance))

    def fit_all(self, weight: torch.Tensor, importance: torch.Tensor) -> None:
        """Choose every group's scale from the original weights (static groups)."""
        self._store(slice(None), quantize_groups(weight, self.config, importance))

    def column(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = col // self.config.group_size
        return self._scale_t[g], self._zero_t[g]


def _solve(wt: torch.Tensor, factor: torch.Tensor, perm: torch.Tensor, grid: _Grid, static: bool,
           importance: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize the rows of `wt` = Wᵀ [in, out] (already permuted) in blocks; codes in permuted order.

    Working on the transpose makes every column of W a contiguous row, which is what the inner loop
    touches; the lazy update of the remaining columns is one matrix product per block.
    """
    cols = wt.shape[0]
    gs = grid.config.group_size
    levels = 2**grid.config.bits - 1
    codes = torch.zeros_like(wt)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = wt[start:stop].clone()
        errors = torch.zeros_like(block)
        inv = factor[start:stop, start:stop]
        for i in range(stop - start):
            col = int(perm[start + i])
            if not static and col % gs == 0:
                width = min(gs, cols - col)
                grid.fit(col // gs, block[i : i + width].T, importance[col : col + width])
            scale, zero = grid.column(col)
            codes[start + i], deq = _column_quantize(block[i], scale, zero, levels)
            errors[i] = (block[i] - deq) / inv[i, i]
            block[i:] -= inv[i, i:].unsqueeze(1) * errors[i].unsqueeze(0)
        wt[stop:] -= factor[start:stop, stop:].T @ errors
    return codes


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
                  settings: GPTQSettings) -> QuantizedWeight:
    """GPTQ-quantize one matrix [out, in] given the Hessian [in, in] of its calibration inputs."""
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise QuantConfigError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match the weight's input "
                               f"dimension {cols}; it must be [in, in] = [{cols}, {cols}]")
    if not torch.isfinite(hessian).all():
        raise QuantConfigError("GPTQ: the Hessian contains NaN or inf; the calibration activations overflowed")
    w = weight.to(torch.float32)
    static = settings.act_order
    diagonal = torch.diagonal(hessian).to(torch.float32).clamp_min(0)
    perm = torch.argsort(diagonal, descending=True, stable=True) if static else torch.arange(cols)
    factor = dampened_inverse_factor(hessian[perm][:, perm], settings.damp)
    importance = torch.empty(cols)
    importance[perm] = 1.0 / (factor**2).sum(dim=0)  # 1 / diag(H⁻¹): the part of each input no other predicts
    grid = _Grid(rows, cols, replace(config, clip_search=settings.clip_search))
    if static:
        grid.fit_all(w, importance)
    gs = config.group_size
    block_size = max(gs, math.ceil(settings.block_size / gs) * gs)  # dynamic groups never straddle blocks
    codes_perm = _solve(w.T[perm].contiguous(), factor, perm, grid, static, importance, block_size)
    codes = torch.empty_like(codes_perm)
    codes[perm] = codes_perm
    return QuantizedWeight(codes.T.contiguous().to(torch.uint8), grid.scales, grid.zeros, config.bits,
                           config.group_size)


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    """GPTQ with RTN's group scales; needs the Hessian of every matrix (see `mixprec.quant.hessians`)."""

    needs_hessian = True
    supported_bits = INTEGER_CODE_BITS
    supported_group_sizes = SUPPORTED_GROUP_SIZES

    def __init__(self, config: QuantConfig, settings: GPTQSettings | None = None) -> None:
        super().__init__(config)
        self.settings = settings or GPTQSettings()

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D matrix [out, in], got shape {tuple(weight.shape)}")
        if hessian is None:
            raise QuantConfigError(
                "GPTQ needs the Hessian of the matrix's calibration inputs; build variants with a calibration "
                "(`mixprec quantize --method gptq` does this, or pass calibration= to quantize_variant)"
            )
        return gptq_quantize(weight, hessian, self.config, self.settings)
