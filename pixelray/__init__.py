"""pixelray: robustness of image classifiers to a few random pixel changes, on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pixelray")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
