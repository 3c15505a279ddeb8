#!/usr/bin/env bash
# Static analysis of src/: cppcheck and clang-tidy, zero findings required.
#
#   bash test/static-analysis.sh        # exit 0 only if both are clean
#
# cppcheck: --enable=warning,portability,performance (bugs, undefined
#   behaviour, non-portable code, needless copies); "style" is left out
#   (variableScope/shadowFunction advice on PostgreSQL-style C).  Run with
#   PostgreSQL's server headers so that macros (elog/ereport, foreach,
#   palloc) are understood.  Suppressions: none.
# clang-tidy: the checks and their justified exclusions are in .clang-tidy
#   at the top of the tree; every warning is an error.
# -Wall -Wextra -Werror stay in the Makefile (the compiler's own checks).
#
# Packages (Debian 12): cppcheck clang-tidy (clang-tidy 14), and the build
# dependencies of the extension (postgresql-server-dev-15, libcurl4-openssl-dev,
# libjson-c-dev, zlib1g-dev, pkg-config).
# Environment: PG_CONFIG (default /usr/lib/postgresql/15/bin/pg_config),
#   CLANG_TIDY (default clang-tidy), CPPCHECK (default cppcheck).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
CLANG_TIDY=${CLANG_TIDY:-clang-tidy}
CPPCHECK=${CPPCHECK:-cppcheck}
JOBS=$(nproc 2>/dev/null || echo 2)
SERVER_INC=$("$PG_CONFIG" --includedir-server)
# shellcheck disable=SC2207
PKG_INC=($(pkg-config --cflags libcurl json-c zlib))
rc=0

echo "=== cppcheck $($CPPCHECK --version)"
start=$(date +%s)
if ! "$CPPCHECK" --enable=warning,portability,performance --std=c99 \
	--error-exitcode=1 -q -j "$JOBS" \
	-I "$SERVER_INC" -I src "${PKG_INC[@]/#-I/-I }" -D_GNU_SOURCE -D__GNUC__=12 -D__x86_64__ -D__linux__ \
	--suppress=missingIncludeSystem --suppress=missingInclude \
	--template='{file}:{line}: {severity}: {message} [{id}]' src/*.c; then
	echo "cppcheck: findings above"
	rc=1
fi
echo "cppcheck: $(( $(date +%s) - start ))s"

echo "=== $($CLANG_TIDY --version | grep -m1 -i version)"
start=$(date +%s)
out=$(mktemp)
# shellcheck disable=SC2016
printf '%s\n' src/*.c | xargs -P "$JOBS" -I{} "$CLANG_TIDY" --quiet {} -- \
	-I"$SERVER_INC" -Isrc "${PKG_INC[@]}" -D_GNU_SOURCE >"$out" 2>&1
if grep -qE '(warning|error):' "$out"; then
	grep -vE '^[0-9]+ warnings? generated\.$|^Suppressed [0-9]+ warnings|^Use -header-filter' "$out"
	echo "clang-tidy: $(grep -cE '(warning|error):' "$out") findings"
	rc=1
fi
rm -f "$out"
echo "clang-tidy: $(( $(date +%s) - start ))s"

[ "$rc" -eq 0 ] && echo "static analysis: clean"
exit "$rc"
