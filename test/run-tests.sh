#!/usr/bin/env bash
# Runs portal_sync's whole test suite on a Debian 12 machine, from nothing,
# in a root shell or as a user with sudo:
#
#   bash test/run-tests.sh
#
# (it re-runs itself under sudo when not started as root: test/lib/as_root.sh)
#
# 1. installs the Debian packages it needs, if any is missing;
# 2. copies the source tree (without .git) to a build directory owned by
#    `postgres` -- initdb, pg_regress temp instances and the TAP tests refuse
#    to run as root, and chowning the checkout itself would make git refuse
#    to work in it ("dubious ownership");
# 3. builds the Debian package postgresql-15-portal-sync there as `postgres`
#    (dpkg-buildpackage -b, in a second copy under debian-build/), checks it
#    with lintian (any error or warning not overridden in debian/ fails the
#    run) and installs it with apt-get, as root;
# 4. runs `make installcheck` as `postgres` in the build directory, against
#    the installed package's files: the pg_regress tests in sql/
#    against a temporary instance with shared_preload_libraries set
#    (test/regress.conf), then the TAP tests in test/t/ if there are any;
# 5. runs test/memory-safety.sh: static analysis, fuzzing, the suite again
#    under AddressSanitizer + UBSan, and the worker leak check.
#
# Exit code 0 only if everything passed.  On failure regression.diffs (and
# the TAP logs) are printed and copied back into the checkout.
#
# Environment:
#   PORTAL_SYNC_MEMORY_CHECKS set to 0 to skip step 5 (a quick local run)
#   PG_CONFIG                 default /usr/lib/postgresql/15/bin/pg_config
#   PORTAL_SYNC_BUILD_DIR     default /var/tmp/portal_sync-build
#   PORTAL_SYNC_SKIP_PACKAGES set to 1 to skip the package check
#   PORTAL_SYNC_SKIP_INSTALL  set to 1 to skip building, checking and
#                             installing the package (test what is installed)
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BUILD_DIR=${PORTAL_SYNC_BUILD_DIR:-/var/tmp/portal_sync-build}
JOBS=$(nproc 2>/dev/null || echo 2)
export DEBIAN_FRONTEND=noninteractive

# Everything the build, the tests and the benchmarks use.
PACKAGES=(
	postgresql-15 postgresql-client-15 postgresql-server-dev-15
	libcurl4-openssl-dev libjson-c-dev zlib1g-dev pkg-config gcc make
	perl libipc-run-perl
	debhelper postgresql-server-dev-all dpkg-dev build-essential lintian
	nginx-light python3 ca-certificates openssl
	prometheus-postgres-exporter prometheus
)

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'run-tests: %s\n' "$*" >&2; exit 1; }

# Packages and installing the extension need root; the tests run as postgres.
. "$SRC_DIR/test/lib/as_root.sh"
run_as_root "${BASH_SOURCE[0]}" "$@"

# ---------------------------------------------------------------- packages
# install_packages LOG PACKAGE...
. "$(dirname "${BASH_SOURCE[0]}")/lib/packages.sh"

if [ "${PORTAL_SYNC_SKIP_PACKAGES:-0}" != 1 ]; then
	say "packages"
	install_packages "${TMPDIR:-/tmp}/portal_sync-apt.log" "${PACKAGES[@]}"
fi
[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (postgresql-server-dev-15)"
id postgres >/dev/null 2>&1 || die "no postgres user (postgresql-15 package)"

# ---------------------------------------------------------------- package
# The suite runs against what a DBA installs: the Debian package, built from
# a clean copy of the tree (dpkg-buildpackage writes the .deb, .changes and
# .buildinfo next to the tree it builds), checked by lintian, installed with
# apt-get.  --reinstall: a rebuilt package of the same version replaces the
# installed one instead of being skipped as "already the newest version".
say "copy the tree to $BUILD_DIR"
rm -rf "$BUILD_DIR"
. "$SRC_DIR/test/lib/source_tree.sh"
copy_source_tree "$SRC_DIR" "$BUILD_DIR" postgres:postgres
cd "$BUILD_DIR"

if [ "${PORTAL_SYNC_SKIP_INSTALL:-0}" != 1 ]; then
	t_pkg=$SECONDS
	version=$(dpkg-parsechangelog -l "$SRC_DIR/debian/changelog" -S Version)
	PKG_DIR=$BUILD_DIR/debian-build
	PKG_LOG=$BUILD_DIR/package-build.log
	say "package postgresql-15-portal-sync $version (dpkg-buildpackage -b as postgres, in $PKG_DIR)"
	install -d -o postgres -g postgres "$PKG_DIR"
	copy_source_tree "$SRC_DIR" "$PKG_DIR/portal-sync-${version%-*}" postgres:postgres
	(cd "$PKG_DIR/portal-sync-${version%-*}" &&
		runuser -u postgres -- dpkg-buildpackage -us -uc -b -j"$JOBS") >"$PKG_LOG" 2>&1 ||
		{ tail -n 40 "$PKG_LOG" >&2; die "dpkg-buildpackage failed (log: $PKG_LOG)"; }
	changes=$PKG_DIR/portal-sync_${version}_$(dpkg --print-architecture).changes
	deb=$PKG_DIR/postgresql-15-portal-sync_${version}_$(dpkg --print-architecture).deb
	[ -f "$changes" ] && [ -f "$deb" ] || die "dpkg-buildpackage made no $deb (log: $PKG_LOG)"
	echo "   built $(basename "$deb") in $((SECONDS - t_pkg)) s"

	say "lintian"
	runuser -u postgres -- lintian --info --fail-on error,warning "$changes" ||
		die "lintian found errors or warnings (fix them, or override them in debian/*.lintian-overrides with a comment saying why)"
	echo "   lintian: no error or warning"

	say "install the package (apt-get)"
	apt-get install -y -q --reinstall --no-install-recommends "$deb" >"$BUILD_DIR/package-install.log" 2>&1 ||
		{ tail -n 20 "$BUILD_DIR/package-install.log" >&2; die "apt-get install $deb failed"; }
	dpkg-query -W -f='   installed ${Package} ${Version}\n' postgresql-15-portal-sync
	echo "   package build + lintian + install: $((SECONDS - t_pkg)) s"
fi

# ---------------------------------------------------------------- test
say "make installcheck (as postgres)"
LOG="$BUILD_DIR/installcheck.log"
rc=0
runuser -u postgres -- make installcheck PG_CONFIG="$PG_CONFIG" PROVE_FLAGS="${PROVE_FLAGS:--j3}" 2>&1 | tee "$LOG" || rc=$?

# Count what ran: pg_regress tests and TAP test files.
r_pass=0; r_fail=0; t_pass=0; t_fail=0
if line=$(grep -E '^ *All [0-9]+ tests passed' "$LOG" | tail -n1); then
	r_pass=$(sed -E 's/^ *All ([0-9]+).*/\1/' <<<"$line")
elif line=$(grep -E '^ *[0-9]+ of [0-9]+ tests failed' "$LOG" | tail -n1); then
	r_fail=$(sed -E 's/^ *([0-9]+) of.*/\1/' <<<"$line")
	r_total=$(sed -E 's/^ *[0-9]+ of ([0-9]+).*/\1/' <<<"$line")
	r_pass=$((r_total - r_fail))
fi
if grep -qE '^Files=[0-9]+' "$LOG"; then
	t_total=$(grep -E '^Files=[0-9]+' "$LOG" | tail -n1 | sed -E 's/^Files=([0-9]+).*/\1/')
	t_pass=$(grep -cE '\.pl \.+ ok' "$LOG" || true)
	t_fail=$((t_total - t_pass))
fi

if [ "$rc" -ne 0 ]; then
	say "FAILED (make installcheck exit $rc)"
	if [ -s "$BUILD_DIR/regression.diffs" ]; then
		echo "--- regression.diffs ---"
		cat "$BUILD_DIR/regression.diffs"
		cp "$BUILD_DIR/regression.diffs" "$SRC_DIR/regression.diffs" 2>/dev/null || true
	fi
	if [ -d "$BUILD_DIR/tmp_check/log" ]; then
		for f in "$BUILD_DIR"/tmp_check/log/regress_log_*; do
			[ -e "$f" ] || continue
			echo "--- tail of $f ---"
			tail -n 60 "$f"
		done
		rm -rf "$SRC_DIR/tmp_check_log"
		cp -r "$BUILD_DIR/tmp_check/log" "$SRC_DIR/tmp_check_log" 2>/dev/null || true
	fi
	# A failure before any count (build or setup error) still counts as one.
	[ $((r_fail + t_fail)) -gt 0 ] || r_fail=1
fi

total_run=$((r_pass + r_fail + t_pass + t_fail))
if [ "$rc" -eq 0 ] && [ "$total_run" -eq 0 ]; then
	say "no test ran"
	exit 1
fi
echo
echo "pg_regress: $r_pass passed, $r_fail failed; TAP files: $t_pass passed, $t_fail failed"
echo "portal_sync: $((r_pass + t_pass)) passed, $((r_fail + t_fail)) failed"

# ---------------------------------------------------------------- memory safety
# Static analysis, fuzzing, the sanitized suite and the worker leak check
# (test/memory-safety.sh; about 25 minutes on 2 cores).  Skipped when the
# suite failed, or with PORTAL_SYNC_MEMORY_CHECKS=0 for a quick local run.
if [ "$rc" -eq 0 ] && [ "${PORTAL_SYNC_MEMORY_CHECKS:-1}" != 0 ]; then
	say "memory safety (test/memory-safety.sh)"
	bash "$SRC_DIR/test/memory-safety.sh" || rc=$?
	[ "$rc" -eq 0 ] && echo "memory safety: all checks passed" || echo "memory safety: FAILED"
fi
exit "$rc"
