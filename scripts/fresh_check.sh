#!/usr/bin/env bash
# The fresh-machine check a developer runs before resolving an issue: clone HEAD (committed work
# only) into a temporary folder, make a new virtualenv there, and run the README's quick-start
# commands exactly as written, one after the other; print each one's time and exit status and the
# test summary. Exits non-zero when any command fails.
#
#   bash scripts/fresh_check.sh              # both quick-start commands
#   ATTNC_DEPS=latest bash scripts/fresh_check.sh   # the same with the newest releases
#   FRESH_KEEP=1 ...                         # keep the folder (logs, venv) after a pass too
#
# Caches that could hide a broken set-up (attnc's, Hugging Face's, Triton's, the parser's) start
# empty; pip's download cache is kept (it changes no version).
set -uo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
py=${FRESH_PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/attnc-fresh.XXXXXX")

git clone -q --no-hardlinks "$repo" "$work/attnc" || exit 1
head=$(git -C "$work/attnc" log -1 --format='%h %s' | cut -c1-100)
[ -z "$(git -C "$repo" status --porcelain)" ] || echo "fresh-check: uncommitted changes are not checked" >&2

# the quick start's commands: the first ```bash block under "## Quick start", comments removed
mapfile -t commands < <(awk '/^## Quick start/ {q = 1; next} /^## / {q = 0}
    q && /^```bash/ {b = 1; next} b && /^```/ {exit} b {sub(/[ \t]*#.*/, ""); if (length($0)) print}' \
    "$work/attnc/README.md")
[ "${#commands[@]}" -gt 0 ] || { echo "fresh-check: no commands under the README's Quick start" >&2; exit 1; }

"$py" -m venv "$work/venv" || exit 1
pip_cache=$("$py" -m pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")
env_run() {   # the new venv first on PATH; nothing of this shell's Python set-up leaks in
    env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u PYTHONSAFEPATH -u TRITON_INTERPRET \
        PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv" PIP_CACHE_DIR="$pip_cache" \
        XDG_CACHE_HOME="$work/cache" HF_HOME="$work/cache/hf" ATTNC_CACHE_DIR="$work/cache/attnc" \
        TRITON_CACHE_DIR="$work/cache/triton" bash -c "$1"
}

echo "fresh-check: $head in $work (python $("$py" -c 'import sys; print(sys.version.split()[0])'), deps: ${ATTNC_DEPS:-lock})"
status=0
summary=()
for i in "${!commands[@]}"; do
    cmd=${commands[$i]}
    log="$work/command-$((i + 1)).log"
    echo "fresh-check: \$ $cmd   (log: $log)"
    start=$(date +%s)
    (cd "$work/attnc" && env_run "$cmd") >"$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    line=$(printf '%-12s exit %d  %dm%02ds' "$cmd" "$rc" $((secs / 60)) $((secs % 60)))
    tests=$(grep -E '[0-9]+ (passed|failed).* in [0-9.]+s' "$log" | tail -n 1)
    [ -n "$tests" ] && line="$line  $tests"
    summary+=("$line")
    echo "fresh-check: $line"
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "---- last lines of $log" >&2
        tail -n 40 "$log" >&2
    fi
done
echo
echo "fresh-check summary ($head):"
printf '  %s\n' "${summary[@]}"
if [ "$status" -eq 0 ] && [ "${FRESH_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
else
    echo "fresh-check: kept $work (logs, venv)"
fi
exit "$status"
