"""spoa-mirror: an HAProxy SPOE agent that mirrors requests to shadow backends."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spoa-mirror")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
