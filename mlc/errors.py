"""The one error type users see: it names the key, file or line at fault; the CLI exits 2 on it."""
from __future__ import annotations


class MlcError(Exception):
    """A problem with the user's input (recipe, file, data), reported without a traceback.

    ``where`` names the key (``distill.step1.lr``), the file, or ``file:line`` at fault.
    """

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(MlcError):
    """The recipe is invalid; ``where`` is the recipe file and key."""


class DataError(MlcError):
    """A data file is malformed; ``where`` is ``file:line``."""
