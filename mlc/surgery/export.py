"""Exporting pruned models as plain Hugging Face folders."""
from __future__ import annotations

from pathlib import Path

from mlc.errors import MlcError
from mlc.models.io import copy_tokenizer
from mlc.paths import atomic_dir, atomic_write_json


def export_sliced(model, masks, out_dir: Path | str, tokenizer_from: Path | str, check_inputs=None, *,
                  overwrite: bool = False) -> dict:
    """Slice ``model`` (masked or not) by ``masks`` into a dense stock model, save it with its tokenizer to
    ``out_dir`` atomically, reload it with plain ``from_pretrained`` and, given ``check_inputs`` (a dict of
    tensors), verify the reloaded outputs equal the masked model's (atol 1e-5). Returns a summary."""
    import copy

    import torch

    from mlc.models.sentence import copy_sentence_modules
    from mlc.surgery.prune import apply_masks, remove_masks, slice_model

    sliced = slice_model(model, masks)
    summary = {"kept": masks.kept(), "ffn_padding": sliced.mlc_slice_report["ffn_padding"],
               "parameters": sum(p.numel() for p in sliced.parameters())}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, what="mlc prune (sliced model)") as tmp:
        sliced.save_pretrained(tmp)
        copy_tokenizer(tokenizer_from, tmp)
        copy_sentence_modules(tokenizer_from, tmp)  # pooling fitted to the sliced hidden size
        atomic_write_json(tmp / "mlc_prune.json", summary)
        if check_inputs is not None:
            reloaded = type(model).from_pretrained(str(tmp), local_files_only=True).eval()
            masked = model if getattr(model, "_mlc_masked", None) else apply_masks(copy.deepcopy(model), masks)
            was = masked.training
            masked.eval()
            with torch.no_grad():
                a = masked(**check_inputs, output_hidden_states=True)
                b = reloaded(**check_inputs, output_hidden_states=True)
            masked.train(was)
            if masked is not model:
                remove_masks(masked)
            hi = masks.hidden_index()
            diff = max(float((x[..., hi] - y).abs().max()) for x, y in zip(a.hidden_states, b.hidden_states))
            if getattr(a, "logits", None) is not None:
                diff = max(diff, float((a.logits - b.logits).abs().max()))
            if diff > 1e-5:
                raise MlcError(f"the exported model differs from the masked one by {diff:.3g} (> 1e-5)", str(out_dir))
            summary["max_abs_diff"] = diff
            atomic_write_json(tmp / "mlc_prune.json", summary)
    return summary
