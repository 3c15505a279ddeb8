#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of portal_sync's whole
# test suite (pg_regress + TAP), without touching the system installation.
#
#   bash test/sanitize.sh                 # as root (CI) or as postgres
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
#  * The server runs with libasan preloaded (LD_PRELOAD, through a wrapper
#    in place of the copy's postgres binary; a patched copy of
#    libgpg-error makes that possible, see "Sanitizer runtime" below), so
#    ASan owns malloc/free of the whole server; perl, psql, python and
#    pg_regress stay uninstrumented.
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
#   SANITIZE_PROVE_FLAGS  prove flags (default -j3: three TAP files at a time)
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
[ -e "$ASAN_RT" ] || die "no sanitizer runtime ($ASAN_RT): apt-get install gcc"

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

# Sanitizer runtime, preloaded into every server process.
#
# LD_PRELOAD=libasan.so alone hangs Debian's postgres and initdb before
# main(): libgpg-error's constructor (postgres -> libldap -> gnutls ->
# libgcrypt -> libgpg-error) runs before libasan's own, calls
# bindtextdomain(), and the malloc() inside it initializes ASan lazily while
# glibc's _nl_state_lock is write-locked; the lock word is left corrupted
# and the next bindtextdomain() (postgres's own, in main) waits forever.
# The fix: a private copy of libgpg-error.so.0 with libasan.so added to its
# DT_NEEDED (patchelf), found first through LD_LIBRARY_PATH, so the dynamic
# linker initializes ASan before libgpg-error's constructor runs.  With
# libasan in LD_PRELOAD, malloc/free/memcpy/str* of the whole server are
# ASan's: heap red zones, use-after-free and double free are checked for
# every malloc'd block (libcurl's and json-c's buffers that the extension
# reads or writes, its own malloc'd curl lists).  palloc'd chunks are
# carved out of big malloc'd blocks by PostgreSQL's allocator, so an
# overflow inside a block stays invisible to ASan (PostgreSQL only marks
# them for Valgrind); see docs/memory-safety.md.
#
# Only the server is preloaded: $WORK/pg$BINDIR/postgres is a wrapper
# script that sets LD_PRELOAD/LD_LIBRARY_PATH and execs the real binary
# (postgres.real) under its own name, so initdb, pg_ctl and the TAP nodes,
# which all find "postgres" next to themselves, start sanitized servers,
# while perl, psql, python and pg_regress stay unsanitized.
#
# Options: leak detection is off for the server (postgres does not free
# at exit, by design; test/leakcheck.sh measures the worker's memory);
# the first report aborts the process, and reports go to $WORK/logs.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:log_path=$WORK/logs/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$WORK/logs/ubsan"

say "sanitizer runtime preloaded into the copy's postgres"
ASAN_LIB=$(readlink -f "$ASAN_RT")                     # .../libasan.so.8.0.0
# awk reads all of ldconfig's output: exiting at the first match would
# end ldconfig with SIGPIPE, and pipefail would stop this script (exit 141).
GPG_ERROR=$(ldconfig -p | awk '$1 == "libgpg-error.so.0" && /x86-64/ && found == "" { found = $NF } END { print found }')
[ -n "$GPG_ERROR" ] || die "libgpg-error.so.0 not found (ldconfig -p)"
command -v patchelf >/dev/null || die "patchelf missing: apt-get install patchelf"
mkdir -p "$WORK/preload"
cp "$GPG_ERROR" "$WORK/preload/libgpg-error.so.0"
patchelf --add-needed "$(basename "$(readlink "$ASAN_RT")")" "$WORK/preload/libgpg-error.so.0"
mv "$WORK/pg$BINDIR/postgres" "$WORK/pg$BINDIR/postgres.real"
cat > "$WORK/pg$BINDIR/postgres" <<EOF
#!/bin/bash
# generated by test/sanitize.sh: the server with ASan preloaded
export LD_LIBRARY_PATH="$WORK/preload\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_PRELOAD="$ASAN_LIB"
export ASAN_OPTIONS="$ASAN_OPTIONS"
export UBSAN_OPTIONS="$UBSAN_OPTIONS"
exec -a "\$0" "$WORK/pg$BINDIR/postgres.real" "\$@"
EOF
chmod 755 "$WORK/pg$BINDIR/postgres"
timeout 30 "$WORK/pg$BINDIR/postgres" --version >/dev/null ||
	die "the preloaded postgres does not start (see the libgpg-error note above)"
# ASan's "help" option makes the runtime list its flags at start-up: proof
# that the server process itself runs under ASan (LD_PRELOAD took effect).
plain=$(timeout 30 env ASAN_OPTIONS=help=1 "$WORK/pg$BINDIR/postgres.real" --version 2>&1 || true)
preloaded=$(timeout 30 env LD_LIBRARY_PATH="$WORK/preload" LD_PRELOAD="$ASAN_LIB" ASAN_OPTIONS=help=1 \
	"$WORK/pg$BINDIR/postgres.real" --version 2>&1 || true)
case "$plain" in *'Available flags for AddressSanitizer'*) die "postgres.real alone must not be instrumented" ;; esac
case "$preloaded" in *'Available flags for AddressSanitizer'*) ;; *) die "ASan does not start in the preloaded postgres" ;; esac

say "sanitized build ($CC -fsanitize=address,undefined)"
. "$SRC_DIR/test/lib/source_tree.sh"
copy_source_tree "$SRC_DIR" "$WORK/build" "$OWNER"
chown -R "$OWNER" "$WORK"
# The options are also compiled into the instrumented .so
# (__asan_default_options): a backend that loads it itself (CREATE
# EXTENSION without shared_preload_libraries, test 006) starts ASan after
# set_ps_display() has overwritten the process's original environment,
# which is where the sanitizer runtime reads ASAN_OPTIONS from.
cat > "$WORK/build/src/zz_sanitizer_options.c" <<EOF
/* generated by test/sanitize.sh, only in its private build copy */
const char *__asan_default_options(void);
const char *__ubsan_default_options(void);
const char *__asan_default_options(void) { return "$ASAN_OPTIONS"; }
const char *__ubsan_default_options(void) { return "$UBSAN_OPTIONS"; }
EOF
chown "$OWNER" "$WORK/build/src/zz_sanitizer_options.c"
SAN_FLAGS='-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1'
# with_llvm=no: no bitcode (clang does not know the gcc sanitizer options).
as_owner make -C "$WORK/build" -j"$JOBS" PG_CONFIG="$PRIV_CONFIG" CC="$CC" with_llvm=no \
	PG_CFLAGS="$SAN_FLAGS" PG_LDFLAGS="-fsanitize=address,undefined" >"$WORK/build.log" 2>&1 ||
	{ tail -n 40 "$WORK/build.log"; die "build failed"; }
as_owner make -C "$WORK/build" install PG_CONFIG="$PRIV_CONFIG" with_llvm=no >>"$WORK/build.log" 2>&1 ||
	{ tail -n 40 "$WORK/build.log"; die "install failed"; }
ldd "$WORK/pg$PKGLIB/lib/portal_sync.so" | grep libasan >/dev/null || die "portal_sync.so is not instrumented"
build_end=$(date +%s)

say "make installcheck against the sanitized server ($TESTS)"
rc=0
args=(PG_CONFIG="$PRIV_CONFIG" with_llvm=no PROVE_FLAGS="${SANITIZE_PROVE_FLAGS:--j3}")
case "$TESTS" in
	all) ;;
	regress) args+=(TAP_TESTS=) ;;
	*) args+=(PROVE_TESTS="$TESTS") ;;
esac
# PATH: the TAP tests (PostgreSQL::Test::Cluster) take initdb, pg_ctl,
# postgres from PATH; pg_regress from the PGXS of the private copy.
as_owner env PATH="$WORK/pg$BINDIR:$PATH" ASAN_OPTIONS="$ASAN_OPTIONS" UBSAN_OPTIONS="$UBSAN_OPTIONS" make -C "$WORK/build" installcheck "${args[@]}" \
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
