#!/usr/bin/env bash
# Prints single-step and block-step rates, measured side by side in one run
# on the same program (images/programs/hv-step-loop.S, 100 * argc
# iterations of a 3-instruction loop):
#  - hvtrace trace --steps (and --blocks): the thread steps through the
#    guest's own trap flag, each step reported to the host;
#  - hv-stepcount in the guest: the guest kernel's own PTRACE_SINGLESTEP
#    (and PTRACE_SINGLEBLOCK, which steps single instructions here: no BTF),
#    two context switches per step inside the guest.
# Each rate is the difference between a long and a short run over the
# difference of their wall times, so restoring the snapshot, the tracer's
# set-up and the program's start cancel out.
# Usage: benches/step-figures.sh [kernel] [long-argc]   (default: minimal 10;
# the guest's ptrace stepping runs ~50 steps a second here, so keep it small)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=target/release/hvtrace
kernel=${1:-minimal}
long=${2:-10}
prog=/usr/bin/hv-step-loop
args_of() { local n=$1; local a=(); for _ in $(seq 2 "$n"); do a+=(x); done; echo "${a[@]}"; }
short_args=$(args_of 1)
long_args=$(args_of "$long")

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# hvtrace: prints "ms instructions blocks"
hv_run() { # extra-flags args...
    local extra=$1; shift
    local t0 t1 out
    t0=$(now_ms)
    # shellcheck disable=SC2086
    out=$($hv trace --kernel "$kernel" --steps $extra --summary --quiet-steps -o /dev/stdout -- "$prog" "$@" 2>/dev/null)
    t1=$(now_ms)
    echo "$((t1 - t0)) $(echo "$out" | sed -n 's/^--- steps: \([0-9]*\) instructions, \([0-9]*\) blocks.*/\1 \2/p')"
}

# in-guest ptrace: prints "ms stops"
pt_run() { # step|block args...
    local mode=$1; shift
    local t0 t1 out
    t0=$(now_ms)
    out=$($hv run --kernel "$kernel" -- hv-stepcount "$mode" "$prog" "$@" 2>/dev/null)
    t1=$(now_ms)
    echo "$((t1 - t0)) $(echo "$out" | sed -n 's/^stops \([0-9]*\).*/\1/p')"
}

rate() { # ms_long n_long ms_short n_short
    echo "($2 - $4) / (($1 - $3) / 1000)" | bc -l
}

# shellcheck disable=SC2086
{
    read -r hs_ms hs_n _ < <(hv_run "" $short_args)
    read -r hl_ms hl_n _ < <(hv_run "" $long_args)
    read -r bs_ms _ bs_b < <(hv_run --blocks $short_args)
    read -r bl_ms _ bl_b < <(hv_run --blocks $long_args)
    read -r ps_ms ps_n < <(pt_run step $short_args)
    read -r pl_ms pl_n < <(pt_run step $long_args)
    read -r qs_ms qs_n < <(pt_run block $short_args)
    read -r ql_ms ql_n < <(pt_run block $long_args)
}
hv_steps=$(rate "$hl_ms" "$hl_n" "$hs_ms" "$hs_n")
hv_blocks=$(rate "$bl_ms" "$bl_b" "$bs_ms" "$bs_b")
pt_steps=$(rate "$pl_ms" "$pl_n" "$ps_ms" "$ps_n")
pt_blocks=$(rate "$ql_ms" "$ql_n" "$qs_ms" "$qs_n")
printf 'kernel %s, hv-step-loop: %s and %s instructions\n' "$kernel" "$hs_n" "$hl_n"
printf '%-34s %14s\n' what per_second
printf '%-34s %14.0f\n' "hvtrace --steps (instructions)" "$hv_steps"
printf '%-34s %14.0f\n' "guest PTRACE_SINGLESTEP (stops)" "$pt_steps"
printf '%-34s %14.2f\n' "ratio hvtrace/ptrace" "$(echo "$hv_steps / $pt_steps" | bc -l)"
printf '%-34s %14.0f\n' "hvtrace --blocks (blocks)" "$hv_blocks"
printf '%-34s %14.0f\n' "guest PTRACE_SINGLEBLOCK (stops)" "$pt_blocks"
printf '%-34s %14.2f\n' "ratio hvtrace/ptrace (blocks)" "$(echo "$hv_blocks / $pt_blocks" | bc -l)"
