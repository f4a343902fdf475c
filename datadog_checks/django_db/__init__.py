"""The django_db check.

``DjangoDbCheck`` is loaded on first use, so that importing the records or the evaluation alone
loads no database driver. The Agent finds the class as it always does: by ``dir()`` of the package.
"""

from typing import TYPE_CHECKING, Any

from .__about__ import __version__

if TYPE_CHECKING:
    from .check import DjangoDbCheck

__all__ = ["DjangoDbCheck", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "DjangoDbCheck":
        from .check import DjangoDbCheck

        globals()[name] = DjangoDbCheck
        return DjangoDbCheck
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
