from .__about__ import __version__
from .check import DjangoDbCheck

__all__ = ["DjangoDbCheck", "__version__"]
