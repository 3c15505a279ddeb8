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
#                   (bar >= 100,000/s; zero failed requests).  One round.
#   latency         pgbench -R 200 (Poisson arrivals, 2 clients): one
#                   ehr.medication row per transaction for a ready patient,
#                   holding clock_timestamp() of its INSERT; the sink takes
#                   arrival - that, for every event (so the commit itself is
#                   included).  p50 and p99, median of 3 rounds of 60 s
#                   (bars <= 10 ms, <= 50 ms).
#   worker memory   peak RssAnon of the delivery worker (/proc/PID/status,
#                   sampled every 100 ms) during the snapshot rounds, the
#                   drain and the delivery of 10 MB C-CDA documents
#                   (bar <= 64 MiB).
#   resume delay    (no bar) one event queued while settings.enabled is
#                   false: seconds from UPDATE ... SET enabled = true until
#                   it is accepted.
#   mixed backlog   20,000 patients never enrolled before (created for this
#                   phase, after those of the snapshot rounds, each with its
#                   chart row and 10 shareable items, 2 in each of the 5
#                   clinical sources of the snapshot rounds), enrolled in one
#                   statement while the endpoint is empty, then 500,000
#                   incremental events for them queued as for the drain
#                   (rotating over 6 clinical tables); seconds from setting
#                   the endpoint until pending_events is 0, after which every
#                   one of the 20,000 is checked (printed, not failed) to be
#                   ready.  The figure is 500,000 / those seconds (bar >=
#                   50,000/s; zero failed requests); also printed: the events
#                   accepted by the sink (snapshot begin/end markers,
#                   snapshot items, incremental) and all of them / seconds,
#                   requests, and the worker's peak RssAnon in the phase.
#                   One round, into nginx.
#   WAN drain rate  the drain rate (outbox already full of incremental events
#                   of the patients of snapshot round 1, filled as above with
#                   the endpoint empty; events accepted per second from
#                   setting the endpoint until pending_events is 0; zero
#                   failed requests) into the python sink holding every
#                   answer 50 ms (a wide-area round trip), 200,000 events per
#                   round, one round for each portal_sync.batch_size in
#                   500, 1000, 2000 (ALTER SYSTEM + pg_reload_conf before
#                   each; max_batch_bytes at its default 4MB; compression
#                   gzip), bar >= 40,000/s; and one round with
#                   portal_sync.compression = off at batch_size 500 (no bar,
#                   for comparison).  Also printed: the ceiling of
#                   max_inflight requests in flight, batch_size x
#                   max_inflight / 50 ms, and the rate as a
#                   fraction of it; per round, the sink's view of a request
#                   (the worker's time from an answer to its next request,
#                   from its headers to its body's end, the hold, how late
#                   the sink answered) and the worker's portal_sync lines of
#                   the server log.
#   sink check      (no bar) after each WAN round, 32 parallel connections
#                   POST that round's largest body to the same sink for 3 s:
#                   requests/s and events/s it sustains, which must be far
#                   above the worker's (else the sink is the bottleneck).
#   wire bytes      request bodies as sent (after compression) / their JSON
#                   (bar <= 1/8).  WAN rounds: exact, counted by the python
#                   sink (body bytes after chunked decoding / the same
#                   decompressed), over all gzip rounds; the compression-off
#                   round shows 1.  nginx drain: the bytes nginx's
#                   connections received during it (ss bytes_received)
#                   minus their request lines and headers (nginx's
#                   $request_length, which leaves out the body it discards)
#                   / an estimate of the JSON, its events times the JSON
#                   bytes per event of the WAN gzip round at batch_size 500
#                   (printed only when the WAN phase ran).  BENCHMARKS.md's
#                   figure, over the demo's whole run, is printed by
#                   test/demo.sh.
#
# The sink is nginx on loopback (answers every POST 200 '{}', reading and
# discarding the whole body; a status-only access log, buffered, so that
# failed requests are counted by the sink too); the latency phase uses the
# small python sink test/bench/delivery_sink.py, which timestamps arrivals,
# and the WAN phase the same sink with --hold-ms (one thread per connection;
# it counts body bytes as sent and decompressed).  The phases run in the
# order above, the WAN phase last, so that it does not change the others.
#
# Usage (with portal_sync installed: the package, or `make install`), as
# root or as postgres:
#   bash test/bench_delivery.sh [--quick]
# Environment:
#   BENCH_QUICK=1          same as --quick: 200 patients per snapshot round,
#                          100,000 drain events, latency rounds of 10 s,
#                          2,000 patients and 50,000 events in the mixed
#                          backlog, 50,000 events per WAN round
#   BENCH_PHASES           phases to run, of: snapshot drain latency ccda
#                          resume mixed wan (default all; without snapshot,
#                          the patients of round 1 are enrolled untimed for
#                          drain, latency and wan)
#   BENCH_WAN=0            skip the WAN phase
#   BENCH_WAN_EVENTS       events per WAN round (default 200000)
#   BENCH_WAN_BATCHES      batch sizes of the WAN gzip rounds (default
#                          "500 1000 2000"); the compression-off round uses
#                          the first (BENCH_WAN_OFF=0 skips it)
#   BENCH_WAN_HOLD_MS      the sink's hold (default 50)
#   BENCH_WAN_ROUNDS       rounds of each WAN setting, interleaved; the
#                          figure is their median (default 1)
#   BENCH_WAN_CHECK_CONN   connections of the sink check (default 32)
#   BENCH_WAN_CHECK_SECS   seconds of the sink check (default 3)
#   BENCH_SNAP_PATIENTS    patients per snapshot round (default 1000)
#   BENCH_SNAP_ITEMS       shareable items per patient, a multiple of 5
#                          (default 100)
#   BENCH_SNAP_ROUNDS      snapshot rounds (default 3)
#   BENCH_DRAIN_EVENTS     events in the outbox for the drain (default 1000000)
#   BENCH_FILL_ROWS        rows per INSERT ... SELECT filling it (default 10000)
#   BENCH_MIXED_PATIENTS   patients enrolled in the mixed backlog (default 20000)
#   BENCH_MIXED_EVENTS     incremental events of the mixed backlog (default
#                          500000)
#   BENCH_LAT_RATE         commits per second in the latency phase (default 200)
#   BENCH_LAT_TIME         seconds per latency round (default 60)
#   BENCH_LAT_ROUNDS       latency rounds (default 3)
#   BENCH_CCDA_MB          size of each C-CDA document (default 10)
#   BENCH_CCDA_DOCS        C-CDA documents sent one after the other (default 3)
#   BENCH_DRAIN_TIMEOUT    give up the drain (and the mixed backlog's) after
#                          this many seconds (default 1200)
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
		-h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "bench_delivery: unknown argument $arg" >&2; exit 2 ;;
	esac
done
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
	SNAP_PATIENTS=${BENCH_SNAP_PATIENTS:-200}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-100000}
	LAT_TIME=${BENCH_LAT_TIME:-10}
	WAN_EVENTS=${BENCH_WAN_EVENTS:-50000}
	MIXED_PATIENTS=${BENCH_MIXED_PATIENTS:-2000}
	MIXED_EVENTS=${BENCH_MIXED_EVENTS:-50000}
else
	SNAP_PATIENTS=${BENCH_SNAP_PATIENTS:-1000}
	DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-1000000}
	LAT_TIME=${BENCH_LAT_TIME:-60}
	WAN_EVENTS=${BENCH_WAN_EVENTS:-200000}
	MIXED_PATIENTS=${BENCH_MIXED_PATIENTS:-20000}
	MIXED_EVENTS=${BENCH_MIXED_EVENTS:-500000}
fi
PHASES=" $(echo "${BENCH_PHASES:-snapshot drain latency ccda resume mixed wan}" | tr ',' ' ') "
[ "${BENCH_WAN:-1}" = 0 ] && PHASES=${PHASES/ wan / }
phase_on() { [[ "$PHASES" == *" $1 "* ]]; }
WAN_BATCHES=${BENCH_WAN_BATCHES:-500 1000 2000}
WAN_OFF=${BENCH_WAN_OFF:-1}
WAN_HOLD_MS=${BENCH_WAN_HOLD_MS:-50}
WAN_ROUNDS=${BENCH_WAN_ROUNDS:-1}
WAN_CHECK_CONN=${BENCH_WAN_CHECK_CONN:-32}
WAN_CHECK_SECS=${BENCH_WAN_CHECK_SECS:-3}
WAN_BAR=40000
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
MIXED_PER_SOURCE=2		# shareable items of a mixed-backlog patient in each of 5 sources
MIXED_ITEMS=$((MIXED_PER_SOURCE * 5))
MIXED_BAR=50000
MIXED_LO=$((TOTAL_PATIENTS + 1))	# mixed-backlog patients: after the snapshot rounds'
MIXED_HI=$((TOTAL_PATIENTS + MIXED_PATIENTS))
MIXED_N=0			# of them created (only if the phase runs)
phase_on mixed && MIXED_N=$MIXED_PATIENTS

die() { echo "bench_delivery: $*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (install postgresql-server-dev-15)"
BINDIR=$("$PG_CONFIG" --bindir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
[ -f "$SHAREDIR/extension/portal_sync.control" ] && [ -f "$PKGLIBDIR/portal_sync.so" ] ||
	die "portal_sync is not installed: install the package (README: Installing the package) or run 'make install' first"
[ -f "$SRC_DIR/test/reference_schema.sql" ] || die "test/reference_schema.sql missing"
[ -f "$SRC_DIR/test/attach_reference.sql" ] || die "test/attach_reference.sql missing"
[ -f "$SRC_DIR/test/bench/delivery_sink.py" ] || die "test/bench/delivery_sink.py missing"
[ -x "$NGINX" ] || die "$NGINX not found (apt-get install nginx-light)"
[ -n "$PYTHON" ] || die "python3 not found"
[ $((SNAP_ITEMS % 5)) -eq 0 ] && [ "$SNAP_ITEMS" -gt 0 ] || die "BENCH_SNAP_ITEMS must be a positive multiple of 5"
[ "$MIXED_PATIENTS" -gt 0 ] && [ "$MIXED_EVENTS" -gt 0 ] || die "BENCH_MIXED_PATIENTS and BENCH_MIXED_EVENTS must be positive"

# The server, its clients and nginx run as postgres (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
	id postgres >/dev/null 2>&1 || die "no postgres user"
	as_pg() { runuser -u postgres -- "$@"; }
elif [ "$(id -un)" = postgres ]; then
	as_pg() { "$@"; }
else
	die "run as root or as postgres"
fi

WORK=$(mktemp -d /tmp/portal_sync-bench-delivery.XXXXXX)
chmod 755 "$WORK"
DATA=$WORK/data
NGX=$WORK/nginx
mkdir -p "$NGX"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK"
SAMPLER_PID=
SINK_PID=
WAN_SINK_PID=

cleanup() {
	[ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
	[ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true
	[ -n "$WAN_SINK_PID" ] && kill "$WAN_SINK_PID" 2>/dev/null || true
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
nginx_rx() { # "peer bytes_received" of each established connection to nginx
	ss -tinH state established "( sport = :$NGINX_PORT )" 2>/dev/null | awk '
		/^[0-9]/ { peer = $4 } / bytes_received:/ { if (match($0, /bytes_received:[0-9]+/))
			print peer, substr($0, RSTART + 15, RLENGTH - 15) }'
}
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
echo "== reference schema; $TOTAL_PATIENTS patients with $SNAP_ITEMS shareable items each ($PER_SOURCE in each of 5 clinical sources)$(
	[ "$MIXED_N" -gt 0 ] && echo "; for the mixed backlog $MIXED_N more ($MIXED_LO..$MIXED_HI) with $MIXED_ITEMS each ($MIXED_PER_SOURCE per source)")"
psql_bench -f "$WORK/reference_schema.sql" >/dev/null
# Shareable items of patients lo .. lo + np - 1, per_source in each of 5
# clinical sources (patient lo + (g - 1) % np for item g of a source).
items_sql() { # lo np per_source
	local p="$1 + (g - 1) % $2" n=$(($2 * $3))
	cat <<EOF
INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency,
                            start_date, status, prescriber, privacy_level)
SELECT $p, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text,
       '250 mg/5 mL', 'oral', 'BID x 10 days', date '2015-01-01' + g % 3000,
       'active', 'Dr. Provider ' || (g % 12), 0
FROM generate_series(1, $n) g;
INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status, recorded_at)
SELECT $p, 'allergen ' || (g % 53), 'hives',
       (ARRAY['mild','moderate','severe'])[1 + g % 3], date '2012-01-01' + g % 3000,
       'active', date '2015-01-01' + g % 3000
FROM generate_series(1, $n) g;
INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, noted_on)
SELECT $p, 'problem ' || (g % 211), 'J0' || (g % 10),
       date '2012-01-01' + g % 3000, 'active', date '2015-01-01' + g % 3000
FROM generate_series(1, $n) g;
INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on,
                              lot_number, site, administered_by)
SELECT $p, 'DTaP', (20 + g % 30)::text, 1 + g % 5,
       date '2015-01-01' + g % 3000, 'LOT' || (g % 1000), 'left thigh', 'RN ' || (g % 7)
FROM generate_series(1, $n) g;
INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units,
                            reference_range, abnormal_flag, status, result_date)
SELECT $p, 'ORD' || g, 'Hemoglobin', '718-7', (10 + g % 50 / 10.0)::text,
       'g/dL', '11.5-15.5', 'N', 'final', date '2015-01-01' + g % 3000
FROM generate_series(1, $n) g;
EOF
}
psql_bench <<EOF >/dev/null || server_failed "setup"
SET client_min_messages = warning;
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex, guardian_name,
                         guardian_phone, primary_provider)
SELECT g, 'MRN' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g,
       date '2010-01-01' + g % 5000, (ARRAY['F','M'])[1 + g % 2], 'Guardian ' || g,
       '555-01' || lpad((g % 100)::text, 2, '0'), 'Dr. Provider ' || (g % 12)
FROM generate_series(1, $((TOTAL_PATIENTS + MIXED_N))) g;

CREATE EXTENSION portal_sync;
\i $WORK/attach_reference.sql

-- Shareable items, inserted before anyone is enrolled (so nothing queued).
$(items_sql 1 "$TOTAL_PATIENTS" "$PER_SOURCE")
$( [ "$MIXED_N" -gt 0 ] && items_sql "$MIXED_LO" "$MIXED_N" "$MIXED_PER_SOURCE")

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

# ---------------------------------------------------------------- fill and drain
# Empty the endpoint (after the outbox is empty) and wait for the worker to
# say so: events queue from then on.
empty_endpoint() {
	psql_bench -c "CALL bench.wait_outbox_empty(clock_timestamp(), 300, false)" >/dev/null ||
		server_failed "waiting before a drain"
	set_endpoint ''
	local state='' _
	for _ in $(seq 1 50); do
		state=$(q "SELECT state FROM portal_sync.status")
		[ "$state" = unconfigured ] && break
		sleep 0.2
	done
	[ "$state" = unconfigured ] || echo "   (worker state is '$state', not 'unconfigured', after emptying the endpoint)"
}
fill_sql() { # table-index rows [first-patient patients]: rows of patients first .. first + patients - 1
	local n=$2 p="${3:-1} + g % ${4:-$DP}"
	case $(($1 % 6)) in
	0) echo "INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency, start_date, status, prescriber)
SELECT $p, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text, '250 mg/5 mL', 'oral', 'BID x 10 days',
       date '2020-01-01' + g % 2000, 'active', 'Dr. Provider ' || (g % 12) FROM generate_series(1, $n) g;" ;;
	1) echo "INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, status, recorded_at)
SELECT $p, 'allergen ' || (g % 53), 'hives', (ARRAY['mild','moderate','severe'])[1 + g % 3],
       date '2012-01-01' + g % 3000, 'active', date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	2) echo "INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, status, noted_on)
SELECT $p, 'problem ' || (g % 211), 'J0' || (g % 10), date '2012-01-01' + g % 3000, 'active',
       date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	3) echo "INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on, lot_number, site, administered_by)
SELECT $p, 'DTaP', (20 + g % 30)::text, 1 + g % 5, date '2020-01-01' + g % 2000, 'LOT' || (g % 1000),
       'left thigh', 'RN ' || (g % 7) FROM generate_series(1, $n) g;" ;;
	4) echo "INSERT INTO ehr.lab_result (patient_id, order_number, test_name, loinc, value, units, reference_range, abnormal_flag, status, result_date)
SELECT $p, 'ORD' || g, 'Hemoglobin', '718-7', (10 + g % 50 / 10.0)::text, 'g/dL', '11.5-15.5', 'N', 'final',
       date '2020-01-01' + g % 2000 FROM generate_series(1, $n) g;" ;;
	5) echo "INSERT INTO ehr.vital_sign (patient_id, measured_at, height_cm, weight_kg, head_circ_cm, bmi, height_pct, weight_pct,
                            temp_c, pulse, resp_rate, bp_systolic, bp_diastolic)
SELECT $p, timestamp '2020-01-01 08:00' + g * interval '1 minute', 80 + g % 90, 10 + g % 60, 45 + g % 10 / 10.0,
       15 + g % 10, g % 100, g % 100, 36.5 + g % 10 / 10.0, 70 + g % 60, 15 + g % 20, 90 + g % 40, 50 + g % 30
FROM generate_series(1, $n) g;" ;;
	esac
}
# Queue N incremental events (the endpoint being empty) in INSERT ... SELECT
# statements of FILL_ROWS rows rotating over 6 clinical tables, then VACUUM
# ANALYZE and CHECKPOINT; prints one line.  phase: the sampler's tag; the
# events are of patients 1..DP, or of patients first .. first + patients - 1.
fill_outbox() { # events phase [first-patient patients]
	local events=$1 left=$1 i=0 n t_fill pending outbox_rows state before
	set_phase "$2"
	before=$(q "SELECT pending_events FROM portal_sync.status")	# 0 unless snapshots are queued
	{
		echo "\\set QUIET on"
		while [ "$left" -gt 0 ]; do
			n=$((left < FILL_ROWS ? left : FILL_ROWS))
			fill_sql "$i" "$n" "${3:-1}" "${4:-$DP}"
			left=$((left - n))
			i=$((i + 1))
		done
	} | pgfile "$WORK/fill.sql"
	t_fill=$(date +%s.%N)
	psql_bench -f "$WORK/fill.sql" || server_failed "filling the outbox"
	t_fill=$(awk -v a="$t_fill" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
	psql_bench -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
	set_phase idle
	read -r pending outbox_rows state <<<"$(psql_bench -At -F' ' -c \
		"SELECT pending_events, (SELECT count(*) FROM portal_sync.outbox), state FROM portal_sync.status")"
	echo "   filled in ${t_fill} s ($(( (events + FILL_ROWS - 1) / FILL_ROWS )) statements, then VACUUM ANALYZE, CHECKPOINT): pending_events = $pending in $outbox_rows outbox rows; worker state $state"
	[ "$pending" -eq $((before + events)) ] || echo "   NOTE: pending_events is $pending, not $((before + events))"
}
# Set the endpoint to URL and wait until the outbox is empty; sets D_SECS
# (-1: not drained after DRAIN_TIMEOUT s) and D_REQUESTS, D_EVENTS, D_FAILED
# (delivery_log since then), D_FIRST (s until the first request was sent),
# then the status after: D_PENDING, D_DEAD, D_LASTERR, D_CONSEC, D_STATE.
run_drain() { # url phase
	set_phase "$2"
	q "ALTER SYSTEM SET portal_sync.endpoint = '$1'" >/dev/null
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
	local out
	out=$(psql_bench -At -f "$WORK/drain.sql" 2> >(sed -E 's/^.*NOTICE: +/   /' >&2)) || server_failed "the drain"
	set_phase idle
	IFS='|' read -r D_SECS D_REQUESTS D_EVENTS D_FAILED D_FIRST D_PENDING D_DEAD D_LASTERR D_CONSEC D_STATE <<<"$out"
}
log_mark() { stat -c %s "$WORK/server.log"; }
log_worker_lines() { # mark: the server log's portal_sync lines since then, counted
	tail -c +$(($1 + 1)) "$WORK/server.log" | grep -E 'portal_sync: ' |
		sed -E 's/^[0-9-]+ [0-9:.]+ [A-Z]+ \[[0-9]+\] [^:]*: +//' | sort | uniq -c | sort -rn | head -n 5 |
		sed -E 's/^ *([0-9]+) /   server log: (x\1) /' || true
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.3f (1/%.1f)", a / b, b / a; else print "-" }'; }
verdict() { awk -v v="$1" -v op="$2" -v bar="$3" 'BEGIN {
	ok = (op == ">=") ? (v >= bar) : (v <= bar); print ok ? "met" : "MISSED" }'; }

# ---------------------------------------------------------------- snapshot time
# (each phase runs if phase_on says so; their bodies are not indented)
SNAP_MED=- SNAP_TIMED_OUT=0
if phase_on snapshot; then
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
for s in "${SNAP_SECS[@]}"; do [ "$s" = 300 ] && SNAP_TIMED_OUT=1; done
elif phase_on drain || phase_on latency || phase_on wan; then
	echo
	echo "== (snapshot phase skipped) enrolling patients 1..$DP untimed, for the phases that need them ready; $(load)"
	set_phase setup
	secs=$(psql_bench -At -c "SELECT count(portal_sync.enroll(patient_id::text)) FROM ehr.patient WHERE patient_id BETWEEN 1 AND $DP" 		-c "CALL bench.wait_ready(1, $DP, clock_timestamp(), 600)" | tail -n 1) || server_failed "enrolling"
	set_phase idle
	[ "$secs" != -1 ] || die "patients 1..$DP not ready after 600 s"
	printf '   ready %.1f s after the enroll statement
' "$secs"
fi # snapshot

# ---------------------------------------------------------------- drain rate
DRAIN_RATE=- DRAIN_SECS=-1 DRAIN_FAILED=0 NGX_WIRE=0 NGX_EVENTS=0
if phase_on drain; then
echo
echo "== drain rate: $DRAIN_EVENTS events for patients 1..$DP queued with the endpoint empty, then the endpoint set (sink: nginx); $(load)"
empty_endpoint
fill_outbox "$DRAIN_EVENTS" fill
NGX_BEFORE=$(nginx_lines)
NGX_RX_BEFORE=$(nginx_rx)
mark=$(log_mark)
run_drain "$NGINX_URL" drain
log_worker_lines "$mark"
NGX_RX_AFTER=$(nginx_rx)
DRAIN_SECS=$D_SECS
NGX_AFTER=$(nginx_lines)
NGX_REQ=$((NGX_AFTER - NGX_BEFORE))
NGX_NON200=$(tail -n "$NGX_REQ" "$NGX/access.log" | awk '$1 != 200' | wc -l)
NGX_HEAD=$(tail -n "$NGX_REQ" "$NGX/access.log" | awk '{ s += $2 } END { printf "%.0f", s }')
# bytes received over the drain, summed over connections (those opened since count whole)
NGX_RX=$(awk 'NR == FNR { b[$1] = $2; next } { s += $2 - ($1 in b ? b[$1] : 0) } END { printf "%.0f", s }' \
	<(printf '%s\n' "$NGX_RX_BEFORE") <(printf '%s\n' "$NGX_RX_AFTER"))
[ -n "$NGX_RX_AFTER" ] && [ "$NGX_RX" -gt "$NGX_HEAD" ] && NGX_WIRE=$((NGX_RX - NGX_HEAD))
NGX_EVENTS=$D_EVENTS
if [ "$DRAIN_SECS" = -1 ]; then
	DRAIN_RATE=0
	echo "   NOT drained after $DRAIN_TIMEOUT s: $D_PENDING events still pending"
else
	DRAIN_RATE=$(awk -v e="$D_EVENTS" -v s="$DRAIN_SECS" 'BEGIN { printf "%.0f", e / s }')
	printf '   drained in %.2f s: %s events accepted in %s requests (%.0f events/request) = %s events/s\n' \
		"$DRAIN_SECS" "$D_EVENTS" "$D_REQUESTS" "$(awk -v e="$D_EVENTS" -v r="$D_REQUESTS" 'BEGIN { print r ? e / r : 0 }')" "$DRAIN_RATE"
	printf '   first request sent %.3f s after the endpoint was set; from then on %.0f events/s\n' \
		"$D_FIRST" "$(awk -v e="$D_EVENTS" -v s="$DRAIN_SECS" -v f="$D_FIRST" 'BEGIN { print e / (s - f) }')"
fi
echo "   failed requests: $D_FAILED in delivery_log (not accepted or http_status <> 200); nginx logged $NGX_REQ requests, $NGX_NON200 not 200"
if [ "$NGX_WIRE" -gt 0 ]; then
	echo "   wire: nginx's connections received $NGX_RX bytes (ss bytes_received), of which $NGX_HEAD request lines and headers (\$request_length: nginx discards the body unread): bodies as sent (chunked) $NGX_WIRE bytes = $(awk -v w="$NGX_WIRE" -v e="$NGX_EVENTS" 'BEGIN { printf "%.1f", e ? w / e : 0 }') bytes/event"
else
	echo "   wire: not measured (ss gave no bytes_received for nginx's connections)"
fi
echo "   after: pending_events $D_PENDING, dead_letters $D_DEAD, worker state $D_STATE, consecutive_failures $D_CONSEC${D_LASTERR:+, last_error: $D_LASTERR}"
DRAIN_FAILED=$((D_FAILED + NGX_NON200 + D_DEAD))
fi # drain

# ---------------------------------------------------------------- latency
LAT_P50=- LAT_P99=-
if phase_on latency; then
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
fi # latency

# ---------------------------------------------------------------- C-CDA
if phase_on ccda; then
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
fi # ccda

# ---------------------------------------------------------------- resume delay
RESUME_MED=-
if phase_on resume; then
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
fi # resume

# ---------------------------------------------------------------- mixed backlog
MIXED_RATE=- MIXED_ALL_RATE=- MIXED_SECS=-1 MIXED_FAILED=0
if phase_on mixed; then
echo
echo "== mixed backlog: $MIXED_PATIENTS patients never enrolled ($MIXED_LO..$MIXED_HI, $MIXED_ITEMS shareable items each) enrolled in one statement with the endpoint empty, then $MIXED_EVENTS incremental events for them, then the endpoint set (sink: nginx); $(load)"
empty_endpoint
set_phase mixed_fill
t_enroll=$(date +%s.%N)
enrolled=$(q "SELECT count(*) FILTER (WHERE portal_sync.enroll(patient_id::text)) FROM ehr.patient
              WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI") || server_failed "enrolling the mixed backlog's patients"
t_enroll=$(awk -v a="$t_enroll" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
echo "   enrolled $enrolled patients in one statement (${t_enroll} s)"
[ "$enrolled" -eq "$MIXED_PATIENTS" ] || echo "   NOTE: $enrolled newly enrolled, not $MIXED_PATIENTS"
fill_outbox "$MIXED_EVENTS" mixed_fill "$MIXED_LO" "$MIXED_PATIENTS"
# what the snapshots will read: the charts, the items and the rows the fill wrote
read -r m_rows m_ready0 <<<"$(psql_bench -At -F' ' -c "SELECT
	(SELECT count(*) FROM ehr.patient WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.medication WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.allergy WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.problem WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.immunization WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.lab_result WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI)
	+ (SELECT count(*) FROM ehr.vital_sign WHERE patient_id BETWEEN $MIXED_LO AND $MIXED_HI),
	(SELECT count(*) FILTER (WHERE ready) FROM portal_sync.patients WHERE patient_id::int BETWEEN $MIXED_LO AND $MIXED_HI)")"
echo "   before the endpoint is set: $m_ready0 of them ready; their rows in the attached tables: $m_rows ($MIXED_PATIENTS charts + $((MIXED_PATIENTS * MIXED_ITEMS)) items + $MIXED_EVENTS written by the fill)"
NGX_BEFORE=$(nginx_lines)
mark=$(log_mark)
run_drain "$NGINX_URL" mixed
log_worker_lines "$mark"
NGX_AFTER=$(nginx_lines)
NGX_REQ=$((NGX_AFTER - NGX_BEFORE))
NGX_NON200=$(tail -n "$NGX_REQ" "$NGX/access.log" | awk '$1 != 200' | wc -l)
MIXED_SECS=$D_SECS
m_markers=$((2 * MIXED_PATIENTS))
if [ "$MIXED_SECS" = -1 ]; then
	MIXED_RATE=0 MIXED_ALL_RATE=0
	echo "   NOT drained after $DRAIN_TIMEOUT s: $D_PENDING events still pending"
else
	MIXED_RATE=$(awk -v e="$MIXED_EVENTS" -v s="$MIXED_SECS" 'BEGIN { printf "%.0f", e / s }')
	MIXED_ALL_RATE=$(awk -v e="$D_EVENTS" -v s="$MIXED_SECS" 'BEGIN { printf "%.0f", e / s }')
	printf '   drained in %.2f s: %s events accepted in %s requests (%.0f events/request); first request sent %.3f s after the endpoint was set\n' \
		"$MIXED_SECS" "$D_EVENTS" "$D_REQUESTS" "$(awk -v e="$D_EVENTS" -v r="$D_REQUESTS" 'BEGIN { print r ? e / r : 0 }')" "$D_FIRST"
	m_items=$((D_EVENTS - m_markers - MIXED_EVENTS))
	echo "   accepted: $m_markers snapshot begin/end markers + $m_items snapshot items + $MIXED_EVENTS incremental (items: accepted - markers - incremental queued)$(
		if [ "$m_items" -eq "$m_rows" ]; then
			echo "; the items are all $m_rows rows of these patients when the endpoint was set, so the fill's rows went twice: in the snapshots and as incremental events"
		else
			echo "; their rows when the endpoint was set: $m_rows"
		fi)"
	echo "   incremental: $MIXED_EVENTS / $(printf '%.2f' "$MIXED_SECS") s = $MIXED_RATE events/s (bar >= $MIXED_BAR/s); all events: $D_EVENTS / $(printf '%.2f' "$MIXED_SECS") s = $MIXED_ALL_RATE events/s"
fi
echo "   failed requests: $D_FAILED in delivery_log (not accepted or http_status <> 200); nginx logged $NGX_REQ requests, $NGX_NON200 not 200"
echo "   after: pending_events $D_PENDING, dead_letters $D_DEAD, worker state $D_STATE, consecutive_failures $D_CONSEC${D_LASTERR:+, last_error: $D_LASTERR}"
m_ready=$(q "SELECT count(*) FILTER (WHERE ready) FROM portal_sync.patients WHERE patient_id::int BETWEEN $MIXED_LO AND $MIXED_HI")
if [ "$m_ready" -eq "$MIXED_PATIENTS" ]; then
	echo "   ready: all $MIXED_PATIENTS patients (portal_sync.patients) once pending_events was 0"
else
	echo "   NOTE: only $m_ready of $MIXED_PATIENTS patients ready once pending_events was 0"
	secs=$(psql_bench -At -c "CALL bench.wait_ready($MIXED_LO, $MIXED_HI, clock_timestamp(), 60)") || server_failed "waiting for the mixed backlog's patients"
	if [ "$secs" = -1 ]; then
		echo "   NOTE: not all ready 60 s later: $(q "SELECT count(*) FILTER (WHERE ready) FROM portal_sync.patients WHERE patient_id::int BETWEEN $MIXED_LO AND $MIXED_HI") of $MIXED_PATIENTS"
	else
		printf '   all %s ready %.2f s later\n' "$MIXED_PATIENTS" "$secs"
	fi
fi
echo "   worker peak RssAnon: $(mb "$(peak_kb mixed)") MiB in this phase ($(mb "$(peak_kb mixed_fill)") MiB while enrolling and filling)"
MIXED_FAILED=$((D_FAILED + NGX_NON200 + D_DEAD))
if [ "$MIXED_SECS" != -1 ] && [ "$MIXED_FAILED" -eq 0 ]; then
	echo "   bar: $MIXED_RATE incremental events/s >= $MIXED_BAR/s: $(verdict "$MIXED_RATE" ">=" "$MIXED_BAR")"
else
	echo "   bar: >= $MIXED_BAR/s: MISSED ($([ "$MIXED_SECS" = -1 ] && echo "not drained" || echo "$MIXED_FAILED failed requests/dead letters"))"
fi
fi # mixed

# ---------------------------------------------------------------- WAN drain rate
# Settings "batch_size:compression": the gzip rounds, then compression off at
# the first batch size.  Per setting, space-separated over the rounds: rates,
# failures; summed: sink wire and JSON bytes, events.
WAN_CONFIGS=()
for b in $WAN_BATCHES; do WAN_CONFIGS+=("$b:gzip"); done
[ "$WAN_OFF" = 1 ] && WAN_CONFIGS+=("${WAN_BATCHES%% *}:off")
declare -A WAN_RATES=() WAN_BAD=() WAN_WIRE=() WAN_JSON=() WAN_EV=() WAN_CHK=() WAN_ERR=()
sink_get() { # port path: the python sink's answer
	"$PYTHON" -c 'import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:%s%s" % (sys.argv[1], sys.argv[2]), timeout=30).read().decode())' "$1" "$2"
}
sink_counters() { # port: requests events bad wire_bytes json_bytes, then ms per request:
	# sending the body, between an answer and the next request, answer late (mean, max)
	sink_get "$1" / | "$PYTHON" -c 'import json, sys
c = json.load(sys.stdin)
n = max(c["requests"] + c["bad"], 1)
print(c["requests"], c["events"], c["bad"], c["wire_bytes"], c["json_bytes"],
      "%.1f %.1f %.1f %.1f" % (c["recv_s"] * 1e3 / n, c["gap_s"] * 1e3 / max(c["gaps"], 1),
                               c["late_s"] * 1e3 / n, c["late_max_s"] * 1e3))'
}
if phase_on wan; then
echo
echo "== WAN drain rate: $WAN_ROUNDS round(s) per setting of $WAN_EVENTS events for patients 1..$DP, queued with the endpoint empty, then the endpoint set (sink: python, holding every answer $WAN_HOLD_MS ms); settings (batch_size:compression): ${WAN_CONFIGS[*]}; $(load)"
WAN_PORT=$(free_port)
"$PYTHON" "$SRC_DIR/test/bench/delivery_sink.py" serve --port "$WAN_PORT" --out "$WORK/wan.log" \
	--hold-ms "$WAN_HOLD_MS" >"$WORK/wan_sink.out" 2>"$WORK/wan_sink.err" &
WAN_SINK_PID=$!
for _ in $(seq 1 50); do
	grep -q '^listening' "$WORK/wan_sink.out" 2>/dev/null && break
	sleep 0.1
done
grep -q '^listening' "$WORK/wan_sink.out" || { cat "$WORK/wan_sink.err" >&2; die "python WAN sink did not start"; }
WAN_URL="http://127.0.0.1:$WAN_PORT/events"
for ((r = 1; r <= WAN_ROUNDS; r++)); do
for cfg in "${WAN_CONFIGS[@]}"; do
	IFS=: read -r bs comp <<<"$cfg"
	echo "   -- batch_size $bs, compression $comp$([ "$WAN_ROUNDS" -gt 1 ] && echo ", round $r"); $(load)"
	q "ALTER SYSTEM SET portal_sync.batch_size = $bs" >/dev/null
	q "ALTER SYSTEM SET portal_sync.compression = '$comp'" >/dev/null
	empty_endpoint		# reloads the configuration
	seen=$(q "SELECT current_setting('portal_sync.batch_size') || ' ' || current_setting('portal_sync.compression')")
	[ "$seen" = "$bs $comp" ] || echo "   NOTE: a new session sees batch_size, compression = $seen"
	fill_outbox "$WAN_EVENTS" wan_fill
	sink_get "$WAN_PORT" /_reset >/dev/null
	mark=$(log_mark)
	run_drain "$WAN_URL" wan
	log_worker_lines "$mark"
	errs=$(tail -c +$((mark + 1)) "$WORK/server.log" | grep -cE 'portal_sync: .*failed' || true)
	read -r s_req s_ev s_bad s_wire s_json s_recv s_gap s_late s_latemax <<<"$(sink_counters "$WAN_PORT")"
	bad=$((D_FAILED + D_DEAD + s_bad))
	[ "$D_SECS" != -1 ] || bad=$((bad + 1))
	if [ "$D_SECS" = -1 ]; then
		rate=0
		echo "   NOT drained after $DRAIN_TIMEOUT s: $D_PENDING events still pending"
	else
		rate=$(awk -v e="$D_EVENTS" -v s="$D_SECS" 'BEGIN { printf "%.0f", e / s }')
		inflight=$(q "SELECT current_setting('portal_sync.max_inflight')")
		ceiling=$(awk -v b="$bs" -v f="$inflight" -v h="$WAN_HOLD_MS" 'BEGIN { printf "%.0f", b * f * 1000 / h }')
		printf '   drained in %.2f s: %s events accepted in %s requests (%.0f events/request, %.1f requests/s) = %s events/s\n' \
			"$D_SECS" "$D_EVENTS" "$D_REQUESTS" "$(awk -v e="$D_EVENTS" -v n="$D_REQUESTS" 'BEGIN { print n ? e / n : 0 }')" \
			"$(awk -v n="$D_REQUESTS" -v s="$D_SECS" 'BEGIN { print n / s }')" "$rate"
		printf '   first request sent %.3f s after the endpoint was set; %.1f ms per request in all (hold %s ms); ceiling of max_inflight (%s) requests in flight, batch_size x max_inflight / hold: %s events/s; rate / ceiling = %.2f\n' \
			"$D_FIRST" "$(awk -v n="$D_REQUESTS" -v s="$D_SECS" 'BEGIN { print n ? s * 1000 / n : 0 }')" "$WAN_HOLD_MS" \
			"$inflight" "$ceiling" "$(awk -v a="$rate" -v c="$ceiling" 'BEGIN { print a / c }')"
	fi
	echo "   sink: $s_req requests, $s_ev events, $s_bad bodies that did not parse; bodies $s_wire bytes as sent, $s_json bytes of JSON: wire bytes $(ratio "$s_wire" "$s_json"); $(awk -v j="$s_json" -v e="$s_ev" 'BEGIN { printf "%.1f", e ? j / e : 0 }') JSON bytes/event"
	echo "   per request, as the sink saw it: ${s_gap} ms from an answer to the next request (the worker between requests), ${s_recv} ms from its headers to the body's end (the worker sending), $WAN_HOLD_MS ms hold, answers ${s_late} ms late on average (at most ${s_latemax} ms)"
	echo "   failed requests: $D_FAILED in delivery_log; after: pending_events $D_PENDING, dead_letters $D_DEAD, worker state $D_STATE, consecutive_failures $D_CONSEC${D_LASTERR:+, last_error: $D_LASTERR}"
	chk=$("$PYTHON" "$SRC_DIR/test/bench/delivery_sink.py" load --port "$WAN_PORT" \
		--concurrency "$WAN_CHECK_CONN" --seconds "$WAN_CHECK_SECS") || chk="0 0 0 0 -"
	read -r _ c_rps c_eps c_bytes c_failed <<<"$chk"
	printf '   sink check: %s parallel connections POSTing this round'"'"'s largest body (%s bytes as sent) for %s s: %s requests/s = %s events/s, %s failed; the worker'"'"'s %.1f requests/s are %.1f%% of that\n' \
		"$WAN_CHECK_CONN" "$c_bytes" "$WAN_CHECK_SECS" "$c_rps" "$c_eps" "$c_failed" \
		"$(awk -v n="$D_REQUESTS" -v s="$D_SECS" 'BEGIN { print (s > 0 ? n / s : 0) }')" \
		"$(awk -v n="$D_REQUESTS" -v s="$D_SECS" -v c="$c_rps" 'BEGIN { print ((s > 0 && c > 0) ? 100 * n / s / c : 0) }')"
	WAN_RATES[$cfg]+=" $rate"
	WAN_BAD[$cfg]=$(( ${WAN_BAD[$cfg]:-0} + bad ))
	WAN_WIRE[$cfg]=$(( ${WAN_WIRE[$cfg]:-0} + s_wire ))
	WAN_JSON[$cfg]=$(( ${WAN_JSON[$cfg]:-0} + s_json ))
	WAN_EV[$cfg]=$(( ${WAN_EV[$cfg]:-0} + s_ev ))
	WAN_CHK[$cfg]+=" $c_eps"
	WAN_ERR[$cfg]=$(( ${WAN_ERR[$cfg]:-0} + errs ))
done
done
q "ALTER SYSTEM RESET portal_sync.batch_size" >/dev/null
q "ALTER SYSTEM RESET portal_sync.compression" >/dev/null
set_endpoint "$NGINX_URL"
kill "$WAN_SINK_PID" 2>/dev/null || true
wait "$WAN_SINK_PID" 2>/dev/null || true
WAN_SINK_PID=
fi # wan

# ---------------------------------------------------------------- memory
END_RSS=$(tail -n 1 "$WORK/rss.log" | awk '{ print $2 }')
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
echo
echo "== worker memory (RssAnon, sampled every 100 ms; $(grep -c -v '^pid' "$WORK/rss.log") samples)"
for ph in idle setup snapshot fill drain latency ccda mixed_fill mixed wan_fill wan; do
	grep -q "^$ph " "$WORK/rss.log" &&
		printf '   %-10s peak %7s MiB\n' "$ph" "$(mb "$(peak_kb "$ph")")"
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
echo
echo "== figures; load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
F='%-17s %-22s %-15s %s\n'
printf "$F" figure value bar verdict
phase_on drain && printf "$F" "drain rate" "$DRAIN_RATE events/s" ">= 100000/s" \
	"$( [ "$DRAIN_SECS" != -1 ] && [ "$DRAIN_FAILED" -eq 0 ] && verdict "$DRAIN_RATE" ">=" 100000 || echo MISSED)$( [ "$DRAIN_FAILED" -eq 0 ] || echo " ($DRAIN_FAILED failed requests/dead letters)")"
if phase_on wan; then
	WAN_GZ_WIRE=0 WAN_GZ_JSON=0 WAN_REF=
	for cfg in "${WAN_CONFIGS[@]}"; do
		IFS=: read -r bs comp <<<"$cfg"
		# shellcheck disable=SC2086
		med=$(median ${WAN_RATES[$cfg]})
		note=$( [ "${WAN_ERR[$cfg]}" -eq 0 ] || echo " (${WAN_ERR[$cfg]} worker errors in the server log)")
		if [ "$comp" = gzip ]; then
			printf "$F" "WAN b=$bs" "$med events/s" ">= $WAN_BAR/s" \
				"$( [ "${WAN_BAD[$cfg]}" -eq 0 ] && verdict "$med" ">=" "$WAN_BAR" || echo "MISSED (${WAN_BAD[$cfg]} failed requests/dead letters/timeouts)")$note"
			WAN_GZ_WIRE=$((WAN_GZ_WIRE + ${WAN_WIRE[$cfg]}))
			WAN_GZ_JSON=$((WAN_GZ_JSON + ${WAN_JSON[$cfg]}))
			{ [ -z "$WAN_REF" ] || [ "$bs" = 500 ]; } && WAN_REF=$cfg
		else
			printf "$F" "WAN b=$bs $comp" "$med events/s" "(comparison)" \
				"-$( [ "${WAN_BAD[$cfg]}" -eq 0 ] || echo " (${WAN_BAD[$cfg]} failed requests/dead letters/timeouts)")$note"
		fi
	done
	if [ "$WAN_GZ_JSON" -gt 0 ]; then
		r=$(awk -v a="$WAN_GZ_WIRE" -v b="$WAN_GZ_JSON" 'BEGIN { print a / b }')
		printf "$F" "wire bytes WAN" "$(ratio "$WAN_GZ_WIRE" "$WAN_GZ_JSON")" "<= 0.125 (1/8)" "$(verdict "$r" "<=" 0.125)"
	fi
fi
if phase_on drain && [ "$NGX_EVENTS" -gt 0 ] && [ "$NGX_WIRE" -gt 0 ] && [ -n "${WAN_REF:-}" ] && [ "${WAN_EV[$WAN_REF]:-0}" -gt 0 ]; then
	NGX_JSON=$(awk -v e="$NGX_EVENTS" -v j="${WAN_JSON[$WAN_REF]}" -v n="${WAN_EV[$WAN_REF]}" 'BEGIN { printf "%.0f", e * j / n }')
	r=$(awk -v a="$NGX_WIRE" -v b="$NGX_JSON" 'BEGIN { print a / b }')
	printf "$F" "wire bytes nginx" "~$(ratio "$NGX_WIRE" "$NGX_JSON")" "<= 0.125 (1/8)" "$(verdict "$r" "<=" 0.125) (estimate)"
fi
phase_on latency && printf "$F" "latency p50" "$LAT_P50 ms" "<= 10 ms" "$(verdict "$LAT_P50" "<=" 10)"
phase_on latency && printf "$F" "latency p99" "$LAT_P99 ms" "<= 50 ms" "$(verdict "$LAT_P99" "<=" 50)"
phase_on snapshot && printf "$F" "snapshot time" "$(printf '%.2f' "$SNAP_MED") s" "<= 10 s" \
	"$( [ "$SNAP_TIMED_OUT" = 0 ] && verdict "$SNAP_MED" "<=" 10 || echo "MISSED (a round timed out)")"
if phase_on snapshot || phase_on drain || phase_on ccda; then
	printf "$F" "worker memory" "$(mb "$MEM_KB") MiB" "<= 64 MiB" "$(verdict "$MEM_KB" "<=" 65536)"
fi
phase_on resume && printf "$F" "resume delay" "$RESUME_MED s" "(none)" "-"
phase_on mixed && printf "$F" "mixed backlog" "$MIXED_RATE events/s" ">= $MIXED_BAR/s" \
	"$( [ "$MIXED_SECS" != -1 ] && [ "$MIXED_FAILED" -eq 0 ] && verdict "$MIXED_RATE" ">=" "$MIXED_BAR" || echo MISSED)$( [ "$MIXED_FAILED" -eq 0 ] || echo " ($MIXED_FAILED failed requests/dead letters)") (all events: $MIXED_ALL_RATE/s)"
echo "(phases run:$PHASES; snapshot time: median of $SNAP_ROUNDS rounds of $SNAP_PATIENTS patients x $SNAP_ITEMS items; drain: one round of $DRAIN_EVENTS events;"
echo " latency: median over $LAT_ROUNDS rounds of each round's p50/p99, $LAT_RATE commits/s for $LAT_TIME s; memory: peak over the"
echo " snapshot, drain and C-CDA phases; resume delay: median of 3; mixed backlog: one round, $MIXED_PATIENTS patients x $MIXED_ITEMS items"
echo " enrolled with the endpoint empty, then $MIXED_EVENTS incremental events, figure = those events / seconds until pending_events = 0;"
echo " WAN: median of $WAN_ROUNDS round(s) of $WAN_EVENTS events per setting, sink holding $WAN_HOLD_MS ms, max_inflight requests in flight, so"
echo " at most batch_size x max_inflight x $(awk -v h="$WAN_HOLD_MS" 'BEGIN { printf "%g", 1000 / h }') events/s; wire bytes WAN: sink-counted body bytes / JSON bytes over the gzip rounds;"
echo " wire bytes nginx: bytes received (ss) - \$request_length, i.e. chunked bodies, / (events x JSON bytes per event of the WAN round"
echo " ${WAN_REF:-(none)}): an estimate)"
[ "$QUICK" = 1 ] && echo "(--quick: smaller sizes than BENCHMARKS.md defines; figures are indicative only)"
exit 0
