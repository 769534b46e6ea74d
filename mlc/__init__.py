"""mlc: compress a multilingual encoder into a small, fast monolingual model for one language."""

__version__ = "0.1.0"
