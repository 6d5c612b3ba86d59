"""Every FLASHMLA_CUPY_* environment variable, its default and its meaning.

Values are read when a function below is called, never at import, so a process (or a test) can
change them after importing the package.
"""
from __future__ import annotations

import os
import pathlib

CACHE_DIR = "FLASHMLA_CUPY_CACHE_DIR"
NO_COMPILE = "FLASHMLA_CUPY_NO_COMPILE"
VERBOSE = "FLASHMLA_CUPY_VERBOSE"
CHECK = "FLASHMLA_CUPY_CHECK"

# name -> (default, meaning); `python -m flashmla_cupy info` and the README list these.
VARIABLES = {
    CACHE_DIR: (
        "$XDG_CACHE_HOME/flashmla_cupy, else ~/.cache/flashmla_cupy",
        "root of the compiled-kernel cache (entries live under v<version>/<arch>/)",
    ),
    NO_COMPILE: (
        "0",
        "set to 1, a kernel missing from the cache raises KernelCacheMissError instead of compiling "
        "(for serving: run `python -m flashmla_cupy warmup` at image build time)",
    ),
    VERBOSE: ("0", "set to 1, every kernel compile and cache event prints a line to stderr"),
    CHECK: (
        "0",
        "set to 1, flash_mla_with_kvcache calls without a check= argument run in checked mode: block "
        "tables, lengths and the plan are validated on the device first (one host synchronisation per "
        "call; read when a call's layout is first prepared)",
    ),
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> pathlib.Path:
    """The cache root: FLASHMLA_CUPY_CACHE_DIR, else the XDG cache home, else ~/.cache."""
    explicit = os.environ.get(CACHE_DIR)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "flashmla_cupy"


def no_compile() -> bool:
    """True when a cache miss must raise instead of compiling."""
    return _flag(NO_COMPILE)


def verbose() -> bool:
    """True when compile and cache events are printed to stderr."""
    return _flag(VERBOSE)


def check() -> bool:
    """True when calls without a check= argument are checked (read when a layout is prepared)."""
    return _flag(CHECK)
