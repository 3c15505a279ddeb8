#!/usr/bin/env bash
# Builds and runs portal_sync's libFuzzer targets (clang -fsanitize=fuzzer,
# address,undefined), each from the real src/wire.c and src/http.c plus
# test/fuzz/pg_shim.c, against its seed corpus test/fuzz/corpus/<target>/.
#
#   bash test/fuzz/run.sh                 # every target, FUZZ_SECONDS each
#   FUZZ_SECONDS=3600 bash test/fuzz/run.sh fuzz_answer_body   # a long run
#
# Exit 0 only if every target ran its time without a finding (crash,
# sanitizer report, leak, timeout, out-of-memory).  Findings are kept as
# $FUZZ_DIR/<target>/crash-* (reproduce: $FUZZ_DIR/<target>/<target> FILE).
# The rule_expr.c validation needs the backend: see test/fuzz/rule_fuzz.sh.
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_DIR       build and working corpus directory (default /var/tmp/portal_sync-fuzz)
#   CLANG          default clang-14 (or clang)
#   PG_CONFIG      default /usr/lib/postgresql/15/bin/pg_config
#   FUZZ_JOBS      parallel fuzzing processes per target (default 1)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/../../src" && pwd)
SECONDS_EACH=${FUZZ_SECONDS:-60}
OUT=${FUZZ_DIR:-/var/tmp/portal_sync-fuzz}
CLANG=${CLANG:-$(command -v clang-14 || command -v clang)}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
JOBS=${FUZZ_JOBS:-1}
ALL=(fuzz_answer_body fuzz_endpoint fuzz_batch_body)
TARGETS=("$@")
[ "${#TARGETS[@]}" -gt 0 ] || TARGETS=("${ALL[@]}")

INC=(-I"$("$PG_CONFIG" --includedir-server)" -I"$SRC" -I"$HERE" $(pkg-config --cflags libcurl json-c zlib))
LIBS=("$("$PG_CONFIG" --pkglibdir)/libpgport.a" $(pkg-config --libs libcurl json-c zlib))
CFLAGS=(-g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
	-fno-sanitize-recover=all -Wall -Werror -Wno-unused-parameter -Wno-ignored-attributes -D_GNU_SOURCE)

declare -A SOURCES=(
	[fuzz_answer_body]="$HERE/fuzz_answer_body.c $SRC/wire.c"
	[fuzz_endpoint]="$HERE/fuzz_endpoint.c $SRC/http.c $SRC/wire.c"
	[fuzz_batch_body]="$HERE/fuzz_batch_body.c $SRC/wire.c"
)
declare -A MAXLEN=([fuzz_answer_body]=65536 [fuzz_endpoint]=512 [fuzz_batch_body]=4096)

rc=0
for t in "${TARGETS[@]}"; do
	[ -n "${SOURCES[$t]:-}" ] || { echo "fuzz: unknown target $t" >&2; exit 2; }
	dir="$OUT/$t"
	mkdir -p "$dir/corpus"
	# shellcheck disable=SC2086
	"$CLANG" "${CFLAGS[@]}" "${INC[@]}" ${SOURCES[$t]} "$HERE/pg_shim.c" "${LIBS[@]}" -o "$dir/$t"
	cp -n "$HERE/corpus/$t/"* "$dir/corpus/" 2>/dev/null || true
	echo "=== $t: ${SECONDS_EACH}s"
	start=$(date +%s)
	# -dict when there is one; artifacts (crash-*, leak-*, timeout-*) in $dir
	par=()
	[ "$JOBS" -gt 1 ] && par=(-fork="$JOBS")
	dict=()
	[ -f "$HERE/$t.dict" ] && dict=(-dict="$HERE/$t.dict")
	if ! (cd "$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		./"$t" "${dict[@]}" -max_total_time="$SECONDS_EACH" -max_len="${MAXLEN[$t]}" \
			-timeout=10 -rss_limit_mb=2048 "${par[@]}" \
			-artifact_prefix="$dir/" -print_final_stats=1 corpus "$HERE/corpus/$t" \
			>"$dir/log" 2>&1); then
		echo "!!! $t: finding (log $dir/log)"
		grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$dir/log" | head -20
		rc=1
	fi
	grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$dir/log" | tail -2 || true
	echo "$t: $(( $(date +%s) - start ))s, corpus $(ls "$dir/corpus" | wc -l) files"
done
exit "$rc"
