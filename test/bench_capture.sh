#!/usr/bin/env bash
# Capture-cost benchmark of portal_sync (a benchmark, not a test: it prints
# figures and exits 0 whatever they are).  Measures, as BENCHMARKS.md
# defines them:
#
#   bulk capture ratio   median wall time of one INSERT ... SELECT
#                        generate_series(1, 200000) into ehr.medication, half
#                        of the rows for enrolled patients, with portal_sync
#                        attached / with no trigger  (bar <= 1.3)
#   vs. reference        (portal_sync - none) / (reference - none), where
#                        "reference" is the plain PL/pgSQL row trigger below
#                        (bar <= 1/3)
#   OLTP ratio           pgbench, 2 clients, 30 s, one ehr.medication row
#                        per transaction for a random patient: TPS with
#                        portal_sync / TPS without  (bar >= 0.95)
#
# Each ratio is printed twice: with the table attached as the reference
# setup attaches it (every column sent), and attached with a columns list
# (mode "columns": the minimum-necessary columns of attach()).
#
# Rounds are interleaved (none, portal_sync, reference, none, ...) in one
# server and, for the bulk insert, one psql session; the table is truncated
# and CHECKPOINTed before every round; figures are medians.
#
# Usage (with portal_sync installed: the package, or `make install`), as
# root or as postgres:
#   bash test/bench_capture.sh [--quick]
# Environment:
#   BENCH_QUICK=1          same as --quick: pgbench rounds of 10 s, 3 bulk rounds
#   BENCH_ROUNDS           bulk-insert rounds per mode (default 7)
#   BENCH_ROWS             rows per bulk insert (default 200000)
#   BENCH_PATIENTS         patients in the chart table (default 4000; the even
#                          ones, half of them, are enrolled)
#   BENCH_PGBENCH_ROUNDS   pgbench rounds per mode (default 3)
#   BENCH_PGBENCH_TIME     seconds per pgbench round (default 30)
#   BENCH_PORT             port of the throwaway server (default 54329)
#   BENCH_SHARED_BUFFERS   default 256MB
#   BENCH_SYNCHRONOUS_COMMIT  synchronous_commit of the server (default on;
#                          off: the OLTP ratio without the commit's WAL
#                          flush, i.e. CPU-bound, where capture weighs most)
#   BENCH_NO_FK=1          drop the foreign key of the benchmarked table to
#                          ehr.patient (its per-row check doubles the bare
#                          insert's cost, which flatters the ratios)
#   BENCH_KEEP=1           keep the cluster directory afterwards
#   PG_CONFIG              default /usr/lib/postgresql/15/bin/pg_config
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

for arg in "$@"; do
	case "$arg" in
		--quick) BENCH_QUICK=1 ;;
		-h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "bench_capture: unknown argument $arg" >&2; exit 2 ;;
	esac
done
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
	ROUNDS=${BENCH_ROUNDS:-3}
	PGB_TIME=${BENCH_PGBENCH_TIME:-10}
else
	ROUNDS=${BENCH_ROUNDS:-7}
	PGB_TIME=${BENCH_PGBENCH_TIME:-30}
fi
ROWS=${BENCH_ROWS:-200000}
PATIENTS=${BENCH_PATIENTS:-4000}
PGB_ROUNDS=${BENCH_PGBENCH_ROUNDS:-3}
PGB_CLIENTS=2
PORT=${BENCH_PORT:-54329}
SHARED_BUFFERS=${BENCH_SHARED_BUFFERS:-256MB}
TABLE=ehr.medication

die() { echo "bench_capture: $*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || die "$PG_CONFIG not found (install postgresql-server-dev-15)"
BINDIR=$("$PG_CONFIG" --bindir)
SHAREDIR=$("$PG_CONFIG" --sharedir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
[ -f "$SHAREDIR/extension/portal_sync.control" ] && [ -f "$PKGLIBDIR/portal_sync.so" ] ||
	die "portal_sync is not installed: install the package (README: Installing the package) or run 'make install' first"
[ -f "$SRC_DIR/test/reference_schema.sql" ] || die "test/reference_schema.sql missing"
[ -f "$SRC_DIR/test/attach_reference.sql" ] || die "test/attach_reference.sql missing"

# The server and its clients run as postgres (initdb refuses root).
if [ "$(id -u)" -eq 0 ]; then
	id postgres >/dev/null 2>&1 || die "no postgres user"
	as_pg() { runuser -u postgres -- "$@"; }
elif [ "$(id -un)" = postgres ]; then
	as_pg() { "$@"; }
else
	die "run as root or as postgres"
fi

WORK=$(mktemp -d /tmp/portal_sync-bench.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" -eq 0 ] && chown postgres: "$WORK"
DATA=$WORK/data

cleanup() {
	if [ -f "$DATA/postmaster.pid" ]; then
		as_pg "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 ||
			as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
	fi
	if [ "${BENCH_KEEP:-0}" = 1 ]; then
		echo "cluster kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Reference files are copied so that postgres can read them wherever the
# checkout lives.
cp "$SRC_DIR/test/reference_schema.sql" "$SRC_DIR/test/attach_reference.sql" "$WORK/"
[ "$(id -u)" -eq 0 ] && chown postgres: "$WORK"/*.sql

server_failed() {
	echo "--- tail of the server log:" >&2
	tail -n 30 "$WORK/server.log" >&2 || true
	die "$1 failed"
}
psql_bench() { as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -d bench "$@"; }

# ---------------------------------------------------------------- server
echo "== throwaway cluster in $DATA (port $PORT, unix socket only)"
as_pg "$BINDIR/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 ||
	{ cat "$WORK/initdb.log"; die "initdb failed"; }
cat >>"$DATA/postgresql.conf" <<EOF

# bench_capture.sh
shared_preload_libraries = 'portal_sync'
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
shared_buffers = $SHARED_BUFFERS
synchronous_commit = ${BENCH_SYNCHRONOUS_COMMIT:-on}
max_wal_size = 8GB
checkpoint_timeout = 30min
autovacuum = off
jit = off
logging_collector = off
EOF
as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w start >/dev/null ||
	{ cat "$WORK/server.log"; die "server did not start"; }
as_pg "$BINDIR/createdb" -h "$WORK" -p "$PORT" bench

# ---------------------------------------------------------------- schema
echo "== reference schema, $PATIENTS patients, portal_sync attached, even patients enrolled"
psql_bench -f "$WORK/reference_schema.sql" >/dev/null
psql_bench <<EOF >/dev/null || server_failed "setup"
INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, sex)
SELECT g, 'MRN' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g,
       date '2010-01-01' + g % 5000, (ARRAY['F','M'])[1 + g % 2]
FROM generate_series(1, $PATIENTS) g;

CREATE EXTENSION portal_sync;
\i $WORK/attach_reference.sql
SELECT count(*) FILTER (WHERE portal_sync.enroll(g::text))
FROM generate_series(2, $PATIENTS, 2) g;

-- Remember how the reference setup attaches $TABLE, to re-attach it the
-- same way in "portal_sync" rounds.
CREATE SCHEMA bench;
CREATE TABLE bench.attach_args AS
SELECT format('SELECT portal_sync.attach(%L, %L, %L, key_col => %L, date_col => %L, '
              'privacy_col => %L, share_when => %L, enroll_when => %L, name => %L)',
              source, kind, patient_col, key_col, date_col, privacy_col,
              share_when, enroll_when, name) AS sql,
       format('SELECT portal_sync.attach(%L, %L, %L, key_col => %L, date_col => %L, '
              'privacy_col => %L, share_when => %L, enroll_when => %L, name => %L, '
              'columns => %L)',
              source, kind, patient_col, key_col, date_col, privacy_col,
              share_when, enroll_when, name,
              '{med_id, drug_name, dose, route, frequency, start_date, end_date, status}') AS sql_columns
FROM portal_sync.sources WHERE source = '$TABLE'::regclass;

-- The reference trigger: the plain way a DBA would write capture.
CREATE TABLE bench.ref_outbox (
    patient_id text,
    source     text,
    op         text,
    key        text
);
CREATE FUNCTION bench.ref_capture() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM portal_sync.enrollment
                   WHERE patient_id = OLD.patient_id::text) THEN
            INSERT INTO bench.ref_outbox (patient_id, source, op, key)
            VALUES (OLD.patient_id::text, TG_TABLE_NAME, TG_OP, OLD.med_id::text);
        END IF;
        RETURN OLD;
    END IF;
    IF EXISTS (SELECT 1 FROM portal_sync.enrollment
               WHERE patient_id = NEW.patient_id::text) THEN
        INSERT INTO bench.ref_outbox (patient_id, source, op, key)
        VALUES (NEW.patient_id::text, TG_TABLE_NAME, TG_OP, NEW.med_id::text);
    END IF;
    RETURN NEW;
END
\$\$;

-- Switching modes.
CREATE FUNCTION bench.set_mode(mode text) RETURNS void LANGUAGE plpgsql AS \$\$
DECLARE
    n int;
BEGIN
    IF EXISTS (SELECT 1 FROM portal_sync.sources WHERE source = '$TABLE'::regclass) THEN
        PERFORM portal_sync.detach('$TABLE');
    END IF;
    DROP TRIGGER IF EXISTS ref_capture ON $TABLE;
    IF mode = 'portal_sync' THEN
        EXECUTE (SELECT sql FROM bench.attach_args);
    ELSIF mode = 'columns' THEN
        EXECUTE (SELECT sql_columns FROM bench.attach_args);
    ELSIF mode = 'reference' THEN
        CREATE TRIGGER ref_capture AFTER INSERT OR UPDATE OR DELETE ON $TABLE
            FOR EACH ROW EXECUTE FUNCTION bench.ref_capture();
    END IF;
    -- Only the mode's own triggers may be on the table.
    SELECT count(*) INTO n FROM pg_trigger
    WHERE tgrelid = '$TABLE'::regclass AND NOT tgisinternal;
    IF (mode = 'none' AND n <> 0) OR (mode = 'reference' AND n <> 1)
       OR (mode IN ('portal_sync', 'columns') AND n = 0) THEN
        RAISE EXCEPTION 'unexpected triggers on $TABLE in mode %: %', mode, n;
    END IF;
END
\$\$;

CREATE TABLE bench.result (phase text, mode text, round int, value float8);
\\if $([ "${BENCH_NO_FK:-0}" = 1 ] && echo true || echo false)
SELECT format('ALTER TABLE $TABLE DROP CONSTRAINT %I', conname) AS drop_fk
FROM pg_constraint WHERE conrelid = '$TABLE'::regclass AND contype = 'f' \\gexec
\\endif
VACUUM ANALYZE;
EOF
[ -n "$(psql_bench -Atc 'SELECT sql FROM bench.attach_args')" ] ||
	die "test/attach_reference.sql does not attach $TABLE"

# ---------------------------------------------------------------- machine
echo
echo "== machine and settings"
echo "cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "os: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
psql_bench -At <<'EOF'
SELECT version();
SELECT format('%s = %s', name, current_setting(name))
FROM pg_settings
WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'wal_level',
               'max_wal_size', 'checkpoint_timeout', 'autovacuum', 'jit',
               'shared_preload_libraries', 'wal_buffers', 'work_mem')
ORDER BY name;
SELECT format('portal_sync %s; %s sources attached; %s of %s patients enrolled',
              (SELECT extversion FROM pg_extension WHERE extname = 'portal_sync'),
              (SELECT count(*) FROM portal_sync.sources),
              (SELECT count(*) FROM portal_sync.enrollment),
              (SELECT count(*) FROM ehr.patient));
SELECT format('portal_sync.endpoint = ''%s'' (the worker does not deliver during this benchmark)',
              current_setting('portal_sync.endpoint'));
EOF

# ---------------------------------------------------------------- bulk insert
INSERT_SQL="INSERT INTO $TABLE (patient_id, drug_name, rxnorm, dose, route, frequency,
                               start_date, status, prescriber, privacy_level)
SELECT 1 + g % $PATIENTS, 'amoxicillin ' || (g % 97), (308182 + g % 50)::text,
       '250 mg/5 mL', 'oral', 'BID x 10 days', date '2020-01-01' + g % 2000,
       'active', 'Dr. Provider ' || (g % 12), 0
FROM generate_series(1, $ROWS) g"

echo
echo "== bulk insert: $ROWS rows into $TABLE ($(psql_bench -Atc "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = '$TABLE'::regclass AND contype = 'f') THEN 'with' ELSE 'without' END") its foreign key to ehr.patient), $ROUNDS rounds per mode (+1 warm-up), one session"
SCRIPT=$WORK/bulk.sql
{
	echo "\\set QUIET on"
	echo "SET client_min_messages = warning;"
	round() { # mode round-number (0 = warm-up, not recorded)
		cat <<EOF
SELECT bench.set_mode('$1') \\gset
TRUNCATE $TABLE;
TRUNCATE portal_sync.outbox, bench.ref_outbox;
CHECKPOINT;
SELECT clock_timestamp() AS t0 \\gset
$INSERT_SQL;
SELECT extract(epoch FROM clock_timestamp() - :'t0') AS secs \\gset
SELECT count(*) AS outbox_rows FROM portal_sync.outbox \\gset
SELECT count(*) AS ref_rows FROM bench.ref_outbox \\gset
INSERT INTO bench.result SELECT 'bulk', '$1', $2, :secs WHERE $2 > 0;
\\echo '   round $2 $1' :secs 's  (outbox rows:' :outbox_rows ', reference outbox rows:' :ref_rows ')'
EOF
	}
	for m in none portal_sync columns reference; do round "$m" 0; done
	for ((r = 1; r <= ROUNDS; r++)); do
		for m in none portal_sync columns reference; do round "$m" "$r"; done
	done
	echo "SELECT bench.set_mode('portal_sync') \\gset"
} >"$SCRIPT"
[ "$(id -u)" -eq 0 ] && chown postgres: "$SCRIPT"
psql_bench -f "$SCRIPT" || server_failed "bulk insert rounds"

# ---------------------------------------------------------------- pgbench
echo
echo "== pgbench: $PGB_CLIENTS clients, ${PGB_TIME}s, $PGB_ROUNDS rounds per mode (+1 short warm-up), one $TABLE row per transaction"
PGB_SCRIPT=$WORK/oltp.pgbench
cat >"$PGB_SCRIPT" <<EOF
\\set g random(1, 1000000000)
INSERT INTO $TABLE (patient_id, drug_name, rxnorm, dose, route, frequency,
                   start_date, status, prescriber, privacy_level)
VALUES (1 + :g % $PATIENTS, 'amoxicillin ' || (:g % 97), (308182 + :g % 50)::text,
        '250 mg/5 mL', 'oral', 'BID x 10 days', date '2020-01-01' + :g % 2000,
        'active', 'Dr. Provider ' || (:g % 12), 0);
EOF
[ "$(id -u)" -eq 0 ] && chown postgres: "$PGB_SCRIPT"

# CPU seconds used so far by portal_sync's launcher and workers: on two
# cores, a worker that wakes at every commit competes with the clients.
worker_cpu() {
	local pids pid total=0 t
	pids=$(psql_bench -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'portal_sync%'")
	for pid in $pids; do
		t=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
		total=$((total + ${t:-0}))
	done
	awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}'
}

pgb_round() { # mode round-number seconds
	psql_bench -c "SET client_min_messages = warning" -c "SELECT bench.set_mode('$1')" \
		-c "TRUNCATE $TABLE" -c "TRUNCATE portal_sync.outbox, bench.ref_outbox" \
		-c "CHECKPOINT" >/dev/null || server_failed "switching to mode $1"
	local out tps cpu0 cpu1
	cpu0=$(worker_cpu)
	out=$(as_pg "$BINDIR/pgbench" -n -h "$WORK" -p "$PORT" -c "$PGB_CLIENTS" -j "$PGB_CLIENTS" \
		-T "$3" -f "$PGB_SCRIPT" bench 2>&1) || { echo "$out"; server_failed "pgbench"; }
	tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' <<<"$out")
	[ -n "$tps" ] || { echo "$out"; die "no tps in pgbench output"; }
	cpu1=$(worker_cpu)
	if [ "$2" -gt 0 ]; then
		psql_bench -c "INSERT INTO bench.result VALUES ('oltp', '$1', $2, $tps)"
		printf '   round %d %-12s %10.1f tps   (portal_sync processes used %s s CPU)\n' \
			"$2" "$1" "$tps" "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN {printf "%.2f", b - a}')"
	fi
}
pgb_round none 0 5
pgb_round portal_sync 0 5
pgb_round columns 0 5
for ((r = 1; r <= PGB_ROUNDS; r++)); do
	pgb_round none "$r" "$PGB_TIME"
	pgb_round portal_sync "$r" "$PGB_TIME"
	pgb_round columns "$r" "$PGB_TIME"
done

# ---------------------------------------------------------------- figures
echo
echo "== figures (medians); load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
psql_bench -At <<'EOF'
WITH m AS (
    SELECT phase, mode,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY value) AS med,
           min(value) AS lo, max(value) AS hi,
           count(*) AS n
    FROM bench.result GROUP BY phase, mode
), b AS (
    SELECT max(med) FILTER (WHERE mode = 'none') AS none,
           max(med) FILTER (WHERE mode = 'portal_sync') AS ps,
           max(med) FILTER (WHERE mode = 'columns') AS cols,
           max(med) FILTER (WHERE mode = 'reference') AS ref,
           min(n) AS n
    FROM m WHERE phase = 'bulk'
), o AS (
    SELECT max(med) FILTER (WHERE mode = 'none') AS none,
           max(med) FILTER (WHERE mode = 'portal_sync') AS ps,
           max(med) FILTER (WHERE mode = 'columns') AS cols,
           min(n) AS n
    FROM m WHERE phase = 'oltp'
)
SELECT format('spread %-4s %-12s median %s, min %s, max %s (%s rounds)',
              phase, mode, round(med::numeric, 3), round(lo::numeric, 3),
              round(hi::numeric, 3), n)
FROM m
UNION ALL
SELECT format('bulk insert, median of %s rounds: none %s s, portal_sync %s s, columns %s s, reference trigger %s s',
              b.n, round(b.none::numeric, 3), round(b.ps::numeric, 3), round(b.cols::numeric, 3),
              round(b.ref::numeric, 3))
FROM b
UNION ALL
SELECT format('bulk capture ratio      portal_sync / none             = %s   (bar <= 1.3: %s)',
              round((b.ps / b.none)::numeric, 3),
              CASE WHEN b.ps / b.none <= 1.3 THEN 'met' ELSE 'MISSED' END)
FROM b
UNION ALL
SELECT format('bulk capture ratio      columns / none                 = %s   (bar <= 1.3: %s)',
              round((b.cols / b.none)::numeric, 3),
              CASE WHEN b.cols / b.none <= 1.3 THEN 'met' ELSE 'MISSED' END)
FROM b
UNION ALL
SELECT format('reference trigger ratio reference / none               = %s',
              round((b.ref / b.none)::numeric, 3))
FROM b
UNION ALL
SELECT format('capture cost vs. reference (portal_sync - none) / (reference - none) = %s   (bar <= 0.333: %s)',
              round(((b.ps - b.none) / nullif(b.ref - b.none, 0))::numeric, 3),
              CASE WHEN (b.ps - b.none) <= (b.ref - b.none) / 3 THEN 'met' ELSE 'MISSED' END)
FROM b
UNION ALL
SELECT format('pgbench, median of %s rounds: none %s tps, portal_sync %s tps, columns %s tps',
              o.n, round(o.none::numeric, 1), round(o.ps::numeric, 1), round(o.cols::numeric, 1))
FROM o
UNION ALL
SELECT format('OLTP ratio              portal_sync tps / none tps     = %s   (bar >= 0.95: %s)',
              round((o.ps / o.none)::numeric, 3),
              CASE WHEN o.ps / o.none >= 0.95 THEN 'met' ELSE 'MISSED' END)
FROM o
UNION ALL
SELECT format('OLTP ratio              columns tps / none tps         = %s   (bar >= 0.95: %s)',
              round((o.cols / o.none)::numeric, 3),
              CASE WHEN o.cols / o.none >= 0.95 THEN 'met' ELSE 'MISSED' END)
FROM o;
EOF
