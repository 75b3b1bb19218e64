"""Recipe + ggml variants -> one GGUF file that llama.cpp loads, every tensor in its recipe type.

A recipe searched with a ggml quantizer (`--method gguf`, `gguf-imatrix`, `gguf-iq`) is written as
llama.cpp's own file: the quantized matrices are the raw ggml blocks of the variants the search
measured (never re-quantized), routed experts are stacked into one 3-D tensor per projection
(`blk.N.ffn_down_exps`, one type for all experts: llama.cpp has no per-expert types), norms, biases and
routers are F32 (as llama.cpp's converter writes them), and every other unquantized matrix keeps 16 bits
(BF16 when the source is BF16, else F16). The file carries the architecture metadata and the tokenizer
(byte-level BPE from tokenizer.json), is written to a temporary sibling and renamed into place.

Only layouts llama.cpp computes as transformers does are written: its `qwen2moe` graph needs every
layer MoE and no top-k renormalisation, `qwen3moe` always renormalises, and `llama` (Mixtral, Llama)
needs q/k rows permuted to its rotary layout. Anything else is refused before a byte is written.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.checkpoint.compile import CompileConfig, open_variants
from mixprec.checkpoint.qformat import META_RECIPE, CompileError
from mixprec.checkpoint.shards import checkpoint_shards
from mixprec.core.fileio import atomic_path
from mixprec.formats.llamacpp import GGUF_ARCHS, gguf_name, tensor_types
from mixprec.formats.recipe import Recipe
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import ModelMap, WeightRef
from mixprec.quant import QuantSettings, quantizer_class
from mixprec.quant.ggml import GGMLQuantizedWeight, GGMLQuantizer, ggml_type_for
from mixprec.quant.variants import Variant

__all__ = ["GGUF_WRITABLE", "gguf_types", "tensor_plan", "llama_quantize_types", "as_ggml_recipe", "compile_gguf"]

log = logging.getLogger(__name__)

#: llama.cpp architectures this writer emits metadata for.
GGUF_WRITABLE = ("qwen2moe", "qwen3moe", "olmoe", "llama", "qwen2", "qwen3")
_F32_NAMES = re.compile(r".*(_norm\.weight|\.bias|ffn_gate_inp\.weight|ffn_gate_inp_shexp\.weight)")


def _arch(checkpoint: Checkpoint) -> str:
    arch = GGUF_ARCHS.get(checkpoint.model_type)
    if arch not in GGUF_WRITABLE:
        raise CompileError(f"{checkpoint.path}: model_type {checkpoint.model_type!r} cannot be written as GGUF "
                           f"yet (writable: {', '.join(GGUF_WRITABLE)}); export the tensor types with "
                           "`mixprec search --export-llama-quantize` and convert with llama.cpp's own tools")
    problem = _layout_problem(arch, checkpoint.config)
    if problem:
        raise CompileError(f"{checkpoint.path}: llama.cpp's {arch} graph would compute another model: {problem}")
    return arch


def _layout_problem(arch: str, config: dict[str, Any]) -> str | None:
    """Why llama.cpp would not reproduce this model's forward pass, or None."""
    if arch in ("qwen2moe", "qwen3moe"):
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            return (f"it needs every layer MoE (mlp_only_layers={config.get('mlp_only_layers')}, "
                    f"decoder_sparse_step={config.get('decoder_sparse_step', 1)})")
        want = arch == "qwen3moe"
        if bool(config.get("norm_topk_prob", want)) != want:
            return f"it {'always' if want else 'never'} renormalises top-k weights (norm_topk_prob must be {want})"
    if arch == "olmoe":
        return _olmoe_problem(config)
    return None


def _olmoe_problem(config: dict[str, Any]) -> str | None:
    """llama.cpp's olmoe graph: no top-k renormalisation, q/k norms over the whole projection (so as many KV
    heads as query heads), and no QKV clipping."""
    if config.get("norm_topk_prob"):
        return "it never renormalises top-k weights (norm_topk_prob must be false)"
    heads = config["num_attention_heads"]
    if int(config.get("num_key_value_heads") or heads) != int(heads):
        return (f"its k_norm spans all heads, so num_key_value_heads ({config.get('num_key_value_heads')}) must "
                f"equal num_attention_heads ({heads})")
    if config.get("clip_qkv") is not None:
        return f"it does not clip q/k/v (clip_qkv={config['clip_qkv']})"
    return None


def _ladder(recipe: Recipe) -> str:
    method = recipe.quantizer.method
    if not issubclass(quantizer_class(method), GGMLQuantizer):
        raise CompileError(f"recipe quantizer {method!r} has no ggml types; GGUF needs a recipe searched with "
                           "--method gguf (or gguf-imatrix, gguf-iq): quantize, measure and search with it")
    return method


def as_ggml_recipe(recipe: Recipe, method: str = "gguf") -> Recipe:
    """The same widths in a ggml ladder (`gguf`: 2 -> Q2_K ... 8 -> Q8_0), for a recipe searched with another
    quantizer (the demo's RTN recipe), so it can be written as a GGUF.

    A width the ladder lacks (7 bits) takes the next rung up, so no group gets fewer bits than the recipe
    gave it; an option label (`gptq-b4-g32`) counts as its width. ggml's block scales make every rung cost a
    little more than RTN's (Q2_K is 2.625 bpw).
    """
    if issubclass(quantizer_class(recipe.quantizer.method), GGMLQuantizer):
        return recipe
    rungs = sorted(quantizer_class(method).supported_bits)

    def rung(bits: int | None) -> int | None:
        if bits is None:
            return None
        return next((r for r in rungs if r >= bits), rungs[-1])

    return Recipe(recipe.model, recipe.granularity, QuantSettings(method=method),
                  {name: rung(bits) for name, bits in recipe.widths().items()}, recipe.budget,
                  provenance={"mapped_from": recipe.quantizer.method, "ladder": method})


def gguf_types(recipe: Recipe, model_map: ModelMap) -> dict[str, str]:
    """GGUF tensor name -> ggml type of every quantized matrix (the shape fallback applied)."""
    method = _ladder(recipe)
    return tensor_types(model_map, recipe.groups, lambda bits, cols: ggml_type_for(method, bits, cols))


@dataclass
class _Tensor:
    """One GGUF tensor being assembled: slices by expert index (None for a plain matrix or vector)."""

    qtype: str
    slices: dict[int | None, np.ndarray] = field(default_factory=dict)

    def array(self) -> np.ndarray:
        if list(self.slices) == [None]:
            return self.slices[None]
        return np.stack([self.slices[e] for e in sorted(self.slices)])  # type: ignore[type-var]


def _float_type(name: str, dtype: str, ndim: int) -> str:
    """Type of an unquantized tensor: F32 for vectors, norms, biases and routers, else its 16-bit dtype."""
    if ndim == 1 or _F32_NAMES.fullmatch(name):
        return "F32"
    return "BF16" if dtype.upper() == "BF16" else "F16"


def _float_bytes(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return tensor.to(torch.float32).numpy()
    if qtype == "F16":
        return tensor.to(torch.float16).numpy()
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)


def tensor_plan(recipe: Recipe, checkpoint: Checkpoint, model_map: ModelMap) -> dict[str, str]:
    """GGUF tensor name -> type of every tensor the file holds, in file order (read from headers only)."""
    quantized = gguf_types(recipe, model_map)
    headers = {name: info for h in checkpoint_shards(checkpoint.path) for name, info in h.tensors.items()}
    plan: dict[str, str] = {}
    for key in sorted(headers, key=_natural):
        target = gguf_name(key)
        if target is not None:
            info = headers[key]
            plan.setdefault(target.name, quantized.get(target.name)
                            or _float_type(target.name, info.dtype, len(info.shape)))
    return plan


def llama_quantize_types(recipe: Recipe, checkpoint: Checkpoint) -> dict[str, str]:
    """The `--tensor-type-file` map: every tensor llama-quantize could quantize, with its recipe type.

    Unquantized matrices are listed too (as f16/bf16), so `--pure` over any quantized base ftype leaves
    them alone; F32 vectors, norms and routers are never quantized by llama-quantize and are left out.
    """
    plan = tensor_plan(recipe, checkpoint, checkpoint.model_map(recipe.granularity))
    return {name: qtype for name, qtype in plan.items() if qtype != "F32"}


def _llama_rows(name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """llama.cpp's `llama` arch rotates interleaved pairs; HF rotates halves: permute q/k rows as its converter."""
    heads = int(config["num_attention_heads"])
    if ".attn_k." in name:
        heads = int(config.get("num_key_value_heads", heads))
    elif ".attn_q." not in name:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _collect(checkpoint: Checkpoint, model_map: ModelMap, recipe: Recipe, variants: dict[int, Variant],
             arch: str) -> dict[str, _Tensor]:
    refs: dict[str, tuple[WeightRef, int | None]] = {}
    for group in model_map.groups:
        for ref in group.weights:
            if ref.fused_on_disk:
                raise CompileError(f"{checkpoint.path}: {ref.key} stores experts fused; GGUF export needs "
                                   "per-expert checkpoint keys")
            refs[ref.key] = (ref, recipe.groups.get(group.name))
    plan = tensor_plan(recipe, checkpoint, model_map)
    tensors: dict[str, _Tensor] = {}
    for key in sorted(checkpoint.key_to_file, key=_natural):
        target = gguf_name(key)
        if target is None:
            log.warning("%s: %s has no llama.cpp tensor; not written", checkpoint.path, key)
            continue
        ref, bits = refs.get(key, (None, None))
        if ref is not None and bits is not None:
            q = variants[bits].quantized(ref)
            assert isinstance(q, GGMLQuantizedWeight)
            qtype, data = q.ggml_type, q.codes.numpy()
        else:
            qtype = plan[target.name]
            data = _float_bytes(checkpoint.read(key), qtype)
            if target.name.endswith("ffn_gate_inp_shexp.weight"):
                data = data.reshape(-1)  # llama.cpp holds the shared-expert gate [1, H] as a vector
        if arch == "llama":
            data = _llama_rows(target.name, data, checkpoint.config)
        entry = tensors.setdefault(target.name, _Tensor(qtype))
        if entry.qtype != qtype:
            raise CompileError(f"{target.name}: experts of one tensor got {entry.qtype} and {qtype}")
        entry.slices[target.expert] = data
    return tensors


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _metadata(writer: Any, arch: str, config: dict[str, Any]) -> None:
    """Hyper-parameters llama.cpp reads for `arch` (from the Hugging Face config.json)."""
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config.get("intermediate_size", 0)))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads", config["num_attention_heads"])))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    if experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"])
    if arch in ("qwen3", "qwen3moe"):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if arch == "llama":
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_vocab_size(int(config["vocab_size"]))


def _tokenizer(writer: Any, checkpoint: Checkpoint) -> None:
    """Byte-level BPE vocabulary (tokens, merges, special ids); placeholder tokens when the model has none."""
    import gguf

    vocab_size = int(checkpoint.config["vocab_size"])
    tokens, merges, special = [f"<tok{i}>" for i in range(vocab_size)], ["<tok0> <tok1>"], set()
    path = checkpoint.path / "tokenizer.json"
    if path.exists():
        data = json.loads(path.read_text())
        for token, index in data["model"]["vocab"].items():
            if index < vocab_size:
                tokens[index] = token
        for added in data.get("added_tokens", []):
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                special.add(added["id"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])] or merges
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, key in ((writer.add_bos_token_id, "bos_token_id"), (writer.add_eos_token_id, "eos_token_id"),
                        (writer.add_pad_token_id, "pad_token_id")):
        if isinstance(checkpoint.config.get(key), int):
            setter(int(checkpoint.config[key]))


def _write(out: Path, arch: str, checkpoint: Checkpoint, recipe: Recipe, tensors: dict[str, _Tensor]) -> None:
    import gguf

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(checkpoint.path.name)
        writer.add_file_type(gguf.LlamaFileType.GUESSED)
        writer.add_string(META_RECIPE, recipe.to_yaml())
        _metadata(writer, arch, checkpoint.config)
        _tokenizer(writer, checkpoint)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.array(), raw_dtype=gguf.GGMLQuantizationType[tensor.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _check_out(out: Path, checkpoint: Checkpoint, force: bool) -> None:
    """--out is a file path: never a folder, never inside the model, and an existing file only when mixprec
    wrote it (a GGUF carrying `mixprec.recipe`) or with `force`."""
    if out.is_dir():
        raise CompileError(f"--out {out} is a folder; --format gguf writes one file: give a .gguf path")
    if out.resolve().is_relative_to(checkpoint.path):
        raise CompileError(f"--out {out} is inside the source model {checkpoint.path}; choose another path")
    if out.exists() and not force and not _written_by_mixprec(out):
        raise CompileError(f"--out {out} exists and is not a GGUF mixprec wrote; it would be overwritten: "
                           "choose another path or pass --force")


def _written_by_mixprec(path: Path) -> bool:
    import gguf

    try:
        return gguf.GGUFReader(path).get_field(META_RECIPE) is not None
    except Exception:  # not a GGUF at all: gguf raises ValueError / struct errors on foreign bytes
        return False


def _report(recipe: Recipe, model_map: ModelMap, variants: dict[int, Variant], tensors: dict[str, _Tensor],
            quantized: dict[str, str], out: Path) -> dict[str, Any]:
    """The same size report as the other formats: variant-predicted vs written bytes, plus the GGUF types."""
    groups = [(model_map.group(g), b) for g, b in recipe.groups.items() if b is not None]
    predicted = sum(variants[b].storage_bits(group) for group, b in groups) // 8
    qbytes = sum(tensors[name].array().nbytes for name in quantized)
    qparams = sum(group.num_params for group, _ in groups)
    total = sum(t.array().nbytes for t in tensors.values())
    bits: dict[str, dict[str, int]] = {}
    for group, width in groups:
        row = bits.setdefault(ggml_type_for(recipe.quantizer.method, width), {"matrices": 0, "params": 0})
        row["matrices"] += len(group.weights)
        row["params"] += group.num_params
    return {"format": "gguf", "path": str(out), "shards": [out.name], "bits": bits,
            "tensor_types": {name: t.qtype for name, t in tensors.items()},
            "predicted": {"quantized_bytes": predicted, "tensor_bytes": total - qbytes + predicted},
            "actual": {"quantized_bytes": qbytes, "tensor_bytes": total, "folder_bytes": out.stat().st_size,
                       "bpw": 8 * qbytes / max(qparams, 1)}}


def compile_gguf(recipe: Recipe, checkpoint: Checkpoint, work_dir: str | Path, out: str | Path,
                 config: CompileConfig | None = None) -> dict[str, Any]:
    """Write `recipe` as a GGUF file at `out` from the ggml variants in `work_dir`; returns the size report.

    Everything is validated (ggml recipe, writable and faithful architecture, fingerprint, variants, one
    type per tensor, a safe output path) before the file is written; it appears atomically.
    """
    started = time.perf_counter()
    out = Path(out)
    recipe.require_widths("GGUF (one ggml type ladder per recipe)")
    _check_out(out, checkpoint, (config or CompileConfig()).force)
    model_map = checkpoint.model_map(recipe.granularity)
    recipe.check_model(model_map, checkpoint.fingerprint)
    arch = _arch(checkpoint)
    quantized = gguf_types(recipe, model_map)
    variants = open_variants(recipe, checkpoint, Path(work_dir))
    tensors = _collect(checkpoint, model_map, recipe, variants, arch)
    _write(out, arch, checkpoint, recipe, tensors)
    report = _report(recipe, model_map, variants, tensors, quantized, out)
    return {**report, "arch": arch, "elapsed_s": round(time.perf_counter() - started, 3)}
