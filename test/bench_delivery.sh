#!/usr/bin/env bash
# Delivery benchmark of portal_sync (a benchmark, not a test: it prints
# figures and exits 0 whatever they are).  Measures, as BENCHMARKS.md
# defines them:
#
#   snapshot time   1,000 patients, each with 100 shareable items spread over
#                   5 clinical sources, enrolled in one statement; seconds
#                   from that statement until all 1,000 are ready
#                   (bar <= 10 s).  Median of 3 rounds, fresh patients each.
#   drain rate      the outbox holds 1,000,000 incremental events of the
#                   patients of snapshot round 1 (written with the endpoint
#                   empty, in INSERT ... SELECT statements of 10,000 rows
#                   rotating over 6 clinical tables); events accepted by the
#                   sink per second from the moment the endpoint is set
#                   (ALTER SYSTEM + pg_reload_conf) until pending_events is 0
#                   (bar >= 10,000/s; zero failed requests).  One round.
#   latency         pgbench -R 200 (Poisson arrivals, 2 clients): one
#                   ehr.medication row per transaction for a ready patient,
#                   holding clock_timestamp() of its INSERT; the sink takes
#                   arrival - that, for every event (so the commit itself is
#                   included).  p50 and p99, median of 3 rounds of 60 s
#                   (bars <= 20 ms, <= 100 ms).
#   worker memory   peak RssAnon of the delivery worker (/proc/PID/status,
#                   sampled every 100 ms) during the snapshot rounds, the
#                   drain and the delivery of 10 MB C-CDA documents
#                   (bar <= 64 MiB).
#   resume delay    (no bar) one event queued while settings.enabled is
#                   false: seconds from UPDATE ... SET enabled = true until
#                   it is accepted.
#
# The sink is nginx on loopback (answers every POST 200 '{}', reading and
# discarding the whole body; a status-only access log, buffered, so that
# failed requests are counted by the sink too); the latency phase uses the
# small python sink test/bench/delivery_sink.py, which timestamps arrivals.
#
# Usage (after `make install`), as root or as postgres:
#   sudo bash test/bench_delivery.sh [--quick]
# Environment:
#   BENCH_QUICK=1          same as --quick: 200 patients per snapshot round,
#                          100,000 drain events, latency rounds of 10 s
#   BENCH_SNAP_PATIENTS    patients per snapshot round (default 1000)
#   BENCH_SNAP_ITEMS       shareable items per patient, a multiple of 5
#                          (default 100)
#   BENCH_SNAP_ROUNDS      snapshot rounds (default 3)
#   BENCH_DRAIN_EVENTS     events in the outbox for the drain (default 1000000)
#   BENCH_FILL_ROWS        rows per INSERT ... SELECT filling it (default 10000)
#   BENCH_LAT_RATE         commits per second in the latency phase (default 200)
#   BENCH_LAT_TIME         seconds per latency round (default 60)
#   BENCH_LAT_ROUNDS       latency rounds (default 3)
#   BENCH_CCDA_MB          size of each C-CDA document (default 10)
#   BENCH_CCDA_DOCS        C-CDA documents sent one after the other (default 3)
#   BENCH_DRAIN_TIMEOUT    give up the drain after this many seconds (default 1200)
#   BENCH_PORT             port of the throwaway server (default 54339; unix
#                          socket only)
#   BENCH_SHARED_BUFFERS   default 256MB
#   BENCH_KEEP=1           keep the work directory (cluster, logs) afterwards
#   PG_CONFIG              default /usr/lib/postgresql/15/bin/pg_config
#   NGINX                  default /usr/sbin/nginx
#   PYTHON                 default python3
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
NGINX=${NGINX:-/usr/sbin/nginx}
PYTHON=${PYTHON:-$(command -v python3 || true)}

for arg in "$@"; do
	case "$arg" in
		--quick) BENCH_QUICK=1 ;;
		-h|--help) sed -n '2,64p' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "bench_delivery: unknown argument $arg" >&2; exit 2 ;;
	esac
done
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
	SNAP_PATIENTS=${BENCH_SNAP_PATIENTS:-200}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-100000}
	LAT_TIME=${BENCH_LAT_TIME:-10}
else
	SNAP_PATIENTS=${BENCH_SNAP_PATIENTS:-1000}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-1000000}
	LAT_TIME=${BENCH_LAT_TIME:-60}
fi
SNAP_ITEMS=${BENCH_SNAP_ITEMS:-100}
SNAP_ROUNDS=${BENCH_SNAP_ROUNDS:-3}
FILL_ROWS=${BENCH_FILL_ROWS:-10000}
LAT_RATE=${BENCH_LAT_RATE:-200}
LAT_ROUNDS=${BENCH_LAT_ROUNDS:-3}
CCDA_MB=${BENCH_CCDA_MB:-10}
CCDA_DOCS=${BENCH_CCDA_DOCS:-3}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-1200}
PORT=${BENCH_PORT:-54339}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-256MB}
PER_SOURCE=$((SNAP_ITEMS / 5))
TOTAL_PATIENTS=$((SNAP_PATIENTS * SNAP_ROUNDS))
DP=$SNAP_PATIENTS		# drain and latency patients: those of snapshot round 1

die() { echo "bench_delivery: $*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (install postgresql-server-dev-15)"
BINDIR=$("$PG_CONFIG" --bindir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
[ -f "$SHAREDIR/extension/portal_sync.control" ] && [ -f "$PKGLIBDIR/portal_sync.so" ] ||
	die "portal_sync is not installed: run 'make install' first"
[ -f "$SRC_DIR/test/reference_schema.sql" ] || die "test/reference_schema.sql missing"
[ -f "$SRC_DIR/test/attach_reference.sql" ] || die "test/attach_reference.sql missing"
[ -f "$SRC_DIR/test/bench/delivery_sink.py" ] || die "test/bench/delivery_sink.py missing"
[ -x "$NGINX" ] || die "$NGINX not found (apt-get install nginx-light)"
[ -n "$PYTHON" ] || die "python3 not found"
[ $((SNAP_ITEMS % 5)) -eq 0 ] && [ "$SNAP_ITEMS" -gt 0 ] || die "BENCH_SNAP_ITEMS must be a positive multiple of 5"

# The server, its clients and nginx run as postgres (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
	id postgres >/dev/null 2>&1 || die "no postgres user"
	as_pg() { runuser -u postgres -- "$@"; }
elif [ "$(id -un)" = postgres ]; then
	as_pg() { "$@"; }
else
	die "run as root (sudo) or as postgres"
fi

WORK=$(mktemp -d /tmp/portal_sync-bench-delivery.XXXXXX)
chmod 755 "$WORK"
DATA=$WORK/data
NGX=$WORK/nginx
mkdir -p "$NGX"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK"
SAMPLER_PID=
SINK_PID=

cleanup() {
	[ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
	[ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
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
q() { psql_bench -Atc "$1"; }		# one value
# write a file that postgres must read
pgfile() { cat >"$1"; [ "$(id -u)" -eq 0 ] && chown postgres: "$1"; true; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {
	if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
load() { echo "load $(cut -d' ' -f1 /proc/loadavg)"; }
set_phase() { echo "$1" >"$WORK/phase.tmp" && mv -f "$WORK/phase.tmp" "$WORK/phase"; }
set_endpoint() { # url ('' = none); applies it at once
	q "ALTER SYSTEM SET portal_sync.endpoint = '$1'" >/dev/null
	q "SELECT pg_reload_conf()" >/dev/null
}

# ---------------------------------------------------------------- sinks
NGINX_PORT=$(free_port)
NGINX_URL="http://127.0.0.1:$NGINX_PORT/events"
mkdir -p "$NGX/client_body" "$NGX/proxy" "$NGX/fastcgi" "$NGX/uwsgi" "$NGX/scgi"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$NGX"
pgfile "$NGX/nginx.conf" <<EOF
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

# bench_delivery.sh
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
echo "== reference schema; $TOTAL_PATIENTS patients with $SNAP_ITEMS shareable items each ($PER_SOURCE in each of 5 clinical sources)"
psql_bench -f "$WORK/reference_schema.sql" >/dev/null
NITEMS=$((TOTAL_PATIENTS * PER_SOURCE))
psql_bench <<EOF >/dev/null || server_failed "setup"
SET client_min_messages = warning;
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex, guardian_name,
                         guardian_phone, primary_provider)
SELECT g, 'MRN' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g,
       date '2010-01-01' + g % 5000, (ARRAY['F','M'])[1 + g % 2], 'Guardian ' || g,
       '555-01' || lpad((g % 100)::text, 2, '0'), 'Dr. Provider ' || (g % 12)
FROM generate_series(1, $TOTAL_PATIENTS) g;

CREATE EXTENSION portal_sync;
\i $WORK/attach_reference.sql

-- Shareable items, inserted before anyone is enrolled (so nothing queued).
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency,
                            start_date, status, prescriber, privacy_level)
SELECT 1 + (g - 1) % $TOTAL_PATIENTS, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text,
       '250 mg/5 mL', 'oral', 'BID x 10 days', date '2015-01-01' + g % 3000,
       'active', 'Dr. Provider ' || (g % 12), 0
FROM generate_series(1, $NITEMS) g;
INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status, recorded_at)
SELECT 1 + (g - 1) % $TOTAL_PATIENTS, 'allergen ' || (g % 53), 'hives',
       (ARRAY['mild','moderate','severe'])[1 + g % 3], date '2012-01-01' + g % 3000,
       'active', date '2015-01-01' + g % 3000
FROM generate_series(1, $NITEMS) g;
INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, noted_on)
SELECT 1 + (g - 1) % $TOTAL_PATIENTS, 'problem ' || (g % 211), 'J0' || (g % 10),
       date '2012-01-01' + g % 3000, 'active', date '2015-01-01' + g % 3000
FROM generate_series(1, $NITEMS) g;
INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on,
                              lot_number, site, administered_by)
SELECT 1 + (g - 1) % $TOTAL_PATIENTS, 'DTaP', (20 + g % 30)::text, 1 + g % 5,
       date '2015-01-01' + g % 3000, 'LOT' || (g % 1000), 'left thigh', 'RN ' || (g % 7)
FROM generate_series(1, $NITEMS) g;
INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units,
                            reference_range, abnormal_flag, status, result_date)
SELECT 1 + (g - 1) % $TOTAL_PATIENTS, 'ORD' || g, 'Hemoglobin', '718-7', (10 + g % 50 / 10.0)::text,
       'g/dL', '11.5-15.5', 'N', 'final', date '2015-01-01' + g % 3000
FROM generate_series(1, $NITEMS) g;

CREATE SCHEMA bench;

-- Wait, in a procedure that commits between polls (so that it holds no
-- snapshot back from vacuum), until the outbox is empty; seconds since t0,
-- or -1 after timeout.  progress: a NOTICE every 10 s with pending_events.
CREATE PROCEDURE bench.wait_outbox_empty(t0 timestamptz, timeout float8, progress boolean,
                                         INOUT secs float8 DEFAULT NULL)
LANGUAGE plpgsql AS \$\$
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
            RAISE NOTICE 'drain: % s, % events pending', round(el::numeric, 1),
                (SELECT pending_events FROM portal_sync.status);
            next_report := next_report + 10;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
\$\$;

-- Same, until patients lo..hi are all ready.
CREATE PROCEDURE bench.wait_ready(lo int, hi int, t0 timestamptz, timeout float8,
                                  INOUT secs float8 DEFAULT NULL)
LANGUAGE plpgsql AS \$\$
DECLARE
    el float8;
BEGIN
    LOOP
        el := extract(epoch FROM clock_timestamp() - t0);
        IF (SELECT count(*) FROM portal_sync.patients p
            WHERE p.ready AND p.patient_id::int BETWEEN lo AND hi) = hi - lo + 1 THEN
            secs := el;
            RETURN;
        END IF;
        IF el > timeout THEN
            secs := -1;
            RETURN;
        END IF;
        COMMIT;
        PERFORM pg_sleep(0.1);
    END LOOP;
END
\$\$;

-- Requests logged since t0: count, events, failed (not 200 or not accepted).
CREATE FUNCTION bench.log_since(t0 timestamptz, OUT requests bigint, OUT events bigint,
                                OUT failed bigint, OUT first_sent float8, OUT last_accepted float8)
LANGUAGE sql AS \$\$
    SELECT count(*), coalesce(sum(events), 0),
           count(*) FILTER (WHERE http_status IS DISTINCT FROM 200 OR accepted_at IS NULL),
           extract(epoch FROM min(sent_at) - t0), extract(epoch FROM max(accepted_at) - t0)
    FROM portal_sync.delivery_log WHERE sent_at >= t0
\$\$;
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
echo "sinks: $("$NGINX" -v 2>&1 | sed 's/.*: //'), 1 worker process, loopback; $("$PYTHON" --version 2>&1) http.server (latency phase)"
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

# ---------------------------------------------------------------- snapshot time
echo
echo "== snapshot time: $SNAP_ROUNDS rounds, each enrolling $SNAP_PATIENTS fresh patients in one statement (sink: nginx); $(load)"
SNAP_SECS=()
for ((r = 1; r <= SNAP_ROUNDS; r++)); do
	lo=$(((r - 1) * SNAP_PATIENTS + 1))
	hi=$((r * SNAP_PATIENTS))
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 300, false)" -c "CHECKPOINT" >/dev/null ||
		server_failed "waiting before snapshot round $r"
	set_phase snapshot
	pgfile "$WORK/snap.sql" <<EOF
\\set QUIET on
SELECT clock_timestamp() AS t0 \\gset
SELECT count(*) FILTER (WHERE portal_sync.enroll(patient_id::text)) AS enrolled
FROM ehr.patient WHERE patient_id BETWEEN $lo AND $hi \\gset
SELECT extract(epoch FROM clock_timestamp() - :'t0') AS enroll_secs \\gset
CALL bench.wait_ready($lo, $hi, :'t0', 300) \\gset
SELECT format('%s|%s|%s|%s|%s|%s', :secs, :enroll_secs, :enrolled, requests, events, failed)
FROM bench.log_since(:'t0');
EOF
	out=$(psql_bench -At -f "$WORK/snap.sql") || server_failed "snapshot round $r"
	set_phase idle
	IFS='|' read -r secs enroll_secs enrolled requests events failed <<<"$out"
	if [ "$secs" = -1 ]; then
		printf '   round %d: NOT all ready after 300 s (%s enrolled)\n' "$r" "$enrolled"
		SNAP_SECS+=(300)
	else
		printf '   round %d: %6.2f s until all %s ready (enroll statement %.2f s); %s requests, %s events, %s failed\n' \
			"$r" "$secs" "$enrolled" "$enroll_secs" "$requests" "$events" "$failed"
		SNAP_SECS+=("$secs")
	fi
done
SNAP_MED=$(median "${SNAP_SECS[@]}")
SNAP_TIMED_OUT=0
for s in "${SNAP_SECS[@]}"; do [ "$s" = 300 ] && SNAP_TIMED_OUT=1; done

# ---------------------------------------------------------------- drain rate
echo
echo "== drain rate: $DRAIN_EVENTS events for patients 1..$DP queued with the endpoint empty, then the endpoint set (sink: nginx); $(load)"
psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 300, false)" >/dev/null ||
	server_failed "waiting before the drain"
set_endpoint ''
state=
for _ in $(seq 1 50); do
	state=$(q "SELECT state FROM portal_sync.status")
	[ "$state" = unconfigured ] && break
	sleep 0.2
done
[ "$state" = unconfigured ] || echo "   (worker state is '$state', not 'unconfigured', after emptying the endpoint)"
set_phase fill
fill_sql() { # table-index rows
	local n=$2
	case $(($1 % 6)) in
	0) echo "INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency, start_date, status, prescriber)
SELECT 1 + g % $DP, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text, '250 mg/5 mL', 'oral', 'BID x 10 days',
       date '2020-01-01' + g % 2000, 'active', 'Dr. Provider ' || (g % 12) FROM generate_series(1, $n) g;" ;;
	1) echo "INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status, recorded_at)
SELECT 1 + g % $DP, 'allergen ' || (g % 53), 'hives', (ARRAY['mild','moderate','severe'])[1 + g % 3],
       date '2012-01-01' + g % 3000, 'active', date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	2) echo "INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, noted_on)
SELECT 1 + g % $DP, 'problem ' || (g % 211), 'J0' || (g % 10), date '2012-01-01' + g % 3000, 'active',
       date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	3) echo "INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on, lot_number, site, administered_by)
SELECT 1 + g % $DP, 'DTaP', (20 + g % 30)::text, 1 + g % 5, date '2020-01-01' + g % 2000, 'LOT' || (g % 1000),
       'left thigh', 'RN ' || (g % 7) FROM generate_series(1, $n) g;" ;;
	4) echo "INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units, reference_range, abnormal_flag, status, result_date)
SELECT 1 + g % $DP, 'ORD' || g, 'Hemoglobin', '718-7', (10 + g % 50 / 10.0)::text, 'g/dL', '11.5-15.5', 'N', 'final',
       date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	5) echo "INSERT INTO ehr.vital_sign (patient_id, measured_at, height_cm, weight_kg, head_circ_cm, bmi, height_pct, weight_pct,
                            temp_c, pulse, resp_rate, bp_systolic, bp_diastolic)
SELECT 1 + g % $DP, timestamp '2020-01-01 08:00' + g * interval '1 minute', 80 + g % 90, 10 + g % 60, 45 + g % 10 / 10.0,
       15 + g % 10, g % 100, g % 100, 36.5 + g % 10 / 10.0, 70 + g % 60, 15 + g % 20, 90 + g % 40, 50 + g % 30
FROM generate_series(1, $n) g;" ;;
	esac
}
{
	echo "\\set QUIET on"
	left=$DRAIN_EVENTS
	i=0
	while [ "$left" -gt 0 ]; do
		n=$((left < FILL_ROWS ? left : FILL_ROWS))
		fill_sql "$i" "$n"
		left=$((left - n))
		i=$((i + 1))
	done
} | pgfile "$WORK/fill.sql"
t_fill=$(date +%s.%N)
psql_bench -f "$WORK/fill.sql" || server_failed "filling the outbox"
t_fill=$(awk -v a="$t_fill" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
psql_bench -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
read -r pending outbox_rows state <<<"$(psql_bench -At -F' ' -c \
	"SELECT pending_events, (SELECT count(*) FROM portal_sync.outbox), state FROM portal_sync.status")"
echo "   filled in ${t_fill} s ($(( (DRAIN_EVENTS + FILL_ROWS - 1) / FILL_ROWS )) statements, then VACUUM ANALYZE, CHECKPOINT): pending_events = $pending in $outbox_rows outbox rows; worker state $state"
[ "$pending" -eq "$DRAIN_EVENTS" ] || echo "   NOTE: pending_events is $pending, not $DRAIN_EVENTS"
NGX_BEFORE=$(nginx_lines)
set_phase drain
q "ALTER SYSTEM SET portal_sync.endpoint = '$NGINX_URL'" >/dev/null
pgfile "$WORK/drain.sql" <<EOF
\\set QUIET on
SELECT clock_timestamp() AS t0 \\gset
SELECT pg_reload_conf() \\gset
CALL bench.wait_outbox_empty(:'t0', $DRAIN_TIMEOUT, true) \\gset
SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', :secs, requests, events, failed,
              round(first_sent::numeric, 3), (SELECT pending_events FROM portal_sync.status),
              (SELECT dead_letters FROM portal_sync.status),
              (SELECT coalesce(last_error, '') FROM portal_sync.status),
              (SELECT consecutive_failures FROM portal_sync.status),
              (SELECT state FROM portal_sync.status))
FROM bench.log_since(:'t0');
EOF
out=$(psql_bench -At -f "$WORK/drain.sql" 2> >(sed -E 's/^.*NOTICE: +/   /' >&2)) || server_failed "the drain"
set_phase idle
IFS='|' read -r DRAIN_SECS d_requests d_events d_failed d_first d_pending d_dead d_lasterr d_consec d_state <<<"$out"
NGX_AFTER=$(nginx_lines)
NGX_REQ=$((NGX_AFTER - NGX_BEFORE))
NGX_NON200=$(tail -n "$NGX_REQ" "$NGX/access.log" | awk '$1 != 200' | wc -l)
if [ "$DRAIN_SECS" = -1 ]; then
	DRAIN_RATE=0
	echo "   NOT drained after $DRAIN_TIMEOUT s: $d_pending events still pending"
else
	DRAIN_RATE=$(awk -v e="$d_events" -v s="$DRAIN_SECS" 'BEGIN { printf "%.0f", e / s }')
	printf '   drained in %.2f s: %s events accepted in %s requests (%.0f events/request) = %s events/s\n' \
		"$DRAIN_SECS" "$d_events" "$d_requests" "$(awk -v e="$d_events" -v r="$d_requests" 'BEGIN { print r ? e / r : 0 }')" "$DRAIN_RATE"
	printf '   first request sent %.3f s after the endpoint was set; from then on %.0f events/s\n' \
		"$d_first" "$(awk -v e="$d_events" -v s="$DRAIN_SECS" -v f="$d_first" 'BEGIN { print e / (s - f) }')"
fi
echo "   failed requests: $d_failed in delivery_log (not accepted or http_status <> 200); nginx logged $NGX_REQ requests, $NGX_NON200 not 200"
echo "   after: pending_events $d_pending, dead_letters $d_dead, worker state $d_state, consecutive_failures $d_consec${d_lasterr:+, last_error: $d_lasterr}"
DRAIN_FAILED=$((d_failed + NGX_NON200 + d_dead))

# ---------------------------------------------------------------- latency
echo
echo "== latency: pgbench -R $LAT_RATE -c 2 -T $LAT_TIME, one ehr.medication row per transaction for patients 1..$DP (sink: python, timestamps arrivals), $LAT_ROUNDS rounds; $(load)"
SINK_PORT=$(free_port)
: >"$WORK/latency.log"
"$PYTHON" "$SRC_DIR/test/bench/delivery_sink.py" serve --port "$SINK_PORT" --out "$WORK/latency.log" \
	>"$WORK/sink.out" 2>"$WORK/sink.err" &
SINK_PID=$!
for _ in $(seq 1 50); do
	grep -q '^listening' "$WORK/sink.out" 2>/dev/null && break
	sleep 0.1
done
grep -q '^listening' "$WORK/sink.out" || { cat "$WORK/sink.err" >&2; die "python sink did not start"; }
set_endpoint "http://127.0.0.1:$SINK_PORT/events"
sleep 1
P50S=() P99S=()
LAT_MISSING=0
for ((r = 1; r <= LAT_ROUNDS; r++)); do
	pgfile "$WORK/latency_$r.pgbench" <<EOF
\\set p random(1, $DP)
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency,
                            start_date, status, prescriber, privacy_level)
VALUES (:p, 'lat $r ' || extract(epoch FROM clock_timestamp()), '308182', '250 mg/5 mL', 'oral',
        'BID x 10 days', current_date, 'active', 'Dr. Provider 1', 0);
EOF
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 120, false)" -c "CHECKPOINT" >/dev/null ||
		server_failed "waiting before latency round $r"
	set_phase latency
	pgb=$(as_pg "$BINDIR/pgbench" -n -h "$WORK" -p "$PORT" -c 2 -j 2 -R "$LAT_RATE" -T "$LAT_TIME" \
		-f "$WORK/latency_$r.pgbench" bench 2>&1) || { echo "$pgb"; server_failed "pgbench"; }
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 120, false)" >/dev/null ||
		server_failed "waiting after latency round $r"
	set_phase idle
	sleep 0.5
	tx=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$pgb")
	tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$pgb")
	lag=$(sed -nE 's/^rate limit schedule lag: avg ([0-9.]+) \(max ([0-9.]+)\) ms.*/\1 ms avg, \2 ms max/p' <<<"$pgb")
	read -r n p50 p99 pmax <<<"$("$PYTHON" "$SRC_DIR/test/bench/delivery_sink.py" stats "$WORK/latency.log" "$r")"
	printf '   round %d: %s commits (%.1f/s; pgbench schedule lag %s), %s arrived: p50 %s ms, p99 %s ms, max %s ms\n' \
		"$r" "${tx:-?}" "${tps:-0}" "${lag:-?}" "$n" "$p50" "$p99" "$pmax"
	[ "$n" = "${tx:-x}" ] || LAT_MISSING=1
	P50S+=("$p50")
	P99S+=("$p99")
done
LAT_P50=$(median "${P50S[@]}")
LAT_P99=$(median "${P99S[@]}")
[ "$LAT_MISSING" = 0 ] || echo "   NOTE: arrivals and commits differ in some round"
set_endpoint "$NGINX_URL"
kill "$SINK_PID" 2>/dev/null || true
wait "$SINK_PID" 2>/dev/null || true
SINK_PID=

# ---------------------------------------------------------------- C-CDA
echo
echo "== worker memory with C-CDA documents: $CCDA_DOCS documents of $CCDA_MB MiB for ready patient 1, one after the other (sink: nginx); $(load)"
CCDA_ENTRY="'<entry><observation classCode=\"OBS\" moodCode=\"EVN\"><id root=\"%s\"/>'
              '<code code=\"8302-2\" codeSystem=\"2.16.840.1.113883.6.1\"/>'
              '<value xsi:type=\"PQ\" value=\"%s\" unit=\"cm\"/></observation></entry>'"
sleep 1
CCDA_SECS=()
for ((r = 1; r <= CCDA_DOCS; r++)); do
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 120, false)" >/dev/null ||
		server_failed "waiting before C-CDA $r"
	set_phase ccda
	pgfile "$WORK/ccda.sql" <<EOF
\\set QUIET on
SELECT ceil($CCDA_MB * 1048576.0 / (length(format($CCDA_ENTRY, md5(''), '0000')) + 1))::int AS n \\gset
CREATE TEMP TABLE doc AS
SELECT '<?xml version="1.0" encoding="UTF-8"?>' || E'\n<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
       || string_agg(format($CCDA_ENTRY, md5(($r * 1000000 + g)::text), lpad((g % 1000)::text, 4, '0')), E'\n')
       || E'\n</ClinicalDocument>\n' AS document
FROM generate_series(1, :n) g;
SELECT clock_timestamp() AS t0 \\gset
INSERT INTO ehr.ccda_document (patient_id, doc_type, document) SELECT 1, 'visit_summary', document FROM doc;
CALL bench.wait_outbox_empty(:'t0', 120, false) \\gset
SELECT format('%s|%s|%s|%s|%s', :secs, (SELECT length(document) FROM doc), requests, events, failed)
FROM bench.log_since(:'t0');
EOF
	out=$(psql_bench -At -f "$WORK/ccda.sql") || server_failed "C-CDA $r"
	set_phase idle
	IFS='|' read -r secs len requests events failed <<<"$out"
	printf '   document %d: %.1f MiB, delivered in %.2f s (%s requests, %s events, %s failed); worker peak RssAnon so far in this phase %s MiB\n' \
		"$r" "$(awk -v l="$len" 'BEGIN { print l / 1048576 }')" "$secs" "$requests" "$events" "$failed" "$(mb "$(peak_kb ccda)")"
	CCDA_SECS+=("$secs")
done

# ---------------------------------------------------------------- resume delay
echo
echo "== resume delay: one event queued while settings.enabled = false; UPDATE ... SET enabled = true until it is accepted, 3 rounds; $(load)"
RESUME_SECS=()
for ((r = 1; r <= 3; r++)); do
	pgfile "$WORK/resume.sql" <<EOF
\\set QUIET on
UPDATE portal_sync.settings SET enabled = false;
INSERT INTO ehr.medication (patient_id, drug_name, start_date) VALUES (1, 'resume $r', current_date);
SELECT pg_sleep(1) \\gset
SELECT clock_timestamp() AS t0 \\gset
UPDATE portal_sync.settings SET enabled = true;
CALL bench.wait_outbox_empty(:'t0', 60, false) \\gset
SELECT :secs;
EOF
	s=$(psql_bench -At -f "$WORK/resume.sql") || server_failed "resume round $r"
	printf '   round %d: %.2f s\n' "$r" "$s"
	RESUME_SECS+=("$s")
done
RESUME_MED=$(printf '%.2f' "$(median "${RESUME_SECS[@]}")")

# ---------------------------------------------------------------- memory
END_RSS=$(tail -n 1 "$WORK/rss.log" | awk '{ print $2 }')
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
echo
echo "== worker memory (RssAnon, sampled every 100 ms; $(grep -c -v '^pid' "$WORK/rss.log") samples)"
for ph in idle snapshot fill drain latency ccda; do
	printf '   %-9s peak %7s MiB\n' "$ph" "$(mb "$(peak_kb "$ph")")"
done
echo "   at the end (idle) $(mb "${END_RSS:-0}") MiB"
PIDS=$(grep -c '^pid' "$WORK/rss.log" || true)
[ "$PIDS" -le 1 ] || echo "   NOTE: the worker's pid changed $((PIDS - 1)) time(s) during the run (crash or restart): $(grep '^pid' "$WORK/rss.log" | tr '\n' ' ')"
MEM_KB=$(peak_kb snapshot drain ccda)

# ---------------------------------------------------------------- server log
echo
echo "== server log: $(grep -cE ' (ERROR|FATAL|PANIC|WARNING): ' "$WORK/server.log" || true) ERROR/FATAL/PANIC/WARNING lines"
grep -E ' (ERROR|FATAL|PANIC|WARNING): ' "$WORK/server.log" | sed -E 's/^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] //' |
	sort | uniq -c | sort -rn | head -n 10 || true
NGX_ERR=$(grep -cE '\[(error|crit|alert|emerg)\]' "$NGX/error.log" 2>/dev/null || true)
echo "nginx error log: ${NGX_ERR:-0} error lines$([ "${NGX_ERR:-0}" -gt 0 ] && echo ": $(grep -E '\[(error|crit|alert|emerg)\]' "$NGX/error.log" | head -n 3)")"

# ---------------------------------------------------------------- figures
verdict() { awk -v v="$1" -v op="$2" -v bar="$3" 'BEGIN {
	ok = (op == ">=") ? (v >= bar) : (v <= bar); print ok ? "met" : "MISSED" }'; }
echo
echo "== figures; load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-16s %-22s %-14s %s\n' figure value bar verdict
printf '%-16s %-22s %-14s %s\n' "drain rate" "$DRAIN_RATE events/s" ">= 10000/s" \
	"$( [ "$DRAIN_SECS" != -1 ] && [ "$DRAIN_FAILED" -eq 0 ] && verdict "$DRAIN_RATE" ">=" 10000 || echo MISSED)$( [ "$DRAIN_FAILED" -eq 0 ] || echo " ($DRAIN_FAILED failed requests/dead letters)")"
printf '%-16s %-22s %-14s %s\n' "latency p50" "$LAT_P50 ms" "<= 20 ms" "$(verdict "$LAT_P50" "<=" 20)"
printf '%-16s %-22s %-14s %s\n' "latency p99" "$LAT_P99 ms" "<= 100 ms" "$(verdict "$LAT_P99" "<=" 100)"
printf '%-16s %-22s %-14s %s\n' "snapshot time" "$(printf '%.2f' "$SNAP_MED") s" "<= 10 s" \
	"$( [ "$SNAP_TIMED_OUT" = 0 ] && verdict "$SNAP_MED" "<=" 10 || echo "MISSED (a round timed out)")"
printf '%-16s %-22s %-14s %s\n' "worker memory" "$(mb "$MEM_KB") MiB" "<= 64 MiB" "$(verdict "$MEM_KB" "<=" 65536)"
printf '%-16s %-22s %-14s %s\n' "resume delay" "$RESUME_MED s" "(none)" "-"
echo "(snapshot time: median of $SNAP_ROUNDS rounds of $SNAP_PATIENTS patients x $SNAP_ITEMS items; drain: one round of $DRAIN_EVENTS events;"
echo " latency: median over $LAT_ROUNDS rounds of each round's p50/p99, $LAT_RATE commits/s for $LAT_TIME s; memory: peak over the"
echo " snapshot, drain and C-CDA phases; resume delay: median of 3)"
[ "$QUICK" = 1 ] && echo "(--quick: smaller sizes than BENCHMARKS.md defines; figures are indicative only)"
exit 0
