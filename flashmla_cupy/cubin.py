"""Reading an sm_90a cubin (an ELF64 image): its true length, and one kernel's resources.

The resources come from the image itself, not from ptxas's `-v` report in the NVRTC log: NVRTC 13.0
sometimes returns an empty log for a successful compile (docs/TOOLCHAIN.md), so
the log is diagnostic only. Where each number lives:
- registers: the EIATTR_REGCOUNT record of the global `.nv.info` section, keyed by the kernel's symbol;
- stack: EIATTR_FRAME_SIZE / EIATTR_MIN_STACK_SIZE, likewise (spilled registers live in that frame,
  so a zero frame means no spills);
- static shared memory: the size of `.nv.shared.<kernel>`, less the 1 KB that sm_90 reserves at the
  start of every CTA's window when the image declares that reserve.
No GPU or CUDA library is needed.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

_SHT_SYMTAB = 2
_SHT_NOBITS = 8            # .bss-like sections occupy no file bytes
_STT_FUNC = 2
_EIFMT_SVAL = 4            # record: format, attribute, u16 size, then `size` bytes
_EIFMT_HVAL = 3            # record: format, attribute, u16 value
_EIFMT_BVAL = 2            # record: format, attribute, u16 (one byte used)
_EIATTR_FRAME_SIZE = 0x11
_EIATTR_MIN_STACK_SIZE = 0x12
_EIATTR_REGCOUNT = 0x2F
_RESERVED_SMEM_SYMBOL = "__nv_reservedSMEM"
_RESERVED_SMEM_BYTES = 1024


class CubinError(ValueError):
    """The bytes are not a cubin we can read, or the kernel is not in it."""


@dataclass(frozen=True)
class KernelResources:
    registers: int
    stack_bytes: int
    smem_static: int


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


def complete(cubin: bytes) -> bytes:
    """Restore trailing NUL bytes that some cupy versions cut off the image, so that it loads.

    The true length of an ELF64 image is the furthest end of its section/program headers and of the
    file contents of its sections and segments; pad the bytes up to it.
    """
    _check_elf(cubin)
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(0x40, phoff + phentsize * phnum, shoff + shentsize * shnum)
    for i in range(shnum):
        sh_type = struct.unpack_from("<I", cubin, shoff + i * shentsize + 4)[0]
        offset, size = struct.unpack_from("<QQ", cubin, shoff + i * shentsize + 0x18)
        if sh_type != _SHT_NOBITS:
            end = max(end, offset + size)
    for i in range(phnum):
        offset = struct.unpack_from("<Q", cubin, phoff + i * phentsize + 0x08)[0]
        filesz = struct.unpack_from("<Q", cubin, phoff + i * phentsize + 0x20)[0]
        end = max(end, offset + filesz)
    return cubin + b"\0" * (end - len(cubin))


def kernel_resources(cubin: bytes, kernel: str) -> KernelResources:
    """Registers, stack frame and static shared memory of the entry function `kernel`.

    Raises CubinError when the image has no such function or no register count for it."""
    try:
        sections = _sections(cubin)
        symbols = _symbols(cubin, sections)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise CubinError(f"unreadable cubin ({exc})") from None
    index = next((i for i, (name, kind) in enumerate(symbols) if name == kernel and kind == _STT_FUNC), None)
    if index is None:
        raise CubinError(f"kernel {kernel} is not a function of the cubin")
    per_symbol = _symbol_attributes(cubin, sections, index)
    if _EIATTR_REGCOUNT not in per_symbol:
        raise CubinError(f"the cubin records no register count for {kernel}")
    shared = next((s for s in sections if s.name == f".nv.shared.{kernel}"), None)
    smem = shared.size if shared else 0
    if smem >= _RESERVED_SMEM_BYTES and any(name.startswith(_RESERVED_SMEM_SYMBOL) for name, _ in symbols):
        smem -= _RESERVED_SMEM_BYTES
    stack = max(per_symbol.get(_EIATTR_FRAME_SIZE, 0), per_symbol.get(_EIATTR_MIN_STACK_SIZE, 0))
    return KernelResources(registers=per_symbol[_EIATTR_REGCOUNT], stack_bytes=stack, smem_static=smem)


def _check_elf(cubin: bytes) -> None:
    if cubin[:5] != b"\x7fELF\x02":
        raise CubinError("not a 64-bit ELF image")


def _cstring(data: bytes, offset: int) -> str:
    return data[offset:data.index(b"\0", offset)].decode()


def _sections(cubin: bytes) -> list[_Section]:
    _check_elf(cubin)
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    raw = [struct.unpack_from("<IIQQQQII", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = raw[shstrndx][4]
    return [_Section(_cstring(cubin, names_at + name), kind, offset, size, link)
            for name, kind, _, _, offset, size, link, _ in raw]


def _symbols(cubin: bytes, sections: list[_Section]) -> list[tuple[str, int]]:
    """(name, type) of every symbol, by symbol index."""
    table = next(s for s in sections if s.type == _SHT_SYMTAB)
    names_at = sections[table.link].offset
    out = []
    for i in range(table.size // 24):
        name, info = struct.unpack_from("<IB", cubin, table.offset + i * 24)
        out.append((_cstring(cubin, names_at + name), info & 0xF))
    return out


def _symbol_attributes(cubin: bytes, sections: list[_Section], symbol: int) -> dict[int, int]:
    """Attributes of the global .nv.info section whose value is (symbol index, u32) for `symbol`."""
    found: dict[int, int] = {}
    for section in sections:
        if section.name != ".nv.info":
            continue
        pos, end = section.offset, section.offset + section.size
        while pos + 4 <= end:
            fmt, attr, value = struct.unpack_from("<BBH", cubin, pos)
            if fmt != _EIFMT_SVAL:
                pos += 4 if fmt in (_EIFMT_HVAL, _EIFMT_BVAL) else 2
                continue
            if value == 8:
                owner, number = struct.unpack_from("<II", cubin, pos + 4)
                if owner == symbol:
                    found[attr] = number
            pos += 4 + value
    return found
