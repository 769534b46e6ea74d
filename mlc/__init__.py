"""mlc: compress a multilingual encoder into a small, fast monolingual model for one language."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed (`pip install .`, editable or not), setup.py maps the checkout's top-level kernels/, launcher/ and
# configs/ folders to mlc.kernels, mlc.launcher and mlc.configs. Run straight from a source checkout (the
# checkout on PYTHONPATH, nothing installed), the same names resolve to those folders through this path.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "__init__.py").is_file() and not (_Path(__file__).parent / "kernels").exists():
    __path__.append(str(_checkout))  # noqa: F821  (the package's own __path__)
