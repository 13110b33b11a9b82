"""A tiny guest for the VM participant's tests, demos and benchmarks, built from source with
binutils (``as``, ``ld``): a multiboot v1 ELF that QEMU loads with ``-kernel``.  No downloaded
image.

It writes one word on every 4 KiB page of its RAM above 4 MiB (so the RAM is really in use and
its hash covers it all), then counts timer ticks (PIT, 100 Hz) in a known place of its RAM and
prints the count to the first serial port every 64 ticks.  Guest physical addresses below the
PCI hole are offsets into the RAM backend, so the host reads the counter straight from the RAM
memfd (``read_counter``) while no QEMU runs.  Between ticks it halts: an idle guest costs TCG
next to nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_ADDRESS = 0x300000  # "LUOGUEST", ticks (u64), end of RAM seen by the guest (u32)
MAGIC = b"LUOGUEST"
TICK_HZ = 100

SOURCE = r"""
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000002               # bit 1: ask for the memory map fields
        .set STATE, 0x300000
        .set TOUCH_FROM, 0x400000

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        cli
        movl $stack_top, %esp
        lgdt gdt_ptr
        ljmp $0x08, $1f
1:      movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movl $0x474f554c, STATE                 # "LUOG"
        movl $0x54534555, STATE+4               # "UEST"
        movl $0, STATE+8
        movl $0, STATE+12
        movl 8(%ebx), %ecx                      # mem_upper, KiB above 1 MiB
        shll $10, %ecx
        addl $0x100000, %ecx
        movl %ecx, STATE+16
        movl $TOUCH_FROM, %edi
2:      cmpl %ecx, %edi
        jae 3f
        movl %edi, %eax
        xorl $0x5a5a5a5a, %eax
        movl %eax, (%edi)
        addl $4096, %edi
        jmp 2b
3:      movl $idt, %edi                         # every vector: a plain iret
        movl $256, %ecx
        movl $ignore, %edx
4:      call set_gate
        addl $8, %edi
        loop 4b
        movl $idt+0x20*8, %edi                  # IRQ0 (the PIT) remapped to 0x20
        movl $timer, %edx
        call set_gate
        lidt idt_ptr
        movb $0x11, %al                         # remap the PICs to 0x20 and 0x28
        outb %al, $0x20
        outb %al, $0xA0
        movb $0x20, %al
        outb %al, $0x21
        movb $0x28, %al
        outb %al, $0xA1
        movb $0x04, %al
        outb %al, $0x21
        movb $0x02, %al
        outb %al, $0xA1
        movb $0x01, %al
        outb %al, $0x21
        outb %al, $0xA1
        movb $0xFE, %al                         # only IRQ0
        outb %al, $0x21
        movb $0xFF, %al
        outb %al, $0xA1
        movb $0x34, %al                         # PIT channel 0, rate generator, 100 Hz
        outb %al, $0x43
        movw $11932, %ax
        outb %al, $0x40
        movb %ah, %al
        outb %al, $0x40
        movl $hello, %esi
        call puts
        sti
main:
        hlt
        movl STATE+8, %eax
        testl $63, %eax
        jnz main
        cmpl %eax, last_printed
        je main
        movl %eax, last_printed
        movl $ticks, %esi
        call puts
        movl %eax, %edx
        movl $8, %ecx
5:      roll $4, %edx
        movl %edx, %eax
        andl $15, %eax
        movb hex(%eax), %al
        call putc
        loop 5b
        movb $10, %al
        call putc
        jmp main

set_gate:                                       # %edx handler -> the gate at (%edi)
        movl %edx, %eax
        andl $0xffff, %eax
        orl $0x00080000, %eax
        movl %eax, (%edi)
        movl %edx, %eax
        andl $0xffff0000, %eax
        orl $0x8e00, %eax
        movl %eax, 4(%edi)
        ret

timer:
        pushl %eax
        addl $1, STATE+8
        adcl $0, STATE+12
        movb $0x20, %al
        outb %al, $0x20
        popl %eax
ignore:
        iret

putc:                                           # %al to COM1, once it can take it
        pushl %edx
        pushl %eax
        movw $0x3fd, %dx
6:      inb %dx, %al
        testb $0x20, %al
        jz 6b
        popl %eax
        movw $0x3f8, %dx
        outb %al, %dx
        popl %edx
        ret

puts:                                           # the NUL-terminated string at %esi
        pushl %eax
7:      lodsb
        testb %al, %al
        jz 8f
        call putc
        jmp 7b
8:      popl %eax
        ret

        .data
        .align 8
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdt_ptr:
        .word 23
        .long gdt
idt_ptr:
        .word 256*8-1
        .long idt
last_printed:
        .long 0xffffffff
hex:    .ascii "0123456789abcdef"
hello:  .asciz "luo-guest: started\n"
ticks:  .asciz "luo-guest: ticks 0x"

        .bss
        .align 16
idt:    .space 2048
        .space 4096
stack_top:
"""

LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS {
  . = 0x100000;
  .text : { *(.multiboot) *(.text) }
  .data : { *(.data) }
  .bss : { *(.bss) *(COMMON) }
}
"""


class GuestBuildError(RuntimeError):
    """binutils are missing or failed."""


def build_guest(directory: Path) -> Path:
    """Assemble and link the guest into ``directory`` (reused when the source is unchanged)."""
    digest = hashlib.sha256((SOURCE + LINKER_SCRIPT).encode()).hexdigest()[:12]
    elf = directory / f"luo-guest-{digest}.elf"
    if elf.exists():
        return elf
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found: install binutils")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        work = Path(tmp)
        (work / "guest.s").write_text(SOURCE)
        (work / "guest.ld").write_text(LINKER_SCRIPT)
        steps = (
            ["as", "--32", "-o", "guest.o", "guest.s"],
            ["ld", "-m", "elf_i386", "-z", "max-page-size=0x1000", "--build-id=none",
             "-T", "guest.ld", "-o", "guest.elf", "guest.o"],
        )  # fmt: skip
        for argv in steps:
            proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise GuestBuildError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
        os.replace(work / "guest.elf", elf)
    return elf


@dataclass(frozen=True)
class Counter:
    ticks: int
    ram_end: int


def read_counter(ram_fd: int) -> Counter:
    """The guest's tick counter, read from its RAM memfd (no QEMU needed)."""
    raw = os.pread(ram_fd, 20, STATE_ADDRESS)
    if raw[:8] != MAGIC:
        raise ValueError("no luo guest in this RAM (magic missing)")
    ticks, ram_end = struct.unpack_from("<QI", raw, 8)
    return Counter(ticks, ram_end)


def ram_sha256(ram_fd: int) -> str:
    """sha256 of the whole RAM memfd, read without moving its file position."""
    digest = hashlib.sha256()
    size, offset, chunk = os.fstat(ram_fd).st_size, 0, 8 << 20
    while offset < size:
        data = os.pread(ram_fd, min(chunk, size - offset), offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m luo_agent.vmm.guest DIRECTORY  (prints the guest's path)")
        return 2
    print(build_guest(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
