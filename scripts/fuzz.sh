#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder of outside data (libFuzzer + address sanitizer).
#
#   scripts/fuzz.sh [TARGET|all|swift|python] [SECONDS]     # default: all, 30 s per target
#   scripts/fuzz.sh --list
#
# Swift targets (Fuzz/Sources/SidecarFuzz/FuzzTargets.swift, one binary, SIDECAR_FUZZ_TARGET picks
# the decoder) are built into .build-fuzz with `--sanitize=fuzzer --sanitize=address`. For each:
#   1. replay: every input of the committed corpus (Fuzz/corpus/TARGET) and every past crash
#      (Fuzz/regressions/TARGET) runs once; any crash fails the run;
#   2. fuzz for SECONDS, starting from a scratch copy of the corpus (the committed corpus is never
#      grown by a run: new inputs stay in .build-fuzz/corpus/TARGET).
# A crash leaves its input in .build-fuzz/artifacts/; copy it to Fuzz/regressions/TARGET/ with the
# fix, and add a test that names the case. The Python worker's decoders are fuzzed with atheris by
# python/fuzz/run.sh (targets `python` or `all`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

targets_swift=(oip-http headers kserve-v1 grpc-infer bytes worker-result bundle-tar model-config server-config admin-body job-records)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${targets_swift[@]}" python
  exit 0
fi
which="${1:-all}"
seconds="${2:-30}"

run_python=no
selected=()
case "$which" in
  all) selected=("${targets_swift[@]}"); run_python=yes ;;
  swift) selected=("${targets_swift[@]}") ;;
  python) run_python=yes ;;
  *)
    if [[ " ${targets_swift[*]} " == *" $which "* ]]; then selected=("$which")
    else echo "unknown fuzz target '$which'; one of: ${targets_swift[*]} python (or all, swift)" >&2; exit 2; fi ;;
esac

failed=()
summary=()

if [ ${#selected[@]} -gt 0 ]; then
  scratch="$root/.build-fuzz"
  echo "== building the fuzz targets (debug, -sanitize=fuzzer,address) into $scratch"
  # swiftc keeps only the last -sanitize= flag, so SwiftPM's two (`--sanitize=fuzzer --sanitize=address`) would
  # leave Swift code without coverage; the combined -Xswiftc flag comes last and gives both.
  SIDECAR_FUZZ=1 swift build --scratch-path "$scratch" --sanitize=fuzzer --sanitize=address -Xswiftc -sanitize=fuzzer,address --product SidecarFuzz 2>&1 \
    | grep -Ev '^\[[0-9]+/[0-9]+\]|unhandled; explicitly declare|CMakeLists.txt$|Cannot export local symbol' || true
  binary="$scratch/debug/SidecarFuzz"
  [ -x "$binary" ] || { echo "the fuzz build did not produce $binary" >&2; exit 1; }
  mkdir -p "$scratch/artifacts"
  # ASan: a leak in a decoder is a finding too, but Swift's runtime keeps caches alive for the
  # process's life, which LeakSanitizer would report on every run.
  export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
  # Swift's own crash handler would read the crashed process's memory under ASan (and be reported
  # as the finding); libFuzzer prints the trace.
  export SWIFT_BACKTRACE="enable=no"

  for target in "${selected[@]}"; do
    corpus="Fuzz/corpus/$target"
    regressions="Fuzz/regressions/$target"
    work="$scratch/corpus/$target"
    mkdir -p "$work"
    [ -d "$corpus" ] && cp -n "$corpus"/* "$work"/ 2>/dev/null || true
    log="$scratch/$target.log"

    echo "== $target: replay"
    replay=()
    [ -d "$corpus" ] && replay+=("$corpus"/*)
    [ -d "$regressions" ] && replay+=("$regressions"/*)
    if [ ${#replay[@]} -gt 0 ]; then
      if ! SIDECAR_FUZZ_TARGET="$target" "$binary" -runs=1 "${replay[@]}" >"$log.replay" 2>&1; then
        tail -30 "$log.replay"
        failed+=("$target (replay)")
        continue
      fi
      echo "   ${#replay[@]} inputs replayed, no crash"
    fi

    echo "== $target: fuzzing for ${seconds} s"
    status=0
    SIDECAR_FUZZ_TARGET="$target" "$binary" "$work" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$scratch/artifacts/$target-" >"$log" 2>&1 || status=$?
    runs=$(grep -Eo 'stat::number_of_executed_units: [0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    took=$(echo "$done_line" | grep -Eo 'in [0-9]+ second' | grep -Eo '[0-9]+' || echo "$seconds")
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+' || echo "?")
    corpus_size=$(ls "$work" | wc -l)
    if [ "$status" -ne 0 ]; then
      grep -E 'ERROR|Fatal error|fuzz invariant|SUMMARY|artifact' "$log" | head -20 || tail -30 "$log"
      failed+=("$target")
      summary+=("$(printf '%-14s %10s %6s s %7s %7s  CRASH (see %s)' "$target" "$runs" "$took" "$cov" "$corpus_size" "$log")")
    else
      summary+=("$(printf '%-14s %10s %6s s %7s %7s  ok' "$target" "$runs" "$took" "$cov" "$corpus_size")")
    fi
  done
fi

if [ "$run_python" = yes ]; then
  echo "== python worker decoders (atheris)"
  if [ -x python/fuzz/run.sh ]; then
    python/fuzz/run.sh all "$seconds" || failed+=("python")
  else
    echo "python/fuzz/run.sh is missing" >&2
    failed+=("python (missing)")
  fi
fi

if [ ${#summary[@]} -gt 0 ]; then
  echo
  printf '%-14s %10s %8s %7s %7s  %s\n' target executions time cov corpus result
  printf '%s\n' "${summary[@]}"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FUZZ FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no crash"
