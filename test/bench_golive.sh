#!/usr/bin/env bash
# Go-live benchmark of portal_sync (a benchmark, not a test: it prints
# figures and exits 0 whatever they are; non-zero only if it cannot run).
# Measures, as BENCHMARKS.md defines them:
#
#   go-live, chart-only  5,000 patients with only a chart row (ehr.patient;
#                        every other source of the reference schema attached,
#                        empty for them), enrolled in one statement; patients
#                        per second from the start of that statement until
#                        all 5,000 are ready in portal_sync.patients
#                        (bar >= 5,000 patients/s).
#   go-live, items       1,000 patients, each with 100 shareable items spread
#                        over 5 clinical sources (medication, allergy,
#                        problem, immunization, lab_result), enrolled in one
#                        statement; items per second from the start of that
#                        statement until all 1,000 are ready
#                        (bar >= 150,000 items/s).
#   set-based limit      (no bar) beside every go-live round, on the same
#                        server and the same patients, just before they are
#                        enrolled: the time of one
#                          COPY (SELECT to_json(t) FROM <source> t
#                                WHERE <patient col> = ANY('{<ids>}')) TO '/dev/null'
#                        per attached source (every table in
#                        portal_sync.sources), summed; printed as rows/s, and
#                        the ratio = limit time / go-live time, i.e. the
#                        go-live's rows/s as a fraction of the limit's over
#                        the same rows.
#   enroll -> ready      one patient enrolled on an idle system (outbox empty,
#                        then 1 s of quiet) while another connection is
#                        already sleeping in portal_sync.wait_ready(patient,
#                        '30 s'); milliseconds from clock_timestamp() taken by
#                        the enrolling session in the statement just before
#                        its (autocommit) enroll statement, to
#                        clock_timestamp() taken by the waiting session right
#                        after wait_ready returned true (both server clocks;
#                        so the enroll statement, its commit and the
#                        snapshot's delivery are all included).  Median of 5,
#                        for a patient with 100 items and for a chart-only
#                        patient (bar <= 20 ms).
#   worker memory        peak RssAnon of the delivery worker (/proc/PID/status,
#                        sampled every 100 ms) over the whole run: the
#                        go-live and enroll -> ready phases and the quiet
#                        between them (bar <= 64 MiB).
#
# Both go-live figures are medians of 3 rounds, fresh patients each round;
# every round, the spread (min-max) and the load average are printed.
# "Ready" is polled every BENCH_POLL_MS (20) in a procedure that commits
# between polls (on portal_sync.enrollment, with the view's definition of
# ready, confirmed by the view), so a go-live time is late by at most one
# poll interval plus one poll.  Printed beside it as cross-checks: the last
# snapshot_accepted_at, and the number of polls and the time they took.
#
# The sink is nginx on loopback (answers every POST 200 '{}', reading and
# discarding the whole body; a status-only access log, buffered, so that
# failed requests are counted by the sink too).
#
# Usage (with portal_sync installed: the package, or `make install`), as
# root or as postgres:
#   bash test/bench_golive.sh [--quick]
# Environment:
#   BENCH_QUICK=1              same as --quick: 1,000 chart-only and 200 item
#                              patients per round, 1 round
#   BENCH_CHART_PATIENTS       chart-only patients per round (default 5000)
#   BENCH_ITEM_PATIENTS        item patients per round (default 1000)
#   BENCH_ITEMS                shareable items per item patient, a multiple
#                              of 5 (default 100)
#   BENCH_ROUNDS               go-live rounds of each kind (default 3)
#   BENCH_READY_ROUNDS         enroll -> ready rounds of each kind (default 5)
#   BENCH_POLL_MS              readiness poll interval (default 20)
#   BENCH_TIMEOUT              give up a go-live round after this many
#                              seconds (default 300)
#   BENCH_PORT                 port of the throwaway server (default 54341;
#                              unix socket only)
#   BENCH_SHARED_BUFFERS       default 256MB
#   BENCH_KEEP=1               keep the work directory (cluster, logs)
#   PORTAL_SYNC_SKIP_PACKAGES=1  skip the Debian package check (root only)
#   PG_CONFIG                  default /usr/lib/postgresql/15/bin/pg_config
#   NGINX                      default /usr/sbin/nginx
#   PYTHON                     default python3 (finds a free port)
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
NGINX=${NGINX:-/usr/sbin/nginx}

for arg in "$@"; do
	case "$arg" in
		--quick) BENCH_QUICK=1 ;;
		-h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "bench_golive: unknown argument $arg" >&2; exit 2 ;;
	esac
done
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
	CHART_PATIENTS=${BENCH_CHART_PATIENTS:-1000}
	ITEM_PATIENTS=${BENCH_ITEM_PATIENTS:-200}
	ROUNDS=${BENCH_ROUNDS:-1}
else
	CHART_PATIENTS=${BENCH_CHART_PATIENTS:-5000}
	ITEM_PATIENTS=${BENCH_ITEM_PATIENTS:-1000}
	ROUNDS=${BENCH_ROUNDS:-3}
fi
ITEMS=${BENCH_ITEMS:-100}
READY_ROUNDS=${BENCH_READY_ROUNDS:-5}
POLL_MS=${BENCH_POLL_MS:-20}
TIMEOUT=${BENCH_TIMEOUT:-300}
PORT=${BENCH_PORT:-54341}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-256MB}

die() { echo "bench_golive: $*" >&2; exit 1; }

# Every number below ends up in SQL text: only plain unsigned integers.
for v in CHART_PATIENTS ITEM_PATIENTS ITEMS ROUNDS READY_ROUNDS POLL_MS TIMEOUT PORT; do
	[[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "$v must be a positive integer (is '${!v}')"
done
[ $((ITEMS % 5)) -eq 0 ] || die "BENCH_ITEMS must be a positive multiple of 5"
[[ $SHARED_BUFFERS =~ ^[0-9]+(kB|MB|GB)?$ ]] || die "BENCH_SHARED_BUFFERS must look like 256MB"

# ---------------------------------------------------------------- packages
if [ "$(id -u)" -eq 0 ] && [ "${PORTAL_SYNC_SKIP_PACKAGES:-0}" != 1 ]; then
	# install_packages LOG PACKAGE...
	. "$SRC_DIR/test/lib/packages.sh"
	PACKAGES=(python3 procps)
	[ "$NGINX" = /usr/sbin/nginx ] && PACKAGES+=(nginx-light)
	echo "== packages"
	install_packages "${TMPDIR:-/tmp}/portal_sync-apt-bench.log" "${PACKAGES[@]}"
fi
PYTHON=${PYTHON:-$(command -v python3 || true)}

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (install postgresql-server-dev-15)"
BINDIR=$("$PG_CONFIG" --bindir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
[ -f "$SHAREDIR/extension/portal_sync.control" ] && [ -f "$PKGLIBDIR/portal_sync.so" ] ||
	die "portal_sync is not installed: install the package (README: Installing the package) or run 'make install' first"
[ -f "$SRC_DIR/test/reference_schema.sql" ] || die "test/reference_schema.sql missing"
[ -f "$SRC_DIR/test/attach_reference.sql" ] || die "test/attach_reference.sql missing"
[ -x "$NGINX" ] || die "$NGINX not found (apt-get install nginx-light)"
[ -n "$PYTHON" ] || die "python3 not found"

# The server, its clients and nginx run as postgres (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
	id postgres >/dev/null 2>&1 || die "no postgres user"
	as_pg() { runuser -u postgres -- "$@"; }
elif [ "$(id -un)" = postgres ]; then
	as_pg() { "$@"; }
else
	die "run as root or as postgres"
fi

# Patients, by id:
#   1 .. NC                       chart-only go-live rounds (round r: CHART_PATIENTS each)
#   NC+1 .. NC+READY_ROUNDS       chart-only enroll -> ready patients
#   I0+1 .. I0+NI                 item go-live rounds (round r: ITEM_PATIENTS each)
#   I0+NI+1 .. I0+NI+READY_ROUNDS item enroll -> ready patients
# The item patients (the last NI + READY_ROUNDS) have ITEMS items each,
# PER_SOURCE in each of 5 clinical sources; nobody has anything else.
NC=$((CHART_PATIENTS * ROUNDS))
I0=$((NC + READY_ROUNDS))
NI=$((ITEM_PATIENTS * ROUNDS))
NIP=$((NI + READY_ROUNDS))		# patients with items
TOTAL_PATIENTS=$((I0 + NIP))
PER_SOURCE=$((ITEMS / 5))
NITEMS=$((NIP * PER_SOURCE))	# rows per clinical source

WORK=$(mktemp -d /tmp/portal_sync-bench-golive.XXXXXX)
chmod 755 "$WORK"
DATA=$WORK/data
NGX=$WORK/nginx
mkdir -p "$NGX"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK"
SAMPLER_PID=
WAITER_PID=

cleanup() {
	[ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
	[ -n "$WAITER_PID" ] && kill "$WAITER_PID" 2>/dev/null || true
	if [ -s "$NGX/nginx.pid" ]; then
		kill "$(cat "$NGX/nginx.pid")" 2>/dev/null || true
	fi
	if [ -f "$DATA/postmaster.pid" ]; then
		as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 ||
			as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
	fi
	if [ "${BENCH_KEEP:-0}" = 1 ]; then
		echo "work directory kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "$SRC_DIR/test/reference_schema.sql" "$SRC_DIR/test/attach_reference.sql" "$WORK/"
[ "$(id -u)" -eq 0 ] && chown postgres: "$WORK"/*.sql

server_failed() {
	echo "--- tail of the server log:" >&2
	tail -n 30 "$WORK/server.log" >&2 || true
	die "$1 failed"
}
psql_bench() { as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -d bench "$@"; }
q() { psql_bench -Atc "$1"; }		# one value (constant SQL only)
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {
	if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
spread() { printf '%s\n' "$@" | sort -g | awk -v f="${SPREAD_FMT:-%.0f}" 'NR == 1 { lo = $1 } { hi = $1 }
	END { if (NR == 0) print "-"; else printf f "-" f "\n", lo, hi }'; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
load() { echo "load $(cut -d' ' -f1 /proc/loadavg)"; }
set_phase() { echo "$1" >"$WORK/phase.tmp" && mv -f "$WORK/phase.tmp" "$WORK/phase"; }
idle_wait() { # what: wait until the outbox is empty, then CHECKPOINT
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 300, false)" -c "CHECKPOINT" >/dev/null ||
		server_failed "waiting before $1"
}

# ---------------------------------------------------------------- sink
NGINX_PORT=$(free_port)
NGINX_URL="http://127.0.0.1:$NGINX_PORT/events"
mkdir -p "$NGX/client_body" "$NGX/proxy" "$NGX/fastcgi" "$NGX/uwsgi" "$NGX/scgi"
cat >"$NGX/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 256; }
http {
	log_format status_only '\$status \$request_length';
	access_log $NGX/access.log status_only buffer=64k flush=1s;
	client_body_temp_path $NGX/client_body;
	proxy_temp_path $NGX/proxy;
	fastcgi_temp_path $NGX/fastcgi;
	uwsgi_temp_path $NGX/uwsgi;
	scgi_temp_path $NGX/scgi;
	client_max_body_size 100m;
	client_body_buffer_size 16m;
	keepalive_requests 10000000;
	keepalive_timeout 300s;
	default_type application/json;
	server {
		listen 127.0.0.1:$NGINX_PORT;
		location / { return 200 '{}'; }
	}
}
EOF
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$NGX"
as_pg "$NGINX" -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/error.log" ||
	{ cat "$NGX/error.log" >&2; die "nginx did not start"; }
nginx_lines() { # flush the buffered access log, then count its lines
	kill -USR1 "$(cat "$NGX/nginx.pid")" 2>/dev/null || true
	sleep 0.5
	if [ -f "$NGX/access.log" ]; then wc -l <"$NGX/access.log"; else echo 0; fi
}

# ---------------------------------------------------------------- server
echo "== throwaway cluster in $DATA (port $PORT, unix socket only); nginx sink on 127.0.0.1:$NGINX_PORT"
as_pg "$BINDIR/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 ||
	{ cat "$WORK/initdb.log"; die "initdb failed"; }
cat >>"$DATA/postgresql.conf" <<EOF

# bench_golive.sh
shared_preload_libraries = 'portal_sync'
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
shared_buffers = $SHARED_BUFFERS
max_wal_size = 8GB
checkpoint_timeout = 30min
jit = off
logging_collector = off
log_line_prefix = '%m [%p] %b '
portal_sync.endpoint = '$NGINX_URL'
EOF
as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w start >/dev/null ||
	{ cat "$WORK/server.log"; die "server did not start"; }
as_pg "$BINDIR/createdb" -h "$WORK" -p "$PORT" bench
PMPID=$(head -n1 "$DATA/postmaster.pid")

# ---------------------------------------------------------------- schema
echo "== reference schema; $TOTAL_PATIENTS patients: $((NC + READY_ROUNDS)) chart-only, $NIP with $ITEMS shareable items each ($PER_SOURCE in each of 5 clinical sources)"
psql_bench -f "$WORK/reference_schema.sql" >/dev/null
psql_bench -v total="$TOTAL_PATIENTS" -v i0="$I0" -v nip="$NIP" -v nitems="$NITEMS" \
	-v attach="$WORK/attach_reference.sql" <<'EOF' >/dev/null || server_failed "setup"
SET client_min_messages = warning;
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex, guardian_name,
                         guardian_phone, primary_provider)
SELECT g, 'MRN' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g,
       date '2010-01-01' + g % 5000, (ARRAY['F','M'])[1 + g % 2], 'Guardian ' || g,
       '555-01' || lpad((g % 100)::text, 2, '0'), 'Dr. Provider ' || (g % 12)
FROM generate_series(1, :total) g;

CREATE EXTENSION portal_sync;
\i :attach

-- Shareable items of the item patients (i0+1 .. i0+nip), inserted before
-- anyone is enrolled (so nothing queued); rows made as bench_delivery.sh does.
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency,
                            start_date, status, prescriber, privacy_level)
SELECT :i0 + 1 + (g - 1) % :nip, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text,
       '250 mg/5 mL', 'oral', 'BID x 10 days', date '2015-01-01' + g % 3000,
       'active', 'Dr. Provider ' || (g % 12), 0
FROM generate_series(1, :nitems) g;
INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status, recorded_at)
SELECT :i0 + 1 + (g - 1) % :nip, 'allergen ' || (g % 53), 'hives',
       (ARRAY['mild','moderate','severe'])[1 + g % 3], date '2012-01-01' + g % 3000,
       'active', date '2015-01-01' + g % 3000
FROM generate_series(1, :nitems) g;
INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, noted_on)
SELECT :i0 + 1 + (g - 1) % :nip, 'problem ' || (g % 211), 'J0' || (g % 10),
       date '2012-01-01' + g % 3000, 'active', date '2015-01-01' + g % 3000
FROM generate_series(1, :nitems) g;
INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on,
                              lot_number, site, administered_by)
SELECT :i0 + 1 + (g - 1) % :nip, 'DTaP', (20 + g % 30)::text, 1 + g % 5,
       date '2015-01-01' + g % 3000, 'LOT' || (g % 1000), 'left thigh', 'RN ' || (g % 7)
FROM generate_series(1, :nitems) g;
INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units,
                            reference_range, abnormal_flag, status, result_date)
SELECT :i0 + 1 + (g - 1) % :nip, 'ORD' || g, 'Hemoglobin', '718-7', (10 + g % 50 / 10.0)::text,
       'g/dL', '11.5-15.5', 'N', 'final', date '2015-01-01' + g % 3000
FROM generate_series(1, :nitems) g;

CREATE SCHEMA bench;

-- Wait, in a procedure that commits between polls (so that it holds no
-- snapshot back from vacuum), until the outbox is empty; seconds since t0,
-- or -1 after timeout.
CREATE PROCEDURE bench.wait_outbox_empty(t0 timestamptz, timeout float8, progress boolean,
                                         INOUT secs float8 DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    el float8;
    next_report float8 := 10;
BEGIN
    LOOP
        el := extract(epoch FROM clock_timestamp() - t0);
        IF (SELECT min(seq) FROM portal_sync.outbox) IS NULL THEN
            secs := el;
            RETURN;
        END IF;
        IF el > timeout THEN
            secs := -1;
            RETURN;
        END IF;
        IF progress AND el >= next_report THEN
            RAISE NOTICE 'waiting: % s, % events pending', round(el::numeric, 1),
                (SELECT pending_events FROM portal_sync.status);
            next_report := next_report + 10;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;

-- Same, until patients lo..hi are all ready, polling every poll_ms.  A
-- poll counts portal_sync.enrollment rows with snapshot_accepted_at set and
-- not purged: that is the whole definition of ready in portal_sync.patients
-- (and what is_ready() and wait_ready() check), without the view's scan of
-- the outbox's enrollment requests, which costs more as the outbox grows.
-- When a poll sees them all, the view must say so too (else polling goes
-- on).  secs: seconds from t0 to the start of the first poll that saw them
-- all (its snapshot), or -1 after timeout; polls and poll_secs: how many
-- polls, and the time spent in them.
CREATE PROCEDURE bench.wait_ready(lo int, hi int, t0 timestamptz, timeout float8, poll_ms int,
                                  INOUT secs float8 DEFAULT NULL, INOUT polls int DEFAULT 0,
                                  INOUT poll_secs float8 DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    el float8;
    p0 timestamptz;
    n bigint;
BEGIN
    LOOP
        p0 := clock_timestamp();
        n := (SELECT count(*) FROM portal_sync.enrollment e
              WHERE e.patient_id::int BETWEEN lo AND hi
                AND e.snapshot_accepted_at IS NOT NULL AND NOT e.purged);
        polls := polls + 1;
        poll_secs := poll_secs + extract(epoch FROM clock_timestamp() - p0);
        IF n = hi - lo + 1 AND
           (SELECT count(*) FROM portal_sync.patients p
            WHERE p.ready AND p.patient_id::int BETWEEN lo AND hi) = hi - lo + 1 THEN
            secs := extract(epoch FROM p0 - t0);
            RETURN;
        END IF;
        el := extract(epoch FROM clock_timestamp() - t0);
        IF el > timeout THEN
            secs := -1;
            RETURN;
        END IF;
        COMMIT;
        PERFORM pg_sleep(poll_ms / 1000.0);
    END LOOP;
END
$$;

-- Requests logged since t0: count, events, failed (not 200 or not accepted).
CREATE FUNCTION bench.log_since(t0 timestamptz, OUT requests bigint, OUT events bigint,
                                OUT failed bigint, OUT first_sent float8, OUT last_accepted float8)
LANGUAGE sql AS $$
    SELECT count(*), coalesce(sum(events), 0),
           count(*) FILTER (WHERE http_status IS DISTINCT FROM 200 OR accepted_at IS NULL),
           extract(epoch FROM min(sent_at) - t0), extract(epoch FROM max(accepted_at) - t0)
    FROM portal_sync.delivery_log WHERE sent_at >= t0
$$;

-- The set-based limit for patients lo..hi: for every attached source,
--   COPY (SELECT to_json(t) FROM <source> t WHERE t.<patient col> = ANY('{ids}'::<type>[]))
--   TO '/dev/null'
-- (identifiers from the catalog, quoted; the id list a literal of the
-- column's type).  The statements are built first; secs is the wall time
-- of running them all.  rows: rows written; chart_rows: those of the
-- 'patient' sources.
CREATE FUNCTION bench.set_based_limit(lo int, hi int, OUT secs float8, OUT rows bigint,
                                      OUT chart_rows bigint, OUT tables int)
LANGUAGE plpgsql AS $$
DECLARE
    ids text := (SELECT array_agg(g ORDER BY g)::text FROM generate_series(lo, hi) g);
    stmts text[];
    kinds text[];
    t0 timestamptz;
    n bigint;
BEGIN
    SELECT array_agg(format('COPY (SELECT to_json(t) FROM %s t WHERE t.%I = ANY(%L::%s[])) TO %L',
                            s.source, s.patient_col, ids,
                            format_type(a.atttypid, a.atttypmod), '/dev/null')
                     ORDER BY s.source::text),
           array_agg(s.kind ORDER BY s.source::text)
      INTO stmts, kinds
      FROM portal_sync.sources s
      JOIN pg_attribute a ON a.attrelid = s.source AND a.attname = s.patient_col;
    rows := 0;
    chart_rows := 0;
    tables := cardinality(stmts);
    t0 := clock_timestamp();
    FOR i IN 1 .. tables LOOP
        EXECUTE stmts[i];
        GET DIAGNOSTICS n = ROW_COUNT;
        rows := rows + n;
        IF kinds[i] = 'patient' THEN
            chart_rows := chart_rows + n;
        END IF;
    END LOOP;
    secs := extract(epoch FROM clock_timestamp() - t0);
END
$$;
EOF
psql_bench -c "VACUUM ANALYZE" >/dev/null

# The worker, and a sampler of its RssAnon every 100 ms (tagged with the
# phase; it finds the worker again if its pid changes).
for _ in $(seq 1 100); do
	WPID=$(q "SELECT worker_pid FROM portal_sync.status")
	[ -n "$WPID" ] && break
	sleep 0.2
done
[ -n "$WPID" ] || server_failed "waiting for the delivery worker"
set_phase idle
sampler() {
	local pid=$1 newpid phase k v _
	echo "pid $pid"
	while :; do
		if [ ! -r "/proc/$pid/status" ]; then
			newpid=$(pgrep -P "$PMPID" -f 'portal_sync worker' | head -n1 || true)
			if [ -n "$newpid" ]; then pid=$newpid; echo "pid $pid"; fi
		fi
		read -r phase <"$WORK/phase" || phase=unknown
		while read -r k v _; do
			if [ "$k" = RssAnon: ]; then echo "$phase $v"; break; fi
		done <"/proc/$pid/status" 2>/dev/null || true
		sleep 0.1
	done
}
sampler "$WPID" >"$WORK/rss.log" 2>/dev/null &
SAMPLER_PID=$!
peak_kb() { # phase... : peak RssAnon in kB over those phases
	awk -v phases=" $* " 'index(phases, " " $1 " ") && $2 + 0 > m { m = $2 + 0 } END { print m + 0 }' "$WORK/rss.log"
}
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# ---------------------------------------------------------------- machine
echo
echo "== machine and settings"
echo "cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "os: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "sink: $("$NGINX" -v 2>&1 | sed 's/.*: //'), 1 worker process, loopback"
echo "libcurl: $(curl --version 2>/dev/null | head -n1 | cut -d' ' -f1-2 || echo '?')"
psql_bench -At <<'EOF'
SELECT version();
SELECT format('%s = %s', name, current_setting(name))
FROM pg_settings
WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'wal_level',
               'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'jit',
               'shared_preload_libraries', 'work_mem')
   OR (name LIKE 'portal_sync.%' AND name NOT LIKE '%token%')
ORDER BY name;
SELECT format('portal_sync %s; %s sources attached; %s patients; worker pid %s (%s)',
              (SELECT extversion FROM pg_extension WHERE extname = 'portal_sync'),
              (SELECT count(*) FROM portal_sync.sources),
              (SELECT count(*) FROM ehr.patient),
              worker_pid, state)
FROM portal_sync.status;
EOF
echo "worker RssAnon at start: $(awk '/RssAnon/ {print $2, $3}' "/proc/$WPID/status" 2>/dev/null || echo '?')"

# ---------------------------------------------------------------- go-live
TIMED_OUT=0
FAILED_REQ=0
golive_round() { # kind(chart|items) round lo hi units-per-patient
	local kind=$1 r=$2 lo=$3 hi=$4 per=$5 out
	local l_secs l_rows l_chart l_tables secs enroll_secs enrolled requests events failed last_acc polls poll_secs
	local n=$((hi - lo + 1)) units rate l_rate ratio
	idle_wait "$kind round $r"
	set_phase limit
	out=$(psql_bench -At -v lo="$lo" -v hi="$hi" <<'EOF'
SELECT format('%s|%s|%s|%s', secs, rows, chart_rows, tables) FROM bench.set_based_limit(:lo, :hi);
EOF
	) || server_failed "set-based limit, $kind round $r"
	IFS='|' read -r l_secs l_rows l_chart l_tables <<<"$out"
	set_phase "$kind"
	out=$(psql_bench -At -v lo="$lo" -v hi="$hi" -v timeout="$TIMEOUT" -v poll="$POLL_MS" <<'EOF'
\set QUIET on
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) FILTER (WHERE portal_sync.enroll(patient_id::text)) AS enrolled
FROM ehr.patient WHERE patient_id BETWEEN :lo AND :hi \gset
SELECT extract(epoch FROM clock_timestamp() - :'t0') AS enroll_secs \gset
CALL bench.wait_ready(:lo, :hi, :'t0', :timeout, :poll) \gset
SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s', :secs, :enroll_secs, :enrolled, requests, events, failed,
              (SELECT coalesce(extract(epoch FROM max(p.snapshot_accepted_at) - :'t0')::text, '-')
               FROM portal_sync.patients p WHERE p.patient_id::int BETWEEN :lo AND :hi),
              :polls, :poll_secs)
FROM bench.log_since(:'t0');
EOF
	) || server_failed "$kind round $r"
	set_phase idle
	IFS='|' read -r secs enroll_secs enrolled requests events failed last_acc polls poll_secs <<<"$out"
	FAILED_REQ=$((FAILED_REQ + failed))
	units=$((n * per))
	l_rate=$(awk -v r="$l_rows" -v s="$l_secs" 'BEGIN { printf "%.0f", (s > 0) ? r / s : 0 }')
	if [ "$secs" = -1 ]; then
		TIMED_OUT=1
		rate=0
		ratio=0
		printf '   round %d: NOT all ready after %s s (%s enrolled); limit %s rows in %.3f s; %s\n' \
			"$r" "$TIMEOUT" "$enrolled" "$l_rows" "$l_secs" "$(load)"
	else
		rate=$(awk -v u="$units" -v s="$secs" 'BEGIN { printf "%.0f", u / s }')
		ratio=$(awk -v l="$l_secs" -v s="$secs" 'BEGIN { printf "%.4f", l / s }')
		printf '   round %d: patients %d..%d ready in %.3f s = %s %s/s (enroll statement %.3f s, last snapshot_accepted_at +%.3f s; %s requests, %s events, %s failed)\n' \
			"$r" "$lo" "$hi" "$secs" "$rate" "$([ "$kind" = chart ] && echo patients || echo items)" \
			"$enroll_secs" "$last_acc" "$requests" "$events" "$failed"
		printf '            readiness polled %s times, %.1f ms per poll (%.1f%% of the round)\n' \
			"$polls" "$(awk -v s="$poll_secs" -v n="$polls" 'BEGIN { print s * 1000 / n }')" \
			"$(awk -v p="$poll_secs" -v s="$secs" 'BEGIN { print p * 100 / s }')"
		printf '            limit: %s rows (%s chart, %s items) from %s sources in %.3f s = %s rows/s; ratio %.4f; %s\n' \
			"$l_rows" "$l_chart" "$((l_rows - l_chart))" "$l_tables" "$l_secs" "$l_rate" "$ratio" "$(load)"
	fi
	[ "$enrolled" = "$n" ] || echo "   NOTE: $enrolled of $n patients newly enrolled"
	# the limit must have read exactly the round's rows: n chart rows, and
	# units items for an item round (none for a chart-only one)
	local want_items=$units
	[ "$kind" = chart ] && want_items=0
	if [ "$l_chart" != "$n" ] || [ $((l_rows - l_chart)) -ne "$want_items" ]; then
		echo "   NOTE: the limit read $l_chart chart rows and $((l_rows - l_chart)) others, not $n and $want_items"
	fi
	RATES+=("$rate")
	LRATES+=("$l_rate")
	RATIOS+=("$ratio")
}

echo
echo "== go-live, chart-only: $ROUNDS rounds, each enrolling $CHART_PATIENTS fresh chart-only patients in one statement (sink: nginx); $(load)"
RATES=() LRATES=() RATIOS=()
for ((r = 1; r <= ROUNDS; r++)); do
	golive_round chart "$r" $(((r - 1) * CHART_PATIENTS + 1)) $((r * CHART_PATIENTS)) 1
done
C_RATE=$(median "${RATES[@]}") C_SPREAD=$(spread "${RATES[@]}")
C_LRATE=$(median "${LRATES[@]}") C_LSPREAD=$(spread "${LRATES[@]}")
C_RATIO=$(median "${RATIOS[@]}") C_RSPREAD=$(SPREAD_FMT=%.4f spread "${RATIOS[@]}")
printf '   median %s patients/s (spread %s); limit median %s rows/s (spread %s); ratio median %.4f (spread %s)\n' \
	"$C_RATE" "$C_SPREAD" "$C_LRATE" "$C_LSPREAD" "$C_RATIO" "$C_RSPREAD"

echo
echo "== go-live, items: $ROUNDS rounds, each enrolling $ITEM_PATIENTS fresh patients x $ITEMS items in one statement (sink: nginx); $(load)"
RATES=() LRATES=() RATIOS=()
for ((r = 1; r <= ROUNDS; r++)); do
	golive_round items "$r" $((I0 + (r - 1) * ITEM_PATIENTS + 1)) $((I0 + r * ITEM_PATIENTS)) "$ITEMS"
done
I_RATE=$(median "${RATES[@]}") I_SPREAD=$(spread "${RATES[@]}")
I_LRATE=$(median "${LRATES[@]}") I_LSPREAD=$(spread "${LRATES[@]}")
I_RATIO=$(median "${RATIOS[@]}") I_RSPREAD=$(SPREAD_FMT=%.4f spread "${RATIOS[@]}")
printf '   median %s items/s (spread %s); limit median %s rows/s (spread %s); ratio median %.4f (spread %s)\n' \
	"$I_RATE" "$I_SPREAD" "$I_LRATE" "$I_LSPREAD" "$I_RATIO" "$I_RSPREAD"

# ---------------------------------------------------------------- enroll -> ready
# Timed: from clock_timestamp() in the enrolling session's statement just
# before its autocommit `SELECT portal_sync.enroll(id)`, to clock_timestamp()
# in the waiting session evaluated right after wait_ready(id) returned (an
# OFFSET 0 subquery makes wait_ready run first).  The waiter is already
# asleep in wait_ready (pg_stat_activity shows wait_event_type Extension)
# before the enroll is sent; connecting is not timed.
ready_round() { # patient-id
	local pid=$1 out t0 t2 ok t1 n
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 120, false)" >/dev/null ||
		server_failed "waiting before enroll -> ready"
	sleep 1
	as_pg env PGAPPNAME=bench_waiter "$BINDIR/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -d bench \
		-v pid="$pid" >"$WORK/waiter.out" 2>"$WORK/waiter.err" <<'EOF' &
SELECT format('%s|%s', ok, extract(epoch FROM clock_timestamp()))
FROM (SELECT portal_sync.wait_ready(:'pid', interval '30 s') AS ok OFFSET 0) w;
EOF
	WAITER_PID=$!
	n=0
	for _ in $(seq 1 200); do
		n=$(q "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bench_waiter'
		       AND state = 'active' AND wait_event_type = 'Extension'")
		[ "$n" = 1 ] && break
		sleep 0.02
	done
	[ "$n" = 1 ] || { cat "$WORK/waiter.err" >&2; server_failed "starting wait_ready for patient $pid"; }
	out=$(psql_bench -At -v pid="$pid" <<'EOF'
SELECT extract(epoch FROM clock_timestamp());
SELECT portal_sync.enroll(:'pid');
SELECT extract(epoch FROM clock_timestamp());
EOF
	) || server_failed "enrolling patient $pid"
	{ read -r t0; read -r _; read -r t2; } <<<"$out"
	wait "$WAITER_PID" || { cat "$WORK/waiter.err" >&2; server_failed "wait_ready for patient $pid"; }
	WAITER_PID=
	IFS='|' read -r ok t1 <"$WORK/waiter.out"
	if [ "$ok" = t ]; then
		READY_MS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) * 1000 }')
	else
		READY_MS=30000
	fi
	ENROLL_MS=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.2f", (b - a) * 1000 }')
}

echo
echo "== enroll -> ready: $READY_ROUNDS patients of each kind, one at a time on an idle system, wait_ready on another connection; $(load)"
set_phase ready
R_ITEMS=() R_CHART=()
for ((r = 1; r <= READY_ROUNDS; r++)); do
	p=$((I0 + NI + r))
	ready_round "$p"
	printf '   %d items, patient %d: ready after %7.2f ms (enroll statement incl. commit %.2f ms)%s; %s\n' \
		"$ITEMS" "$p" "$READY_MS" "$ENROLL_MS" "$([ "$READY_MS" = 30000 ] && echo ' NOT READY after 30 s')" "$(load)"
	R_ITEMS+=("$READY_MS")
	p=$((NC + r))
	ready_round "$p"
	printf '   chart-only, patient %d: ready after %7.2f ms (enroll statement incl. commit %.2f ms)%s; %s\n' \
		"$p" "$READY_MS" "$ENROLL_MS" "$([ "$READY_MS" = 30000 ] && echo ' NOT READY after 30 s')" "$(load)"
	R_CHART+=("$READY_MS")
done
set_phase idle
RI_MED=$(median "${R_ITEMS[@]}") RI_SPREAD=$(SPREAD_FMT=%.2f spread "${R_ITEMS[@]}")
RC_MED=$(median "${R_CHART[@]}") RC_SPREAD=$(SPREAD_FMT=%.2f spread "${R_CHART[@]}")
printf '   median %.2f ms with %d items (spread %s), %.2f ms chart-only (spread %s)\n' \
	"$RI_MED" "$ITEMS" "$RI_SPREAD" "$RC_MED" "$RC_SPREAD"

# ---------------------------------------------------------------- memory
sleep 0.3
END_RSS=$(tail -n 1 "$WORK/rss.log" | awk '{ print $2 }')
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
echo
echo "== worker memory (RssAnon, sampled every 100 ms; $(grep -c -v '^pid' "$WORK/rss.log") samples)"
for ph in idle limit chart items ready; do
	printf '   %-9s peak %7s MiB\n' "$ph" "$(mb "$(peak_kb "$ph")")"
done
echo "   at the end (idle) $(mb "${END_RSS:-0}") MiB"
PIDS=$(grep -c '^pid' "$WORK/rss.log" || true)
[ "$PIDS" -le 1 ] || echo "   NOTE: the worker's pid changed $((PIDS - 1)) time(s) during the run (crash or restart): $(grep '^pid' "$WORK/rss.log" | tr '\n' ' ')"
MEM_KB=$(peak_kb idle limit chart items ready)	# the whole run: the worker keeps what it grew to

# ---------------------------------------------------------------- sink and server log
NGX_REQ=$(nginx_lines)
NGX_NON200=$(awk '$1 != 200' "$NGX/access.log" 2>/dev/null | wc -l)
echo
echo "== sink: nginx logged $NGX_REQ requests, $NGX_NON200 not 200; delivery_log: $FAILED_REQ failed requests in the go-live rounds"
echo "== server log: $(grep -cE ' (ERROR|FATAL|PANIC|WARNING): ' "$WORK/server.log" || true) ERROR/FATAL/PANIC/WARNING lines"
grep -E ' (ERROR|FATAL|PANIC|WARNING): ' "$WORK/server.log" | sed -E 's/^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] //' |
	sort | uniq -c | sort -rn | head -n 10 || true
NGX_ERR=$(grep -cE '\[(error|crit|alert|emerg)\]' "$NGX/error.log" 2>/dev/null || true)
echo "nginx error log: ${NGX_ERR:-0} error lines$([ "${NGX_ERR:-0}" -gt 0 ] && echo ": $(grep -E '\[(error|crit|alert|emerg)\]' "$NGX/error.log" | head -n 3)")"
FAILED=$((FAILED_REQ + NGX_NON200))

# ---------------------------------------------------------------- figures
verdict() { awk -v v="$1" -v op="$2" -v bar="$3" 'BEGIN {
	ok = (op == ">=") ? (v >= bar) : (v <= bar); print ok ? "met" : "MISSED" }'; }
golive_verdict() { # value bar
	if [ "$TIMED_OUT" = 1 ]; then echo "MISSED (a round timed out)"
	elif [ "$FAILED" -gt 0 ]; then echo "MISSED ($FAILED failed requests)"
	else verdict "$1" ">=" "$2"; fi
}
echo
echo "== figures; load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-26s %-20s %-22s %-13s %s\n' figure median spread bar verdict
printf '%-26s %-20s %-22s %-13s %s\n' "go-live, chart-only" "$C_RATE patients/s" "$C_SPREAD" ">= 5000/s" \
	"$(golive_verdict "$C_RATE" 5000)"
printf '%-26s %-20s %-22s %-13s %s\n' "  set-based limit" "$C_LRATE rows/s" "$C_LSPREAD" "-" "-"
printf '%-26s %-20s %-22s %-13s %s\n' "  ratio to the limit" "$(printf '%.4f' "$C_RATIO")" "$C_RSPREAD" "-" "-"
printf '%-26s %-20s %-22s %-13s %s\n' "go-live, items" "$I_RATE items/s" "$I_SPREAD" ">= 150000/s" \
	"$(golive_verdict "$I_RATE" 150000)"
printf '%-26s %-20s %-22s %-13s %s\n' "  set-based limit" "$I_LRATE rows/s" "$I_LSPREAD" "-" "-"
printf '%-26s %-20s %-22s %-13s %s\n' "  ratio to the limit" "$(printf '%.4f' "$I_RATIO")" "$I_RSPREAD" "-" "-"
printf '%-26s %-20s %-22s %-13s %s\n' "enroll -> ready, $ITEMS items" "$(printf '%.2f' "$RI_MED") ms" "$RI_SPREAD" "<= 20 ms" \
	"$(verdict "$RI_MED" "<=" 20)"
printf '%-26s %-20s %-22s %-13s %s\n' "enroll -> ready, chart" "$(printf '%.2f' "$RC_MED") ms" "$RC_SPREAD" "<= 20 ms" \
	"$(verdict "$RC_MED" "<=" 20)"
printf '%-26s %-20s %-22s %-13s %s\n' "worker memory" "$(mb "$MEM_KB") MiB" "(peak)" "<= 64 MiB" \
	"$(verdict "$MEM_KB" "<=" 65536)"
echo "(go-live: median of $ROUNDS rounds of $CHART_PATIENTS chart-only patients / $ITEM_PATIENTS patients x $ITEMS items, readiness"
echo " polled every $POLL_MS ms; ratio = limit time / go-live time over the same rows; enroll -> ready: median of $READY_ROUNDS;"
echo " memory: peak over the whole run)"
[ "$QUICK" = 1 ] && echo "(--quick: smaller sizes than BENCHMARKS.md defines; figures are indicative only)"
exit 0
