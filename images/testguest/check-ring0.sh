#!/bin/sh
# Disassemble the test guest's ring-0 code (from _start to testguest_ring0_end) and fail if it touches SSE/AVX
# state or uses an instruction the nested-KVM ring-0 emulator is known to lack. Usage: check-ring0.sh ELF
set -eu
elf=${1:?usage: check-ring0.sh ELF}
start=$(nm "$elf" | awk '$3 == "_start" { print $1 }')
end=$(nm "$elf" | awk '$3 == "testguest_ring0_end" { print $1 }')
[ -n "$start" ] && [ -n "$end" ] || { echo "$elf: no _start/testguest_ring0_end symbols" >&2; exit 1; }
code=$(objdump -d -M intel --start-address="0x$start" --stop-address="0x$end" "$elf")
count=$(printf '%s\n' "$code" | grep -cE '^ +[0-9a-f]+:')
if printf '%s\n' "$code" | grep -Ei 'xmm|ymm|zmm|mxcsr|fxsave|fxrstor|xsave|xrstor|cmpxchg16b|int3|rep '; then
    echo "ring-0 code uses SSE or an instruction the ring-0 emulator lacks" >&2
    exit 1
fi
echo "ring-0 code 0x$start..0x$end: $count instructions, no SSE"
