#!/usr/bin/env bash
# Coverage-guided fuzzing of one hvtrace-fuzz target with AFL++ through
# cargo-afl, on the stable toolchain: fuzz/afl.sh TARGET [SECONDS]
#
# Installs cargo-afl when it is missing (`cargo install cargo-afl` builds
# AFL++ from the sources bundled in the crate; nothing else is fetched),
# writes the target's seeds (the same seed functions as the mutation
# fuzzer) to a temporary directory, builds the AFL harness (feature `afl`,
# bin afl-harness) with `cargo afl build`, and runs `cargo afl fuzz` for
# SECONDS (default 60) with a per-input timeout of $AFL_TIMEOUT_MS (default
# 1000). Exits 1 if AFL++ saved a crash or a hang, printing where they are;
# the output directory is kept ($AFL_OUT, default a temporary directory).
# Not part of the test command: too slow for CI.
set -euo pipefail

target=${1:?usage: fuzz/afl.sh TARGET [SECONDS] (kallsyms btf paging tasks loader snapshot syscalls)}
seconds=${2:-60}
timeout_ms=${AFL_TIMEOUT_MS:-1000}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo afl --version >/dev/null 2>&1; then
    echo "afl.sh: installing cargo-afl (builds AFL++; takes a few minutes)" >&2
    cargo install cargo-afl
fi
# AFL++ itself is built by the install (per toolchain); build it if that
# did not happen (e.g. after a toolchain update). "Already built" is fine.
if ! config=$(cargo afl config --build 2>&1); then
    if ! grep -q "already built" <<<"$config"; then
        echo "$config" >&2
        exit 2
    fi
fi

target_dir=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-afl-$target.XXXXXX")
out=${AFL_OUT:-$work/out}
mkdir -p "$(dirname "$out")"
echo "afl.sh: seeds and output under $work" >&2

# Seeds and the kernel parts the harness needs, from the normal build.
cargo run --release -q -p hvtrace-fuzz --bin hvtrace-fuzz -- seeds "$target" "$work/seeds" >&2

# The instrumented harness, in a target directory of its own (its
# RUSTFLAGS differ, so sharing one would rebuild everything each time).
CARGO_TARGET_DIR="$target_dir/afl" cargo afl build --release -q -p hvtrace-fuzz \
    --features afl --bin afl-harness
harness="$target_dir/afl/release/afl-harness"

# No core-pattern or CPU-governor tuning on shared machines; no UI.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=1
status=0
cargo afl fuzz -i "$work/seeds" -o "$out" -t "$timeout_ms" -V "$seconds" \
    -- "$harness" "$target" "$work/kernel" >"$work/afl.log" 2>&1 || status=$?
stats="$out/default/fuzzer_stats"
if [ ! -f "$stats" ]; then
    tail -30 "$work/afl.log" >&2
    echo "afl.sh: afl-fuzz did not run (exit $status); log: $work/afl.log" >&2
    exit 2
fi
grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|corpus_found|saved_crashes|saved_hangs|bitmap_cvg|stability) ' "$stats"

found=0
for kind in crashes hangs; do
    files=$(find "$out/default/$kind" -type f ! -name README.txt 2>/dev/null | sort)
    if [ -n "$files" ]; then
        echo "afl.sh: $target: AFL++ saved $kind:" >&2
        echo "$files" >&2
        found=1
    fi
done
if [ "$found" = 1 ]; then
    echo "afl.sh: reproduce one with: $harness $target $work/kernel < FILE" >&2
    exit 1
fi
echo "afl.sh: $target: no crash or hang in ${seconds}s"
