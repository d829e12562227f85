"""What an ELF file needs and provides: its interpreter, NEEDED sonames, SONAME, RUNPATH.

The facts dynamic linking runs on, read with pyelftools from the program headers (the
interpreter) and the dynamic section (the rest). Files that are not ELF, or ELF without a
dynamic section (static programs, object files, archives), need nothing.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from portsd.core.linkage import ElfLinkage

__all__ = ["ElfLinkage", "is_elf", "read_linkage"]

MAGIC = b"\x7fELF"


def is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == MAGIC


def read_linkage(path: Path) -> ElfLinkage | None:
    """The linkage of ``path``, or None when it is not a (readable) ELF file."""
    with path.open("rb") as file:
        if file.read(4) != MAGIC:
            return None
        file.seek(0)
        try:
            elf = ELFFile(file)
            interpreter = None
            segment: Any
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interpreter = segment.get_interp_name()
            needed: list[str] = []
            soname = None
            runpath: list[str] = []
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                tag: Any  # pyelftools sets needed/soname/runpath/rpath per tag kind
                for tag in section.iter_tags():
                    kind = tag.entry.d_tag
                    if kind == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif kind == "DT_SONAME":
                        soname = tag.soname
                    elif kind == "DT_RUNPATH":
                        runpath += tag.runpath.split(":")
                    elif kind == "DT_RPATH":
                        runpath += tag.rpath.split(":")
            return ElfLinkage(
                machine=elf["e_machine"],
                elfclass=elf.elfclass,
                interpreter=interpreter,
                needed=tuple(needed),
                soname=soname,
                runpath=tuple(p for p in runpath if p),
            )
        except (ELFError, ValueError, KeyError, struct.error):
            return None
