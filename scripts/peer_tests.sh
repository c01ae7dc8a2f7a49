#!/usr/bin/env bash
# Run the reference library's own test suite (dattri, tag v0.3.0) against tdabench.
#
# Usage:
#   scripts/peer_tests.sh PATH [--tag TAG] [--timeout SECONDS] [--keep] [--] [FILE_PATTERN ...]
#
#   PATH       a dattri checkout (a folder with test/), or a git repository (bare or not) that
#              holds TAG; then the test/ folder of TAG is exported with `git archive`.
#   --tag      the release to test (default v0.3.0; only used for a git repository).
#   --timeout  per-file limit in seconds (default 900); a file over it is reported as TIMEOUT.
#   --keep     keep the temporary folder (copied tests and per-file logs) and print its path.
#   FILE_PATTERN  run only the test files whose path contains one of these substrings.
#
# What it does: copies the test files into a temporary folder outside this repository, rewrites
# `import dattri` / `from dattri` to tdabench, and runs each file with this repository's venv
# (`-p no:cacheprovider -m "not gpu"`, as dattri's CI runs them), then prints one line per file.
# Nothing is written inside this repository; the copied files are never committed.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="" tag="v0.3.0" per_file_timeout=900 keep=0 patterns=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage 0 ;;
        --tag) tag="$2"; shift 2 ;;
        --timeout) per_file_timeout="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --) shift; patterns+=("$@"); break ;;
        *) if [ -z "$src" ]; then src="$1"; else patterns+=("$1"); fi; shift ;;
    esac
done
[ -n "$src" ] || usage
[ -e "$src" ] || { echo "peer_tests: $src does not exist (give a dattri checkout or git repository)" >&2; exit 2; }

python="${PEER_TESTS_PYTHON:-$repo_root/.venv/bin/python}"
[ -x "$python" ] || { echo "peer_tests: no venv python at $python; run scripts/setup.sh first" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/tdabench-peer-tests.XXXXXX")"
case "$tmp/" in "$repo_root"/*) echo "peer_tests: temporary folder $tmp is inside the repository; set TMPDIR elsewhere" >&2; exit 2 ;; esac
cleanup() { if [ "$keep" = 1 ]; then echo "peer_tests: kept $tmp"; else rm -rf "$tmp"; fi; }
trap cleanup EXIT

if [ -d "$src/test" ]; then
    cp -R "$src/test" "$tmp/test"
    origin="$src (checkout)"
elif git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$src" rev-parse --verify --quiet "$tag^{commit}" >/dev/null \
        || { echo "peer_tests: $src has no tag $tag" >&2; exit 2; }
    git -C "$src" archive "$tag" test | tar -x -C "$tmp"
    origin="$src at $tag"
else
    echo "peer_tests: $src has no test/ folder and is not a git repository" >&2; exit 2
fi

# Rename the import (the only place their tests name the package).
find "$tmp/test" -name '*.py' -print0 | xargs -0 sed -i -E \
    -e 's/^([[:space:]]*)from dattri([. ])/\1from tdabench\2/' \
    -e 's/^([[:space:]]*)import dattri([. ]|$)/\1import tdabench\2/'
if grep -rlE '^[[:space:]]*(from|import) dattri([. ]|$)' "$tmp/test" >/dev/null; then
    echo "peer_tests: an import of dattri was left unrenamed" >&2; exit 1
fi
# Their pytest.ini declares the gpu marker; a local ini also keeps our pyproject's options out.
printf '[pytest]\nmarkers =\n    gpu: marks tests as requiring GPU\n' > "$tmp/pytest.ini"

mapfile -t files < <(cd "$tmp" && find test -name 'test_*.py' | sort)
if [ "${#patterns[@]}" -gt 0 ]; then
    selected=()
    for f in "${files[@]}"; do
        for p in "${patterns[@]}"; do case "$f" in *"$p"*) selected+=("$f"); break ;; esac; done
    done
    files=("${selected[@]+"${selected[@]}"}")
fi
[ "${#files[@]}" -gt 0 ] || { echo "peer_tests: no test file matched" >&2; exit 2; }

echo "peer_tests: ${#files[@]} files from $origin, tdabench from $repo_root/src"
printf '%-50s %-8s %6s %6s %6s %6s %7s\n' file result passed failed errors skipped seconds
n_ok=0
for f in "${files[@]}"; do
    log="$tmp/logs/${f//\//__}.log"; mkdir -p "$tmp/logs"
    start=$(date +%s)
    set +e
    (cd "$tmp" && PYTHONPATH="$repo_root/src" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
        timeout "$per_file_timeout" "$python" -m pytest -q -p no:cacheprovider -m "not gpu" \
        -c pytest.ini --rootdir . "$f") >"$log" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -1 || true)"
    count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
    case $rc in
        0) result=PASS; n_ok=$((n_ok + 1)) ;;
        5) result=NOTESTS; n_ok=$((n_ok + 1)) ;;
        124) result=TIMEOUT ;;
        *) result=FAIL ;;
    esac
    printf '%-50s %-8s %6s %6s %6s %6s %7s\n' "${f#test/}" "$result" "$(count passed)" \
        "$(count failed)" "$(count error)" "$(count skipped)" "$secs"
    if [ "$result" = FAIL ]; then
        grep -E '^(FAILED|ERROR) |^E +(ModuleNotFoundError|ImportError)' "$log" | sort -u | head -20 | sed 's/^/    /'
    fi
done
echo "peer_tests: $n_ok of ${#files[@]} files pass"
[ "$n_ok" -eq "${#files[@]}" ]
