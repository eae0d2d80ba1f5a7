#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris, libFuzzer) of the Python worker's decoders of client data.
#
#   python/fuzz/run.sh [TARGET] [SECONDS]    TARGET: codec, tensors or all (default), SECONDS: 30
#
# Per target: replays the committed seeds (corpus/TARGET) and crash regressions (regressions/TARGET)
# once each, then fuzzes for SECONDS on a scratch copy of the seeds, so that CI never grows the
# committed corpus. Exits non-zero if any input crashes a target; crash inputs are kept in
# .build/fuzz-artifacts/TARGET/ (add one to regressions/TARGET/ once fixed).
set -euo pipefail
fuzz="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$fuzz/../.." && pwd)"

# The interpreter the workers run on (Debian's), not whatever python3 is first on PATH.
venv="$root/.build/fuzz-venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r "$root/python/runtime-requirements.txt" atheris numpy protobuf

targets=(codec tensors)
if [ -n "${1:-}" ] && [ "$1" != all ]; then targets=("$1"); fi
seconds="${2:-30}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

failed=()
summary=()
for target in "${targets[@]}"; do
  script="$fuzz/fuzz_$target.py"
  [ -f "$script" ] || { echo "no such target: $target (have: codec, tensors)" >&2; exit 2; }
  artifacts="$root/.build/fuzz-artifacts/$target/"
  mkdir -p "$artifacts"

  # Replay: file arguments make libFuzzer run each input once, without fuzzing or writing anything.
  inputs=()
  for dir in "$fuzz/corpus/$target" "$fuzz/regressions/$target"; do
    if [ -d "$dir" ]; then
      while IFS= read -r -d '' file; do inputs+=("$file"); done < <(find "$dir" -type f -print0 | sort -z)
    fi
  done
  echo "== $target: replaying ${#inputs[@]} committed inputs"
  if ! "$venv/bin/python" "$script" -artifact_prefix="$artifacts" "${inputs[@]}" >"$scratch/$target-replay.log" 2>&1; then
    cat "$scratch/$target-replay.log"
    failed+=("$target (replay)")
  fi

  # Fuzz: on a copy, so new coverage stays in the scratch directory. -timeout catches hangs,
  # -rss_limit_mb memory taken in proportion to a claimed size rather than to the data.
  echo "== $target: fuzzing for ${seconds}s"
  cp -r "$fuzz/corpus/$target" "$scratch/$target-corpus"
  log="$scratch/$target-fuzz.log"
  # A crash in native code can leave the fuzzer deadlocked in its own handler (malloc's lock held):
  # killed past three times its time, it fails instead of holding CI.
  if ! timeout -s KILL $((seconds * 3 + 60)) "$venv/bin/python" "$script" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 -artifact_prefix="$artifacts" "$scratch/$target-corpus" >"$log" 2>&1; then
    grep -v '^#' "$log" | tail -n 60
    failed+=("$target (fuzzing)")
  fi
  # libFuzzer's last line of a completed run: "Done 123456 runs in 30 second(s)".
  done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)"
  if [ -n "$done_line" ]; then
    read -r _ runs _ _ secs _ <<<"$done_line"
    grown="$(find "$scratch/$target-corpus" -type f | wc -l)"
    summary+=("$target: $runs executions in $secs s (replayed ${#inputs[@]} committed inputs; scratch corpus grew to $grown)")
  else
    summary+=("$target: stopped early (see above)")
  fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}; crash inputs in $root/.build/fuzz-artifacts/" >&2
  exit 1
fi
