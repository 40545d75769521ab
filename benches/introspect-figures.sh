#!/usr/bin/env bash
# Prints guest-introspect's figures, measured side by side in one run:
#  - symbol recovery from each Debian vmlinuz: `hvtrace symbols` (host-side
#    decompression + kallsyms decoding) against vmlinux-to-elf's
#    kallsyms-finder and vmlinux-to-elf (full ELF output) on the same input;
#    kallsyms-finder cannot unpack Debian's 6.1 vmlinuz itself, so for 6.1
#    both tools also get the payload the kernel's extract-vmlinux unpacks;
#  - BTF: `hvtrace types` (decompression + BTF parse) per kernel;
#  - `hvtrace ps` against a guest with N threads (default 1000): first call
#    (loads the kernel's symbols and BTF) and repeated calls (cached).
# hvtrace is given the kernel files by path (a --kernel name would add the
# apt check of kernel-config/debian.sh to its time).
# Usage: benches/introspect-figures.sh [threads]   (threads 0: skip ps)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=$root/target/release/hvtrace
tools=$(scripts/python-tools.sh)
threads=${1:-1000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Best of 3 wall-clock runs, in ms.
best_ms() {
    local best=
    for _ in 1 2 3; do
        local t0 t1; t0=$(date +%s%N)
        "$@" >/dev/null 2>&1 || { echo "FAILED: $*" >&2; return 1; }
        t1=$(date +%s%N)
        local ms=$(( (t1 - t0) / 1000000 ))
        if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
    done
    echo "$best"
}

# vmlinux-to-elf exits 0 even when it gives up: success means an output file.
v2e() { rm -f "$2"; "$tools/vmlinux-to-elf" "$1" "$2" && [ -s "$2" ]; }

tar -C "$tmp" -xf /usr/src/linux-source-6.1.tar.xz linux-source-6.1/scripts/extract-vmlinux
printf '%-12s %-10s %16s %20s %18s %10s %14s\n' kernel input hvtrace_symbols_ms kallsyms_finder_ms vmlinux_to_elf_ms ratio hvtrace_btf_ms
for k in debian-6.1 debian-6.12; do
    z=$(kernel-config/debian.sh "${k#debian-}" 2>/dev/null)
    sh "$tmp/linux-source-6.1/scripts/extract-vmlinux" "$z" > "$tmp/$k.elf"
    ours=$(best_ms "$hv" symbols --kernel "$z")
    btf=$(best_ms "$hv" types --kernel "$z" task_struct pid)
    for input in vmlinuz elf; do
        f=$z; [ $input = elf ] && f=$tmp/$k.elf
        ours_in=$ours; [ $input = elf ] && ours_in=$(best_ms "$hv" symbols --kernel "$f")
        kf=$(best_ms "$tools/kallsyms-finder" "$f" || echo fail)
        v2e=$(best_ms v2e "$f" "$tmp/out.elf" || echo fail)
        ratio=-
        [ "$kf" != fail ] && ratio=$(awk -v a="$kf" -v b="$ours_in" 'BEGIN{printf "%.1fx", a/b}')
        printf '%-12s %-10s %16s %20s %18s %10s %14s\n' "$k" "$input" "$ours_in" "$kf" "$v2e" "$ratio" "$btf"
    done
done

[ "$threads" -gt 0 ] || exit 0
echo
echo "hvtrace ps on the minimal kernel's guest with hv-procs 2 $threads:"
sock=$tmp/vm.sock
"$hv" run --api-sock "$sock" -- hv-procs 2 "$threads" > "$tmp/procs.out" 2>"$tmp/procs.err" &
run_pid=$!
until grep -q "hv-procs: ready" "$tmp/procs.out" 2>/dev/null; do
    kill -0 $run_pid 2>/dev/null || { cat "$tmp/procs.err" >&2; exit 1; }
    sleep 0.5
done
t0=$(date +%s%N); "$hv" ps --api-sock "$sock" > "$tmp/ps.txt"; t1=$(date +%s%N)
first=$(( (t1 - t0) / 1000000 ))
again=$(best_ms "$hv" ps --api-sock "$sock")
"$hv" snapshot --api-sock "$sock" -o "$tmp/g.snap" 2>/dev/null
offline=$(best_ms "$hv" ps --snapshot "$tmp/g.snap")
printf '  tasks listed: %s\n  first ps (loads symbols+BTF): %s ms\n  ps again: %s ms\n  ps --snapshot (from guest memory alone): %s ms\n' \
    "$(( $(wc -l < "$tmp/ps.txt") - 1 ))" "$first" "$again" "$offline"
echo '{"v":1,"op":"shutdown"}' | python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.read().encode()); s.recv(100)" "$sock"
wait $run_pid || true
