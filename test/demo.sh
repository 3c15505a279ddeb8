#!/usr/bin/env bash
# portal_sync demo -- "the main job".  On a fresh Debian 12 machine, from the
# top of the repository, in a root shell or as a user with sudo:
#
#   bash test/demo.sh
#
# (it re-runs itself under sudo when not started as root: test/lib/as_root.sh)
#
# 1. installs the Debian packages it needs (skipped when all are present)
#    and builds the extension as `postgres` in a copy of the tree
#    ($PORTAL_SYNC_DEMO_BUILD_DIR, default /var/tmp/portal_sync-demo-build,
#    kept between runs so that a rebuild is incremental), then installs it;
# 2. starts the local test portal (test/portal/portal.py) on loopback and a
#    throwaway cluster (initdb as postgres in a temp dir, a free port,
#    shared_preload_libraries = 'portal_sync', portal_sync.endpoint = the
#    portal);
# 3. loads a synthetic pediatric practice (test/demo/practice.sql, about
#    2,000 patients with years of history), then creates the extension and
#    attaches the tables (test/attach_reference.sql);
# 4. sets the sharing rules (date cutoff 3 years back, max privacy level 1),
#    drives the initiating events (test/demo/events.sql), shows the backlog
#    draining, then incremental changes (test/demo/changes.sql), drains again;
# 5. compares what the database says should be on the portal with what the
#    portal holds (test/demo/summary.sql) and prints OK or MISMATCH per rule.
#
# Exits 0 only if every check says OK.  Stops the cluster and the portal and
# removes the temp dir on exit, whatever happens.
#
# Environment:
#   DEMO_PATIENTS              patients in the practice (default 2000)
#   DEMO_DRAIN_TIMEOUT         seconds to wait for each backlog (default 60)
#   DEMO_STEP_TIMEOUT          time limit of each SQL step, seconds (default 300)
#   DEMO_KEEP=1                keep the temp dir (server log, portal state)
#   PORTAL_SYNC_DEMO_BUILD_DIR build directory (default /var/tmp/portal_sync-demo-build)
#   PORTAL_SYNC_SKIP_PACKAGES=1  skip the package check
#   PG_CONFIG                  default /usr/lib/postgresql/15/bin/pg_config
#   PYTHON                     default /usr/bin/python3
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BUILD_DIR=${PORTAL_SYNC_DEMO_BUILD_DIR:-/var/tmp/portal_sync-demo-build}
PATIENTS=${DEMO_PATIENTS:-2000}
DRAIN_TIMEOUT=${DEMO_DRAIN_TIMEOUT:-60}
JOBS=$(nproc 2>/dev/null || echo 2)
# Debian's python3 (package python3): the portal runs as postgres, who may
# not reach an interpreter installed under root's home.
PYTHON=${PYTHON:-/usr/bin/python3}
export DEBIAN_FRONTEND=noninteractive
unset PGTZ PGOPTIONS PGDATABASE PGHOST PGPORT PGUSER || true

PACKAGES=(postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev
		  libjson-c-dev zlib1g-dev pkg-config gcc make python3)

T0=$SECONDS
say() { printf '\n== [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# Packages and `make install` need root; the servers run as postgres.
. "$(dirname "${BASH_SOURCE[0]}")/lib/as_root.sh"
run_as_root "${BASH_SOURCE[0]}" "$@"

# ---------------------------------------------------------------- packages
# install_packages LOG PACKAGE...
. "$(dirname "${BASH_SOURCE[0]}")/lib/packages.sh"

say "packages"
if [ "${PORTAL_SYNC_SKIP_PACKAGES:-0}" != 1 ]; then
	install_packages "${TMPDIR:-/tmp}/portal_sync-apt.log" "${PACKAGES[@]}"
fi
[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (postgresql-server-dev-15)"
[ -x "$PYTHON" ] || die "$PYTHON not found (python3)"
id postgres >/dev/null 2>&1 || die "no postgres user (postgresql-15 package)"
BINDIR=$("$PG_CONFIG" --bindir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
as_pg() { runuser -u postgres -- "$@"; }

# ---------------------------------------------------------------- build
# In a copy owned by postgres (the checkout stays as it is: no root-owned
# objects in it, and git keeps working).  tar keeps modification times, so
# make rebuilds only what changed since the last demo.
say "build and install portal_sync ($BUILD_DIR)"
. "$SRC_DIR/test/lib/source_tree.sh"
copy_source_tree "$SRC_DIR" "$BUILD_DIR" postgres:postgres
for f in "$BUILD_DIR"/src/*.c; do		# sources removed from the tree
	[ -e "$f" ] || continue
	[ -e "$SRC_DIR/src/$(basename "$f")" ] || rm -f "$f" "${f%.c}.o" "${f%.c}.bc"
done
if ! (cd "$BUILD_DIR" && as_pg make -j"$JOBS" PG_CONFIG="$PG_CONFIG") >"$BUILD_DIR/build.log" 2>&1; then
	tail -n 30 "$BUILD_DIR/build.log" >&2
	die "build failed (log: $BUILD_DIR/build.log)"
fi
installed_up_to_date() {
	local f sharedir
	sharedir=$("$PG_CONFIG" --sharedir)/extension
	cmp -s "$BUILD_DIR/portal_sync.so" "$PKGLIBDIR/portal_sync.so" || return 1
	for f in "$BUILD_DIR"/sql/portal_sync--*.sql "$BUILD_DIR"/portal_sync.control; do
		cmp -s "$f" "$sharedir/$(basename "$f")" || return 1
	done
}
if installed_up_to_date; then
	echo "   built; installed copy already up to date"
else
	(cd "$BUILD_DIR" && make install PG_CONFIG="$PG_CONFIG") >>"$BUILD_DIR/build.log" 2>&1 ||
		{ tail -n 20 "$BUILD_DIR/build.log" >&2; die "make install failed"; }
	chown -R postgres:postgres "$BUILD_DIR"
	echo "   built and installed into $PKGLIBDIR"
fi

# ---------------------------------------------------------------- servers
WORK=$(mktemp -d /tmp/portal_sync-demo.XXXXXX)
DATA=$WORK/data
PORTAL_PID=
cleanup() {
	local rc=$?
	trap - EXIT INT TERM HUP
	if [ -f "$DATA/postmaster.pid" ]; then
		as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
			as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
	fi
	if [ -n "$PORTAL_PID" ] && kill -0 "$PORTAL_PID" 2>/dev/null; then
		kill -TERM "$PORTAL_PID" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$PORTAL_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$PORTAL_PID" 2>/dev/null || true
		wait "$PORTAL_PID" 2>/dev/null || true
	fi
	if [ "${DEMO_KEEP:-0}" = 1 ]; then
		echo "demo: kept $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

chmod 755 "$WORK"
cp "$SRC_DIR"/test/reference_schema.sql "$SRC_DIR"/test/attach_reference.sql \
   "$SRC_DIR"/test/demo/*.sql "$SRC_DIR"/test/demo/portal_state.py \
   "$SRC_DIR"/test/portal/portal.py "$WORK/"
mkdir "$WORK/state"
chown -R postgres:postgres "$WORK"

say "local portal and throwaway cluster ($WORK)"
# The portal runs as postgres too (setpriv execs: $! is python's pid).
setpriv --reuid=postgres --regid=postgres --init-groups \
	"$PYTHON" "$WORK/portal.py" --port 0 --host 127.0.0.1 >"$WORK/portal.out" 2>&1 &
PORTAL_PID=$!
PORTAL_PORT=
for _ in $(seq 150); do
	PORTAL_PORT=$(sed -n 's/^listening on \([0-9]*\)$/\1/p' "$WORK/portal.out")
	[ -n "$PORTAL_PORT" ] && break
	kill -0 "$PORTAL_PID" 2>/dev/null || { cat "$WORK/portal.out" >&2; die "portal did not start"; }
	sleep 0.1
done
[ -n "$PORTAL_PORT" ] || die "portal did not say it listens within 15 s"
PORTAL_URL=http://127.0.0.1:$PORTAL_PORT

PG_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$BINDIR/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 ||
	{ cat "$WORK/initdb.log" >&2; die "initdb failed"; }
cat >>"$DATA/postgresql.conf" <<EOF

# test/demo.sh
port = $PG_PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
shared_preload_libraries = 'portal_sync'
portal_sync.endpoint = '$PORTAL_URL/portal/v1/events'
portal_sync.retry_max_delay = '2s'
portal_sync.http_timeout = '10s'
timezone = 'UTC'
fsync = off                # a throwaway cluster
synchronous_commit = off
max_wal_size = 2GB
jit = off
EOF
as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w -t 60 start >/dev/null ||
	{ tail -n 30 "$WORK/server.log" >&2; die "server did not start"; }
as_pg "$BINDIR/createdb" -h "$WORK" -p "$PG_PORT" pediatrics
echo "   portal $PORTAL_URL (pid $PORTAL_PID); PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}') on port $PG_PORT, database pediatrics"

# Every SQL step has a time limit too (DEMO_STEP_TIMEOUT seconds, default 300).
psql_db() { timeout "${DEMO_STEP_TIMEOUT:-300}" runuser -u postgres -- "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -d pediatrics "$@"; }
sql() { psql_db -At -c "$1"; }

# ---------------------------------------------------------------- practice
say "synthetic practice: $PATIENTS patients (setseed 0.42)"
psql_db -f "$WORK/reference_schema.sql" >/dev/null
psql_db -v patients="$PATIENTS" -f "$WORK/practice.sql" >/dev/null
sql "SELECT format(E'   %s patients (charts at privacy 1: %s, restricted 3-4: %s), %s appointments, %s visit notes, %s C-CDAs,\n'
                   '   %s immunizations, %s vitals, %s medications (privacy 2: %s, 3: %s), %s problems, %s allergies,\n'
                   '   %s lab results (preliminary %s, final %s, corrected %s, cancelled %s), %s insurance rows, %s PINs',
  (SELECT count(*) FROM ehr.patient), (SELECT count(*) FROM ehr.patient WHERE privacy_level = 1),
  (SELECT count(*) FROM ehr.patient WHERE privacy_level >= 3),
  (SELECT count(*) FROM ehr.appointment), (SELECT count(*) FROM ehr.visit_note), (SELECT count(*) FROM ehr.ccda_document),
  (SELECT count(*) FROM ehr.immunization), (SELECT count(*) FROM ehr.vital_sign),
  (SELECT count(*) FROM ehr.medication), (SELECT count(*) FROM ehr.medication WHERE privacy_level = 2),
  (SELECT count(*) FROM ehr.medication WHERE privacy_level = 3),
  (SELECT count(*) FROM ehr.problem), (SELECT count(*) FROM ehr.allergy),
  (SELECT count(*) FROM ehr.lab_result), (SELECT count(*) FROM ehr.lab_result WHERE status = 'preliminary'),
  (SELECT count(*) FROM ehr.lab_result WHERE status = 'final'), (SELECT count(*) FROM ehr.lab_result WHERE status = 'corrected'),
  (SELECT count(*) FROM ehr.lab_result WHERE status = 'cancelled'),
  (SELECT count(*) FROM ehr.insurance), (SELECT count(*) FROM ehr.pin))"

say "CREATE EXTENSION portal_sync, attach the 12 tables, sharing rules"
psql_db <<EOF >/dev/null
CREATE EXTENSION portal_sync;
\i $WORK/attach_reference.sql
UPDATE portal_sync.settings
   SET date_cutoff = (current_date - interval '3 years')::date, max_privacy_level = 1;
EOF
sql "SELECT format('   date_cutoff %s, max_privacy_level %s (1 = clinical staff); worker: %s', date_cutoff, max_privacy_level,
                   (SELECT state FROM portal_sync.status)) FROM portal_sync.settings"

# ---------------------------------------------------------------- draining
DRAIN_FAILED=0
drain() {	# $1: label; prints portal_sync.status every second until drained
	local start=$SECONDS t0 tick el line state pending snaps total last ready enrolled dead err
	printf '   %6s  %-12s %14s %17s %15s %21s %11s\n' time state pending_events pending_snapshots \
		delivered_total delivered_last_minute ready
	t0=$(date +%s.%N)
	tick=$t0
	while :; do
		el=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
		line=$(sql "SELECT s.state, s.pending_events, s.pending_snapshots, s.delivered_total,
		                   s.delivered_last_minute, (SELECT count(*) FROM portal_sync.patients WHERE ready),
		                   s.enrolled_patients, s.dead_letters, coalesce(s.last_error, '')
		            FROM portal_sync.status s" | tr '|' '\t') || line=""
		IFS=$'\t' read -r state pending snaps total last ready enrolled dead err <<<"$line" || true
		printf '   %5ss  %-12s %14s %17s %15s %21s %11s\n' "$el" "${state:-?}" \
			"${pending:-?}" "${snaps:-?}" "${total:-?}" "${last:-?}" "${ready:-?}/${enrolled:-?}"
		if [ "${pending:-x}" = 0 ] && [ "${snaps:-x}" = 0 ]; then
			echo "   $1: drained in ${el} s (dead letters: $dead${err:+; last error: $err})"
			return 0
		fi
		if [ $((SECONDS - start)) -ge "$DRAIN_TIMEOUT" ]; then
			echo "   $1: NOT drained after ${DRAIN_TIMEOUT} s (MISMATCH); last error: ${err:-none}"
			grep -E 'portal_sync|ERROR|FATAL|PANIC' "$WORK/server.log" | tail -n 5 | sed 's/^/   log: /' || true
			DRAIN_FAILED=1
			return 0
		fi
		# one line a second, whatever the query took
		tick=$(awk -v t="$tick" 'BEGIN { printf "%.3f", t + 1 }')
		sleep "$(awk -v t="$tick" -v now="$(date +%s.%N)" 'BEGIN { d = t - now; printf "%.3f", (d > 0 ? d : 0) }')"
	done
}

say "initiating events (front desk, providers, C-CDA generator, PINs, eligibility batch)"
psql_db -f "$WORK/events.sql" >/dev/null
sql "SELECT '   ' || string_agg(format('%s %s', label, n), ', ' ORDER BY o) FROM (
       SELECT o, label, count(DISTINCT patient_id) n FROM demo.event
       JOIN (VALUES (1, 'appointment', 'appointments scheduled'), (2, 'ccda', 'C-CDAs created'),
                    (3, 'note_enrolling', 'encounter/well notes signed'), (4, 'note_other', 'phone/nurse notes signed'),
                    (5, 'pin_op', 'EHR PINs'), (6, 'pin_portal', 'portal PINs'),
                    (7, 'insurance', 'insurance changes (not enrolled)')) v(o, event, label) USING (event)
       GROUP BY o, label) x"
sql "SELECT format('   enrolled now: %s patients; outbox: %s pending events, %s snapshots queued; skipped rows (patient NULL): %s',
                   enrolled_patients, pending_events, pending_snapshots, skipped_rows) FROM portal_sync.status"

say "delivery (portal_sync.status every second)"
drain "enrollment backlog"

say "incremental changes (vitals, flu shots, privacy raised, labs corrected, charts restricted, ...)"
psql_db -f "$WORK/changes.sql" >/dev/null
sql "SELECT '   ' || string_agg(format('%s %s', what, n), ', ') FROM demo.change"
drain "incremental changes"

# ---------------------------------------------------------------- summary
say "summary: database (SPEC 4 rules) against the portal (GET /_control/state)"
PRACTICE=$(sql "SELECT practice_id FROM portal_sync.settings")
as_pg "$PYTHON" "$WORK/portal_state.py" "$PORTAL_URL" "$PRACTICE" "$WORK/state"
psql_db -v statedir="$WORK/state" -f "$WORK/summary.sql" | tee "$WORK/summary.out"
if [ -s "$WORK/state/violations.txt" ]; then
	sed 's/^/    /' "$WORK/state/violations.txt"
fi
# wire bytes (BENCHMARKS.md): request bodies as sent / their JSON, whole run
"$PYTHON" - "$PORTAL_URL" <<'EOPY'
import json, sys, urllib.request
reqs = json.load(urllib.request.urlopen(sys.argv[1] + '/_control/requests'))
wire = sum(r.get('bytes') or 0 for r in reqs)
plain = sum(r.get('json_bytes') or 0 for r in reqs)
print('  wire bytes: %d requests, %d bytes of JSON sent as %d (%.3f, 1/%.1f)'
      % (len(reqs), plain, wire, wire / max(plain, 1), plain / max(wire, 1)))
EOPY
sql "SELECT format('  status: state %s, delivered_total %s, dead_letters %s, skipped_rows %s, consecutive_failures %s%s',
                   state, delivered_total, dead_letters, skipped_rows, consecutive_failures,
                   coalesce(', last_error ' || last_error, '')) FROM portal_sync.status"

echo
if [ "$DRAIN_FAILED" = 0 ] && ! grep -q MISMATCH "$WORK/summary.out"; then
	echo "RESULT: OK ($((SECONDS - T0)) s)"
	exit 0
else
	echo "RESULT: MISMATCH ($((SECONDS - T0)) s)"
	exit 1
fi
