"""The package's exception classes and their messages."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One broken input rule: which argument, what was seen, what was expected, how to fix it."""

    argument: str      # e.g. "q.dtype", "k_cache.strides", "softmax_scale"
    seen: str
    expected: str
    fix: str

    def __str__(self) -> str:
        return f"{self.argument}: got {self.seen}, expected {self.expected}. Fix: {self.fix}"


class InvalidInputError(ValueError, TypeError):
    """The arguments of a call break one or more rules; `violations` lists every one of them.

    It is both a ValueError and a TypeError, so callers that catch either (as they would for a
    torch or FlashMLA argument error) also catch this one.
    """

    def __init__(self, function: str, violations: list[Violation]):
        self.function = function
        self.violations = tuple(violations)
        count = len(self.violations)
        lines = [f"{function}: {count} invalid input{'s' if count != 1 else ''}:"]
        lines += [f"  - {v}" for v in self.violations]
        super().__init__("\n".join(lines))


class UnsupportedDeviceError(RuntimeError):
    """The GPU cannot run these kernels (they are built for sm_90a, i.e. Hopper)."""


class CudaUnavailableError(UnsupportedDeviceError):
    """No GPU can be reached: no NVIDIA driver, a driver older than the installed CUDA wheels, or no
    visible device. The message says which, in one line, with the fix."""


class MissingDependencyError(ImportError):
    """A part of the installation is missing (no CUDA extra, NVRTC, headers); the message names the
    package to install."""


class KernelCacheMissError(RuntimeError):
    """A kernel is not in the on-disk cache and FLASHMLA_CUPY_NO_COMPILE forbids compiling it.

    Run `python -m flashmla_cupy warmup` (it needs no GPU) to fill the cache ahead of time.
    """


class CacheError(OSError):
    """The kernel cache directory could not be changed as asked (read-only, or not a directory)."""


# NVRTC's closing summary ("2 errors detected in the compilation of ...") names no cause.
_SUMMARY = re.compile(r"\d+ errors? detected", re.IGNORECASE)
_ERROR = re.compile(r"\berror\b", re.IGNORECASE)


def first_error_line(log: str) -> str:
    """The first line of a compiler log that reports an error, else its first non-empty line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if _ERROR.search(line) and not _SUMMARY.search(line):
            return line
    return lines[0] if lines else "(empty compiler log)"


class CompileError(RuntimeError):
    """NVRTC failed to compile a kernel variant; the full log is kept in `log`."""

    def __init__(self, variant_name: str, flags: list[str], log: str):
        self.variant_name = variant_name
        self.flags = list(flags)
        self.log = log
        self.first_error = first_error_line(log)
        super().__init__(
            f"NVRTC could not compile kernel variant {variant_name!r}\n"
            f"  first error: {self.first_error}\n"
            f"  flags: {' '.join(self.flags)}\n"
            "  (the full compiler log is in this exception's .log attribute)"
        )
