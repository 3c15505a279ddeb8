#!/usr/bin/env bash
# portal_sync's memory-safety checks, one after the other, with a summary:
#
#   bash test/memory-safety.sh     (as root; re-runs itself under sudo otherwise)
#
#   1. static analysis   test/static-analysis.sh (cppcheck + clang-tidy over
#                        src/, zero findings)
#   2. fuzzing           test/fuzz/run.sh: every libFuzzer target for
#                        FUZZ_SECONDS (default 60) each
#   3. sanitizers        test/sanitize.sh: pg_regress + TAP suite against
#                        the extension built with ASan + UBSan, server
#                        started with the ASan runtime preloaded
#   4. rule fuzzing      test/fuzz/rule_fuzz.sh against that sanitized
#                        server (share_when / enroll_when validation)
#   5. leak check        test/leakcheck.sh: the worker's private memory over
#                        a long drain (needs portal_sync installed in the
#                        system PostgreSQL: test/run-tests.sh does that)
#
# test/run-tests.sh runs this after `make installcheck`; docs/memory-safety.md
# explains each check and the figures.  Exit 0 only if all five passed.
#
# Environment: FUZZ_SECONDS, SANITIZE_TESTS (default "all"),
#   RULE_FUZZ_CASES, LEAKCHECK_EVENTS (passed on), PORTAL_SYNC_SKIP_PACKAGES=1.
set -uo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive
export SANITIZE_DIR=${SANITIZE_DIR:-/var/tmp/portal_sync-asan}
BINDIR=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)

say() { printf '\n=== memory-safety: %s\n' "$*"; }
die() { printf 'memory-safety: %s\n' "$*" >&2; exit 1; }

# Packages need root; the servers run as postgres.
. "$SRC_DIR/test/lib/as_root.sh"
run_as_root "${BASH_SOURCE[0]}" "$@"

# cppcheck/clang-tidy for the analysis, clang + compiler-rt for libFuzzer,
# patchelf for the preloaded sanitizer runtime (see test/sanitize.sh).
if [ "${PORTAL_SYNC_SKIP_PACKAGES:-0}" != 1 ]; then
	. "$SRC_DIR/test/lib/packages.sh"
	say "packages"
	install_packages "${TMPDIR:-/tmp}/portal_sync-apt-memory.log" \
		cppcheck clang-tidy clang-14 libclang-rt-14-dev patchelf gcc make pkg-config \
		postgresql-server-dev-15 libcurl4-openssl-dev libjson-c-dev zlib1g-dev python3
fi

# The checks run from a copy of the tree readable by postgres (the fuzzers
# and the servers run as postgres; the checkout may sit in root's home).
COPY=/var/tmp/portal_sync-memory-safety
rm -rf "$COPY"
. "$SRC_DIR/test/lib/source_tree.sh"
copy_source_tree "$SRC_DIR" "$COPY" postgres:
HERE="$COPY/test"

declare -a NAMES RESULTS TIMES
overall=0

# run_check NAME COMMAND...: runs one check, records pass/fail and seconds.
run_check() {
	local name=$1 start rc
	shift
	say "$name: $*"
	start=$(date +%s)
	"$@"
	rc=$?
	NAMES+=("$name")
	TIMES+=("$(( $(date +%s) - start ))")
	if [ "$rc" -eq 0 ]; then
		RESULTS+=(ok)
	else
		RESULTS+=("FAILED ($rc)")
		overall=1
	fi
}

# Fuzzing runs as postgres, in its own directory: nothing in it needs root.
fuzz_dir=/var/tmp/portal_sync-fuzz
rm -rf "$fuzz_dir"
mkdir -p "$fuzz_dir"
chown postgres "$fuzz_dir"

rule_fuzz_on_sanitized_server() {
	local bindir="$SANITIZE_DIR/pg$BINDIR" rc=0
	[ -x "$bindir/postgres.real" ] || { echo "no sanitized installation in $SANITIZE_DIR"; return 1; }
	PG_BINDIR="$bindir" bash "$HERE/fuzz/rule_fuzz.sh" || rc=$?
	if compgen -G "$SANITIZE_DIR/logs/*" >/dev/null; then
		echo "sanitizer reports during rule fuzzing:"
		cat "$SANITIZE_DIR"/logs/*
		rc=1
	fi
	return "$rc"
}

run_check "static analysis" bash "$HERE/static-analysis.sh"
run_check "fuzzing" runuser -u postgres -- env FUZZ_DIR="$fuzz_dir" \
	FUZZ_SECONDS="${FUZZ_SECONDS:-60}" bash "$HERE/fuzz/run.sh"
run_check "sanitizers" env SANITIZE_KEEP=1 bash "$HERE/sanitize.sh"
run_check "rule fuzzing" rule_fuzz_on_sanitized_server
run_check "leak check" bash "$HERE/leakcheck.sh"
rm -rf "$SANITIZE_DIR" "$COPY"

say "summary"
for i in "${!NAMES[@]}"; do
	printf '  %-16s %-12s %5d s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
done
exit "$overall"
