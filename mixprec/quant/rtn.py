"""Round-to-nearest group quantization: sign-aware absmax scales, with an optional clipping search.

Plain absmax scaling wastes levels: at 2 bits symmetric absmax is effectively ternary because the
most negative level is never used (FIELD.md §9.4). Symmetric groups therefore put their extra level
(-2^(b-1)) on the side of the larger-magnitude extreme by letting the scale be negative. With
`clip_search` on, every group also tries `clip_grid` scales between a strongly clipped one and the
no-clipping one and keeps the one with the smallest squared error, measured after the scale is
rounded to fp16. It is off by default: on the bundled model it lowers weight error but raises
whole-model KL (it clips the outliers the output depends on) and makes the additive estimate of
mixed recipes less faithful (README, Quantizers). Rows are independent, so a fused expert tensor
[E, out, in] is quantized in one batched call that equals quantizing each expert alone.
"""

from __future__ import annotations

import math

import torch

from mixprec.quant.base import (
    INTEGER_CODE_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantConfig,
    QuantizedWeight,
    Quantizer,
    register_quantizer,
)

__all__ = ["RTNQuantizer", "quantize_groups"]

_MIN_CLIP = 0.35  # smallest clipping ratio tried; below this 2-bit error only grows on real weights
_ROW_CHUNK = 256  # rows quantized at a time: keeps each pass over the chunk in cache


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    groups = math.ceil(cols / group_size)
    padded = torch.nn.functional.pad(weight.to(torch.float32), (0, groups * group_size - cols))
    return padded.view(rows, groups, group_size)


def _candidates(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Base scales and zero-point offsets for ratio 1.0: [rows, groups] each."""
    levels = 2**config.bits - 1
    if config.symmetric:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        extreme = torch.where(-lo >= hi, lo, hi)  # the larger-magnitude extreme, with its sign
        scale = extreme / -(2 ** (config.bits - 1))
        return scale, torch.full_like(scale, 2 ** (config.bits - 1))
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    return (hi - lo) / levels, lo


def _scale_for(scale: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """The fp16 scale actually stored for a clipping ratio (never zero, so division is safe)."""
    s = (scale * ratio).to(torch.float16)
    return torch.where(s == 0, torch.ones_like(s), s)


def _quantize_with(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, config: QuantConfig,
                   ratio: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, fp16 scales and zero points for one clipping ratio (a float or one ratio per group)."""
    levels = 2**config.bits - 1
    s = _scale_for(scale, ratio)
    zero = offset if config.symmetric else torch.clamp(torch.round(-(offset * ratio) / s.float()), 0, levels)
    codes = torch.clamp(torch.round(w / s.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, levels)
    return codes, s, zero


def _best_ratios(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, config: QuantConfig,
                 ratios: list[float], weights: torch.Tensor | None) -> torch.Tensor:
    """Per group, the clipping ratio with the smallest (importance-weighted) squared error."""
    best_err = torch.full(scale.shape, float("inf"))
    best_ratio = torch.ones_like(scale)
    for ratio in ratios:
        codes, s, zero = _quantize_with(w, scale, offset, config, ratio)
        codes.sub_(zero.unsqueeze(-1)).mul_(s.float().unsqueeze(-1)).sub_(w).square_()
        err = (codes if weights is None else codes.mul_(weights)).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def quantize_groups(weight: torch.Tensor, config: QuantConfig,
                    importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D matrix group-wise; `importance` [in] optionally weights the clipping error."""
    rows, cols = weight.shape
    codes_out, scales_out, zeros_out = [], [], []
    ratios = (torch.linspace(_MIN_CLIP, 1.0, config.clip_grid).tolist() if config.clip_search else [1.0])
    if config.symmetric and config.clip_search:
        ratios.append(2 ** (config.bits - 1) / (2 ** (config.bits - 1) - 1))  # no clipping on either side
    weights = None if importance is None else _grouped(importance.view(1, -1), config.group_size)
    for start in range(0, rows, _ROW_CHUNK):
        w = _grouped(weight[start : start + _ROW_CHUNK], config.group_size)
        scale, offset = _candidates(w, config)
        ratio = _best_ratios(w, scale, offset, config, ratios, weights) if len(ratios) > 1 else 1.0
        codes, s, zero = _quantize_with(w, scale, offset, config, ratio)
        codes_out.append(codes.view(w.shape[0], -1)[:, :cols].to(torch.uint8))
        scales_out.append(s)
        zeros_out.append(zero.to(torch.uint8))
    zeros = None if config.symmetric else torch.cat(zeros_out)
    return QuantizedWeight(torch.cat(codes_out), torch.cat(scales_out), zeros, config.bits, config.group_size)


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    """Round-to-nearest with MSE-optimal clipping per group (the reference quantizer).

    A Hessian is optional: only its diagonal is used, to weight the clipping search's error.
    """

    needs_hessian = False
    supported_bits = INTEGER_CODE_BITS
    supported_group_sizes = SUPPORTED_GROUP_SIZES

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedWeight:
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D matrix [out, in], got shape {tuple(weight.shape)}")
        importance = None if hessian is None else torch.diagonal(hessian).clamp_min(0).to(torch.float32)
        return quantize_groups(weight, self.config, importance)

    def quantize_experts(self, weight: torch.Tensor,
                         hessians: list[torch.Tensor | None] | None = None) -> list[QuantizedWeight]:
        """Rows are independent without Hessians, so all experts are quantized in one batched call."""
        if hessians is not None and any(h is not None for h in hessians):
            return super().quantize_experts(weight, hessians)
        experts, rows, cols = weight.shape
        merged = quantize_groups(weight.reshape(experts * rows, cols), self.config)
        return [
            QuantizedWeight(
                merged.codes[e * rows : (e + 1) * rows],
                merged.scales[e * rows : (e + 1) * rows],
                None if merged.zeros is None else merged.zeros[e * rows : (e + 1) * rows],
                merged.bits, merged.group_size,
            )
            for e in range(experts)
        ]
