"""`mixprec inspect [MODEL]`: the model's weight groups: name, kind, layer, parameters, share.

Usage:
    mixprec inspect                              # the bundled model, per-layer groups
    mixprec inspect path/to/model --granularity fine --json
"""

from __future__ import annotations

import argparse
import json

from mixprec.cli.common import add_model_argument, print_table
from mixprec.model.arch import DEFAULT_QUANTIZED_KINDS
from mixprec.model.loading import Checkpoint
from mixprec.model.modelmap import DEFAULT_GRANULARITY, Granularity, ModelMap

__all__ = ["register", "group_rows"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="list the model's weight groups",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--granularity", choices=[g.value for g in Granularity], default=DEFAULT_GRANULARITY,
                        help="layer: attn|mlp|shared|experts per layer; fine: q|kv|o, gate_up|down; "
                             "expert: fine with one group per routed expert (default fine)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def group_rows(model_map: ModelMap) -> list[dict[str, object]]:
    """One row per group; `share` is the fraction of all listed weights, `quantized` the default policy."""
    total = sum(g.num_params for g in model_map.groups)
    return [
        {"name": g.name, "kind": g.kind.value, "layer": "-" if g.layer is None else g.layer,
         "params": g.num_params, "share": f"{g.num_params / total:.2%}",
         "quantized": "yes" if g.kind in DEFAULT_QUANTIZED_KINDS else "no", "tensors": len(g.weights)}
        for g in model_map.groups
    ]


def run(args: argparse.Namespace) -> int:
    checkpoint = Checkpoint.open(args.model)
    model_map = checkpoint.model_map(args.granularity)
    rows = group_rows(model_map)
    if args.json:
        groups = {g.name: {"keys": list(g.keys)} for g in model_map.groups}
        print(json.dumps({"model": str(checkpoint.path), "model_type": checkpoint.model_type,
                          "family": model_map.family, "groups": [r | groups[str(r["name"])] for r in rows]},
                         indent=2))
        return 0
    print(f"{checkpoint.path}  ({checkpoint.model_type}, adapter {model_map.family}, "
          f"{model_map.num_layers} layers, {len(rows)} groups at granularity {args.granularity})")
    print_table(rows, ["name", "kind", "layer", "params", "share", "quantized", "tensors"])
    quantized = model_map.num_params()
    print(f"quantizable weights (default kinds): {quantized:,} of {sum(g.num_params for g in model_map.groups):,}")
    return 0
