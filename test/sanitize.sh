#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of portal_sync's whole
# test suite (pg_regress + TAP), without touching the system installation.
#
#   sudo bash test/sanitize.sh            # as root (CI) or as postgres
#
# How (see docs/memory-safety.md):
#  * A private copy of Debian's PostgreSQL 15 (/usr/lib/postgresql/15 and
#    /usr/share/postgresql/15) is made under $SANITIZE_DIR/pg/usr/...;
#    Debian's binaries and pg_config find their lib/share directories
#    relative to their own location, so the copy is a self-contained
#    installation.  include/ and the libdir are symlinks to the system ones.
#  * The extension is built with gcc -fsanitize=address,undefined
#    -fno-sanitize-recover=all and installed into that copy only: the
#    system's portal_sync.so is never replaced.
#  * The copy's bin/postgres becomes a small wrapper that execs the real
#    binary with the gcc sanitizer runtimes in LD_PRELOAD (the server is not
#    instrumented, so the runtime must be loaded first).  Only the servers
#    get the runtime: perl, psql, python, pg_regress stay uninstrumented.
#  * ASAN_OPTIONS/UBSAN_OPTIONS have log_path under $SANITIZE_DIR/logs;
#    leak detection is off for the server (postgres leaks by design at exit;
#    see test/leakcheck.sh for the worker's memory).  Any file there after
#    the run, or any sanitizer line in a server log, fails the run.
#
# Environment:
#   PG_CONFIG          system pg_config (default /usr/lib/postgresql/15/bin/pg_config)
#   SANITIZE_DIR       work directory (default /var/tmp/portal_sync-asan)
#   SANITIZE_TESTS     "all" (default), "regress" (pg_regress only) or a
#                      space-separated list of TAP files (test/t/005_crashes.pl ...)
#   SANITIZE_KEEP=1    keep the work directory on success
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
WORK=${SANITIZE_DIR:-/var/tmp/portal_sync-asan}
TESTS=${SANITIZE_TESTS:-all}
CC=${SANITIZE_CC:-gcc}
JOBS=$(nproc 2>/dev/null || echo 2)

say() { printf '\n=== sanitize: %s\n' "$*"; }
die() { printf 'sanitize: %s\n' "$*" >&2; exit 1; }

# Run as postgres when we are root (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
	RUN=(runuser -u postgres --)
	OWNER=postgres
else
	RUN=()
	OWNER=$(id -un)
fi
as_owner() { "${RUN[@]}" "$@"; }

BINDIR=$("$PG_CONFIG" --bindir)           # /usr/lib/postgresql/15/bin
PKGLIB=$(dirname "$BINDIR")               # /usr/lib/postgresql/15
SHARE=$("$PG_CONFIG" --sharedir)          # /usr/share/postgresql/15
INCLUDE=$("$PG_CONFIG" --includedir)      # /usr/include/postgresql
LIBDIR=$("$PG_CONFIG" --libdir)           # /usr/lib/x86_64-linux-gnu
ASAN_RT=$($CC -print-file-name=libasan.so)
UBSAN_RT=$($CC -print-file-name=libubsan.so)
[ -e "$ASAN_RT" ] && [ -e "$UBSAN_RT" ] || die "no sanitizer runtime ($ASAN_RT, $UBSAN_RT): apt-get install gcc"

start=$(date +%s)
say "private PostgreSQL copy in $WORK/pg"
rm -rf "$WORK"
mkdir -p "$WORK/pg$(dirname "$PKGLIB")" "$WORK/pg$(dirname "$SHARE")" \
	"$WORK/pg$(dirname "$INCLUDE")" "$WORK/pg$(dirname "$LIBDIR")" "$WORK/logs"
cp -a "$PKGLIB" "$WORK/pg$PKGLIB"
cp -a "$SHARE" "$WORK/pg$SHARE"
ln -s "$INCLUDE" "$WORK/pg$INCLUDE"
[ -e "$WORK/pg$LIBDIR" ] || ln -s "$LIBDIR" "$WORK/pg$LIBDIR"
# the private copy must not contain a previously installed portal_sync
rm -f "$WORK/pg$PKGLIB/lib/portal_sync.so" "$WORK/pg$SHARE/extension/portal_sync"*
PRIV_CONFIG="$WORK/pg$BINDIR/pg_config"
[ "$("$PRIV_CONFIG" --pkglibdir)" = "$WORK/pg$PKGLIB/lib" ] ||
	die "the copied pg_config does not relocate ($("$PRIV_CONFIG" --pkglibdir))"

# The server wrapper: sanitizer runtime first, options, log path.
mv "$WORK/pg$BINDIR/postgres" "$WORK/pg$BINDIR/postgres.real"
cat > "$WORK/pg$BINDIR/postgres" <<EOF
#!/bin/sh
# portal_sync sanitizer run: the server with the ASan/UBSan runtime.
export LD_PRELOAD="$ASAN_RT:$UBSAN_RT\${LD_PRELOAD:+:\$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:log_path=$WORK/logs/asan:\${PS_EXTRA_ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$WORK/logs/ubsan"
exec "$WORK/pg$BINDIR/postgres.real" "\$@"
EOF
chmod 755 "$WORK/pg$BINDIR/postgres"

say "sanitized build ($CC -fsanitize=address,undefined)"
mkdir -p "$WORK/build"
tar -C "$SRC_DIR" -cf - \
	--exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
	--exclude=./results --exclude=./tmp_check --exclude=./log \
	--exclude=./regression.diffs --exclude=./regression.out . |
	tar -C "$WORK/build" -xf -
chown -R "$OWNER" "$WORK"
SAN_FLAGS='-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1'
# with_llvm=no: no bitcode (clang does not know the gcc sanitizer options).
as_owner make -C "$WORK/build" -j"$JOBS" PG_CONFIG="$PRIV_CONFIG" CC="$CC" with_llvm=no \
	PG_CFLAGS="$SAN_FLAGS" PG_LDFLAGS="-fsanitize=address,undefined" >"$WORK/build.log" 2>&1 ||
	{ tail -n 40 "$WORK/build.log"; die "build failed"; }
as_owner make -C "$WORK/build" install PG_CONFIG="$PRIV_CONFIG" with_llvm=no >>"$WORK/build.log" 2>&1 ||
	{ tail -n 40 "$WORK/build.log"; die "install failed"; }
ldd "$WORK/pg$PKGLIB/lib/portal_sync.so" | grep -q libasan || die "portal_sync.so is not instrumented"
build_end=$(date +%s)

say "make installcheck against the sanitized server ($TESTS)"
rc=0
args=(PG_CONFIG="$PRIV_CONFIG" with_llvm=no)
case "$TESTS" in
	all) ;;
	regress) args+=(TAP_TESTS=) ;;
	*) args+=(PROVE_TESTS="$TESTS") ;;
esac
# PATH: the TAP tests (PostgreSQL::Test::Cluster) take initdb, pg_ctl,
# postgres from PATH; pg_regress from the PGXS of the private copy.
as_owner env PATH="$WORK/pg$BINDIR:$PATH" make -C "$WORK/build" installcheck "${args[@]}" \
	2>&1 | tee "$WORK/installcheck.log" || rc=$?
end=$(date +%s)

say "sanitizer reports"
found=0
for f in "$WORK"/logs/*; do
	[ -e "$f" ] || continue
	found=1
	echo "--- $f"
	cat "$f"
done
# A report written to stderr (before log_path applies) lands in server logs.
if grep -rlE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' \
	"$WORK/build/tmp_check" "$WORK/build/log" 2>/dev/null; then
	found=1
fi
echo "build+copy $((build_end - start)) s, installcheck $((end - build_end)) s"
if [ "$found" -ne 0 ]; then
	say "FAILED: sanitizer reports above"
	exit 1
fi
if [ "$rc" -ne 0 ]; then
	say "FAILED: make installcheck exit $rc"
	for f in "$WORK"/build/tmp_check/log/regress_log_* "$WORK/build/regression.diffs"; do
		[ -e "$f" ] && { echo "--- tail of $f"; tail -n 60 "$f"; }
	done
	exit "$rc"
fi
say "OK: no sanitizer report"
[ "${SANITIZE_KEEP:-0}" = 1 ] || rm -rf "$WORK"
exit 0
