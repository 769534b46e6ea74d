"""`mlc export onnx FOLDER [--out DIR] [--quantize int8]`."""
from __future__ import annotations


def _cmd_export_onnx(args) -> int:
    from mlc.deploy.onnx_export import export_onnx, format_summary

    summary = export_onnx(args.folder, args.out, quantize=args.quantize, overwrite=args.overwrite)
    print(format_summary(summary))
    return 0


def register(subparsers) -> None:
    from mlc.deploy.onnx_export import QUANTIZE, TOLERANCE
    from mlc.paths import add_overwrite_flag

    e = subparsers.add_parser("export", help="Export a model folder for use outside mlc (ONNX).",
                              description="Export a model folder for use outside mlc.")
    esub = e.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    o = esub.add_parser(
        "onnx", help="Write the encoder as ONNX (input_ids, attention_mask -> last_hidden_state), checked "
                     "with onnxruntime.",
        description="Export an HF model folder's encoder with torch.onnx.export (dynamic batch and sequence "
                    "axes), copy its config, tokenizer and sentence-transformers modules beside it, and check "
                    f"the graph with onnxruntime against PyTorch (max abs difference <= {TOLERANCE:g}). Needs "
                    "pip install 'mlc[onnx]'.")
    o.add_argument("folder", help="HF model folder (e.g. runs/demo/final)")
    o.add_argument("--out", help="output folder (default: FOLDER-onnx beside it), replaced atomically")
    o.add_argument("--quantize", choices=QUANTIZE,
                   help="also write model.int8.onnx: onnxruntime dynamic quantisation of the weights")
    add_overwrite_flag(o)
    o.set_defaults(func=_cmd_export_onnx)
