"""README.md's "Use the result" section runs as written: its python blocks and its mlc commands, in order,
in a folder whose runs/demo/final is a tiny sentence-transformers model (so the README cannot drift)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mlc.cli import main
from sentence_helpers import tiny_sentence_folder

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "# not run by the tests"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def usage_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block under '## Use the result', in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Use the result\n")
    end = text.find("\n## ", start + 1)
    return _FENCE.findall(text[start:end if end != -1 else None])


def test_the_usage_section_has_what_it_promises():
    blocks = usage_blocks()
    code = "\n".join(c for _, c in blocks)
    for needle in ("AutoModel", "SentenceTransformer", 'prompt_name="query"', "mlc export onnx", "onnxruntime",
                   "upload_folder"):
        assert needle in code, needle
    for lang, c in blocks:
        if lang == "python":
            compile(c, "README.md", "exec")  # the block not run offline still parses


def test_the_usage_snippets_run(tmp_path, monkeypatch, one_torch_thread):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("onnxruntime")
    tiny_sentence_folder(tmp_path / "runs" / "demo" / "final", "xlmr")
    monkeypatch.chdir(tmp_path)
    ran = {"python": 0, "mlc": 0, "skipped": 0}
    for lang, code in usage_blocks():
        if lang == "python":
            if code.startswith(NOT_RUN):
                ran["skipped"] += 1
                continue
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
            ran["python"] += 1
        else:  # a shell block: each mlc command line runs through the CLI
            for line in code.splitlines():
                argv = shlex.split(line, comments=True)
                if argv and Path(argv[0]).name == "mlc":
                    assert main(argv[1:]) == 0, line
                    ran["mlc"] += 1
    assert ran == {"python": 3, "mlc": 1, "skipped": 1}
    assert (tmp_path / "runs" / "demo" / "final-onnx" / "model.int8.onnx").is_file()
