"""The persistent on-disk cubin cache: `get_or_compile(variant) -> CompiledKernel`.

Layout: <root>/v<package version>/<arch>/<variant>-<key16>.cubin, and next to it a .json manifest
(size and sha256 of the cubin, the kernel's registers, stack, static smem and spills, the compile log). The key hashes
everything that changes the binary, by content: every file under kernels_src, the program source with
its layout asserts, the options with include directories named by role (no absolute path), the NVRTC
and header versions and the package version. So a cache filled by a source checkout, an installed
wheel or another virtual environment with the same versions serves all of them.

Process safety without locks: every file is written to a temp file in the same directory and moved into
place with os.replace, the manifest last, so a reader sees either no entry or a whole one. An entry whose
manifest is missing, unreadable or disagrees with its cubin is a miss and is rebuilt, never an error;
that also covers a crash between the two renames. Processes racing on one key write identical bytes.
No GPU is needed anywhere in this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
import warnings

from . import compiler, env, errors
from .compiler import REPORT_FIELDS, CompiledKernel
from .variants import Variant

MANIFEST_FORMAT = 1
# Suffixes of every file this module creates; clear() deletes these and nothing else.
_OWN_SUFFIXES = (".cubin", ".json", ".tmp")

# In-process memo: after the first call per variant, get_or_compile touches no file.
_memory: dict[Variant, CompiledKernel] = {}
# Serialises misses within a process: NVRTC gains nothing from threads and a double compile is waste.
_lock = threading.Lock()
_warned_unwritable = False


def package_version() -> str:
    from . import __version__

    return __version__


def cache_dir() -> pathlib.Path:
    """Where this package version's cubins for this arch live (it may not exist yet)."""
    return env.cache_root() / f"v{package_version()}" / compiler.ARCH


def cache_key(variant: Variant) -> str:
    """sha256 over everything that can change the compiled binary of `variant`."""
    digest = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        # Length-prefixed fields, so that no two different inputs hash the same byte stream.
        digest.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    kernels = compiler.kernels_dir()
    for path in sorted(p for p in kernels.rglob("*") if p.is_file()):
        put("file:" + path.relative_to(kernels).as_posix(), path.read_bytes())
    put("source", compiler.program_source(variant).encode())
    put("options", "\0".join(compiler.key_options(variant)).encode())
    put("nvrtc", compiler.nvrtc_version().encode())
    for name, version in sorted(compiler.header_versions().items()):
        put(f"headers:{name}", version.encode())
    put("package", package_version().encode())
    put("arch", compiler.ARCH.encode())
    return digest.hexdigest()


def _entry_paths(variant: Variant, key: str) -> tuple[pathlib.Path, pathlib.Path]:
    stem = cache_dir() / f"{variant.name}-{key[:16]}"
    return stem.with_name(stem.name + ".cubin"), stem.with_name(stem.name + ".json")


def _say(message: str) -> None:
    if env.verbose():
        print(f"flashmla_cupy: {message}", file=sys.stderr, flush=True)


def _read_entry(variant: Variant, key: str) -> CompiledKernel | None:
    """The cached kernel, or None when the entry is absent or damaged in any way."""
    cubin_path, manifest_path = _entry_paths(variant, key)
    try:
        manifest = json.loads(manifest_path.read_text())
        cubin = cubin_path.read_bytes()
        if (
            manifest["format"] != MANIFEST_FORMAT
            or manifest["key"] != key
            or manifest["cubin_size"] != len(cubin)
            or manifest["cubin_sha256"] != hashlib.sha256(cubin).hexdigest()
        ):
            _say(f"cache entry {manifest_path.name} does not match its cubin: rebuilding")
            return None
        report = {field: _count(manifest["report"][field]) for field in REPORT_FIELDS}
        return CompiledKernel(variant, cubin, str(manifest["log"]), **report)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _say(f"cache entry {manifest_path.name} is unreadable ({type(exc).__name__}): rebuilding")
        return None


def _count(value) -> int | None:
    """A report number from a manifest: an int, or None where the compile could not tell (spills)."""
    return None if value is None else int(value)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a cache warmed by one user is read by others.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_entry(kernel: CompiledKernel, key: str, seconds: float) -> str | None:
    """Store a compiled kernel. An unwritable cache only costs a warning here (the memo still holds the
    kernel); returns why the entry could not be written, None when it was."""
    global _warned_unwritable
    cubin_path, manifest_path = _entry_paths(kernel.variant, key)
    manifest = {
        "format": MANIFEST_FORMAT,
        "variant": kernel.variant.name,
        "key": key,
        "cubin_size": len(kernel.cubin),
        "cubin_sha256": hashlib.sha256(kernel.cubin).hexdigest(),
        "report": {field: getattr(kernel, field) for field in REPORT_FIELDS},
        "compile_seconds": round(seconds, 3),
        "options": compiler.compile_options(kernel.variant),
        "nvrtc": compiler.nvrtc_version(),
        "headers": compiler.header_versions(),
        "log": kernel.log,
    }
    try:
        cubin_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cubin_path, kernel.cubin)
        _atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())  # last: commits the entry
    except OSError as exc:
        if not _warned_unwritable:
            _warned_unwritable = True
            warnings.warn(
                f"flashmla_cupy: cannot write the kernel cache in {cubin_path.parent} ({exc}); compiled "
                f"kernels are kept in memory for this process only. Point {env.CACHE_DIR} at a "
                "writable directory to keep them.",
                stacklevel=3,
            )
        return str(exc)
    _say(f"cached {kernel.variant.name} in {cubin_path}")
    return None


def unwritable_reason() -> str | None:
    """Why no entry can be written to the cache directory (it cannot be created, is read-only, a file
    is in the way...), or None when a file can be created there."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return str(exc)
    return None


def _other_builds(variant: Variant) -> str:
    """What the cache holds of `variant` under other keys, and how those builds differ from ours."""
    manifests = sorted(cache_dir().glob(f"{variant.name}-*.json"))
    if not manifests:
        return "the cache holds no build of it"
    ours = {"nvrtc": compiler.nvrtc_version(), **compiler.header_versions()}
    differences = set()
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            theirs = {"nvrtc": manifest["nvrtc"], **manifest["headers"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        differences |= {f"{name} {theirs.get(name)} (here {version})"
                        for name, version in ours.items() if theirs.get(name) != version}
    what = "; ".join(sorted(differences)) or "the same versions, so other kernel sources or options"
    return f"it holds {len(manifests)} other build{'s' if len(manifests) != 1 else ''} of it, made with {what}"


def load(variant: Variant) -> CompiledKernel | None:
    """The kernel from the in-process memo or the disk cache, or None; never compiles."""
    kernel = _memory.get(variant)
    if kernel is None:
        kernel = _read_entry(variant, cache_key(variant))
        if kernel is not None:
            _memory[variant] = kernel
    return kernel


def get_or_compile(variant: Variant) -> CompiledKernel:
    """The compiled kernel of `variant`: from memory, else from disk, else compiled and stored.

    With FLASHMLA_CUPY_NO_COMPILE=1 a miss raises errors.KernelCacheMissError instead of compiling.
    """
    kernel = _memory.get(variant)
    if kernel is not None:
        return kernel
    return _fill(variant, may_compile=not env.no_compile())[0]


def _fill(variant: Variant, may_compile: bool) -> tuple[CompiledKernel, float | None, str | None]:
    """A miss of the memo: the kernel from disk, else compiled (when allowed) and stored. Also returns
    the seconds its compile took and why it could not be stored (both None when it came from memory
    or disk)."""
    with _lock:
        if variant in _memory:  # another thread filled it while we waited
            return _memory[variant], None, None
        key = cache_key(variant)
        kernel = _read_entry(variant, key)
        if kernel is not None:
            _say(f"loaded {variant.name} from the cache (key {key[:16]})")
            _memory[variant] = kernel
            return kernel, None, None
        if not may_compile:
            raise errors.KernelCacheMissError(
                f"kernel variant {variant.name!r} is not in the cache at {cache_dir()} and "
                f"{env.NO_COMPILE}=1 forbids compiling it; {_other_builds(variant)}. Fill the cache "
                f"ahead of time with `python -m flashmla_cupy warmup` (it needs no GPU) using the same "
                f"{env.CACHE_DIR}, package version, NVRTC and header versions as this process."
            )
        _say(f"compiling {variant.name} (cache miss, key {key[:16]})")
        start = time.perf_counter()
        kernel = compiler.compile_variant(variant)
        seconds = time.perf_counter() - start
        _say(f"compiled {variant.name} in {seconds:.1f} s: {kernel.registers} registers")
        unsaved = _write_entry(kernel, key, seconds)
        _memory[variant] = kernel
        return kernel, seconds, unsaved


def warm(variant: Variant) -> dict:
    """Bring one variant into the cache; the worker of `python -m flashmla_cupy warmup`. Warm-up
    exists to compile, so FLASHMLA_CUPY_NO_COMPILE (a serving switch) does not apply here.

    Returns plain data: {"name", "seconds" (None when it was cached already), "unsaved" (why the
    compiled kernel could not be stored, else None), the report fields} or {"name", "error"}, because
    it crosses a process boundary and CompileError does not pickle.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the caller reports an unsaved kernel itself
            kernel, seconds, unsaved = _fill(variant, may_compile=True)
    except Exception as exc:  # reported by the caller; the other variants still compile
        return {"name": variant.name, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": variant.name, "seconds": seconds, "unsaved": unsaved,
            **{f: getattr(kernel, f) for f in REPORT_FIELDS}}


def _own_files(root: pathlib.Path):
    """Files this module created under root (v<version>/<arch>/*), and nothing else."""
    for path in root.glob("v*/*/*"):
        if path.is_file() and path.name.endswith(_OWN_SUFFIXES):
            yield path


def cache_size_bytes() -> int:
    """Bytes used by the cache, over every package version and arch."""
    total = 0
    for path in _own_files(env.cache_root()):
        try:
            total += path.stat().st_size
        except OSError:  # removed by a concurrent clear or rewrite
            pass
    return total


def clear() -> int:
    """Delete every cached kernel (all package versions and arches) and the memo; returns files removed.

    Only files of the cache layout are deleted, so a cache dir pointed at a shared folder is safe.
    Raises errors.CacheError, after trying every file, when some could not be removed.
    """
    root = env.cache_root()
    removed, failed = 0, []
    for path in list(_own_files(root)):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed.append(exc)
    for directory in sorted(root.glob("v*/*"), reverse=True) + sorted(root.glob("v*")):
        try:
            directory.rmdir()  # only succeeds when empty, i.e. nothing foreign was inside
        except OSError:
            pass
    _memory.clear()
    if failed:
        raise errors.CacheError(
            f"could not remove {len(failed)} of {removed + len(failed)} cache files under {root} "
            f"(first: {failed[0].strerror or failed[0]}); removed {removed}")
    return removed
