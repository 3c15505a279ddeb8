#!/usr/bin/env bash
# Leak check of portal_sync's delivery worker (a test: exit 0 = pass).
#
#   bash test/leakcheck.sh               as root (CI), or as postgres
#
# Needs portal_sync installed in the system PostgreSQL 15 (the package,
# or `make install`); checks that first and fails otherwise.  A throwaway node
# (PostgreSQL::Test::Cluster, set up as for the TAP tests and test/soak.sh
# by test/lib/tap_script.sh and test/lib/PortalSyncTest.pm; run as
# postgres) holds the reference schema (test/reference_schema.sql, attached
# by test/attach_reference.sql) and delivers to the local test portal
# (test/portal/portal.py).  test/lib/sample_memory.pl reads RssAnon (the
# worker's private anonymous memory: heap and mmapped blocks), RssFile and
# RssShmem (shared buffers it touched: not a leak, shown for information)
# of the worker from /proc/PID/status every 100 ms; the pid is
# portal_sync.status.worker_pid.  After each phase the worker also logs its
# memory contexts (pg_log_backend_memory_contexts): their "Grand total ...
# used" is every palloc'd byte, exactly.
#
# Phases:
#   warm-up  LEAKCHECK_PATIENTS patients with 3 items in each clinical
#            source are booked (enrolled): their snapshots.  Then a C-CDA
#            document of LEAKCHECK_CCDA_MB MiB for patient 1 and 10,000
#            incremental events, sent through the "retry" faults below.
#   1..N     LEAKCHECK_PHASES drain phases share LEAKCHECK_EVENTS
#            incremental events: new shareable rows of 6 clinical tables for
#            the enrolled patients, INSERT ... SELECT of 10,000 rows, written
#            while the worker drains.  Each phase first replaces the C-CDA
#            document (an UPDATE of its row: a new LEAKCHECK_CCDA_MB MiB
#            document to send).  The portal's faults rotate by phase:
#              retry  first a share_when that fails (division by zero) on
#                     a row written with the document: reading that unit
#                     fails 3 times (retried with backoff) until the rule is
#                     attached again without it; then 500 x3, 429 with
#                     Retry-After: 1 x2, an answer slower than http_timeout
#                     (a timeout) x1, a dropped connection x1: these hit
#                     the 10 MB document, read and sent again at each retry;
#              split  400 to any batch holding one of 3 chosen events: the
#                     batch is split in halves until the event is alone,
#                     then it is dead-lettered; and 2xx answers whose
#                     "rejected" list names 1,003 other events (dead
#                     letters too);
#              413    413 to any body over 100 kB: the 500-event batches are
#                     split until they fit; the 10 MB document, alone, is
#                     dead-lettered with HTTP 413;
#              slow   every answer 20 ms late, 2% random 503s.
#            A phase ends when the outbox is empty, followed by
#            LEAKCHECK_IDLE_SECONDS of idle worker (its "idle" samples).
#   checks   after each phase and at the end, nothing lost: the outbox
#            empty, pending_events 0, the worker's delivered_total grown by
#            exactly the events written minus the dead-lettered ones, and
#            exactly the expected dead letters (1,006 per split phase, 1 per
#            413 phase); at the end the portal has applied each accepted
#            event (distinct event ids) and seen no order, C-CDA, purge,
#            snapshot or protocol violation, and the worker never restarted.
#
# Verdict.  The warm point is phase 1, the first phase after the warm-up
# (the 10 MB document is read and sent again at each of its retries);
# "idle RssAnon" of a phase = the median of its idle samples;
# T = LEAKCHECK_TOLERANCE_MB (default 4), C = LEAKCHECK_CONTEXT_TOLERANCE_KB
# (default 256).  Pass if all of:
#   end     idle RssAnon at the end       - idle RssAnon of phase 1    <= T
#   trend   median idle RssAnon of the second half of the phases
#           - that of the first half (same faults, in the same order)   <= T
#   palloc  context bytes used at the end - after phase 1               <= C
# The peaks of each phase are printed, not judged.
# Why these: the server runs with LEAKCHECK_GLIBC_TUNABLES (default
# glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=262144),
# so that glibc returns freed large blocks and the top of the heap at once:
# idle RssAnon is then the memory in use (about 6 MiB; +0.07 MiB from
# phase 1 to the end in a run without a leak), not the high-water mark of
# the 10 MB document (with glibc's default dynamic thresholds the worker
# keeps about 15 MiB of freed heap, in which a leak of that size would
# hide).  T = 4 MiB fails a leak of 16 bytes per event (0.6 MiB per
# phase).  The peaks (20-42 MiB, while a 10 MB document is read and sent)
# depend on when a sample falls during that read, not on how long the
# worker has run (CI saw the second half's highest 11 MiB above the
# first's with flat idle figures): memory freed after each send is no
# leak, a leak shows in the idle and palloc figures, and the bar of SPEC 5
# (memory bounded by bytes) is checked by the bigdoc phase.  Context
# totals move by up to 80 kB as caches are invalidated and rebuilt;
# C = 256 kB is under one byte per event.  docs/memory-safety.md has the measured figures.
#
# Environment:
#   LEAKCHECK_EVENTS               incremental events of the drain phases
#                                  (default 300000; the warm-up adds 10,000)
#   LEAKCHECK_PHASES               drain phases, rotating the 4 fault kinds
#                                  (default 8: two rounds; at least 2)
#   LEAKCHECK_PATIENTS             enrolled patients (default 200)
#   LEAKCHECK_CCDA_MB              size of the C-CDA document (default 10)
#   LEAKCHECK_TOLERANCE_MB         T (default 4)
#   LEAKCHECK_CONTEXT_TOLERANCE_KB C (default 256)
#   LEAKCHECK_IDLE_SECONDS         idle time after each phase (default 3)
#   LEAKCHECK_GLIBC_TUNABLES       GLIBC_TUNABLES of the server (default
#                                  above; empty: glibc's defaults)
#   LEAKCHECK_KEEP=1               keep the work directory (server log,
#                                  samples in memory.log) after a pass too
#   PG_CONFIG                      default /usr/lib/postgresql/15/bin/pg_config
# Runtime with the defaults: about 4 minutes (232 s) on a 2-CPU machine.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
	-h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
	'') ;;
	*) echo "leakcheck: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
. "$SRC_DIR/test/lib/tap_script.sh"
tap_script_init leakcheck
command -v python3 >/dev/null || tap_script_die "python3 not found (the test portal needs it)"
echo "leakcheck: work directory $WORK; load average $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs"
t_start=$(date +%s)
rc=0
tap_script_run \
	LEAKCHECK_EVENTS="${LEAKCHECK_EVENTS:-300000}" LEAKCHECK_PHASES="${LEAKCHECK_PHASES:-8}" \
	LEAKCHECK_PATIENTS="${LEAKCHECK_PATIENTS:-200}" LEAKCHECK_CCDA_MB="${LEAKCHECK_CCDA_MB:-10}" \
	LEAKCHECK_TOLERANCE_MB="${LEAKCHECK_TOLERANCE_MB:-4}" \
	LEAKCHECK_CONTEXT_TOLERANCE_KB="${LEAKCHECK_CONTEXT_TOLERANCE_KB:-256}" \
	LEAKCHECK_IDLE_SECONDS="${LEAKCHECK_IDLE_SECONDS:-3}" \
	LEAKCHECK_GLIBC_TUNABLES="${LEAKCHECK_GLIBC_TUNABLES-glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=262144}" \
	PORTAL_SYNC_TEST_WAIT=600 <<'PERL' || rc=$?
use strict;
use warnings;
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use List::Util qw(max sum);
use Time::HiRes qw(time sleep);

my $nevents = $ENV{LEAKCHECK_EVENTS};
my $nphases = $ENV{LEAKCHECK_PHASES};
my $np = $ENV{LEAKCHECK_PATIENTS};
my $doc_mb = $ENV{LEAKCHECK_CCDA_MB};
my $tol_kb = $ENV{LEAKCHECK_TOLERANCE_MB} * 1024;
my $ctx_tol = $ENV{LEAKCHECK_CONTEXT_TOLERANCE_KB} * 1024;
my $idle_s = $ENV{LEAKCHECK_IDLE_SECONDS};
my $tunables = $ENV{LEAKCHECK_GLIBC_TUNABLES};
my $chunk = 10000;
my $db = 'postgres';
die "LEAKCHECK_PHASES must be at least 2\n" unless $nphases >= 2;
die "LEAKCHECK_EVENTS must be at least 2000 per phase\n" unless $nevents >= $nphases * 2000;

# PostgreSQL::Test::Utils sends STDOUT to the log file: the report goes to
# the test output (the terminal).
my $out = Test::More->builder->output;
sub report { print $out @_, "\n"; return; }

my $portal = PortalSyncTest::Portal->start;
my $node;
{
	# Only the server gets the tunables (see the header).
	local $ENV{GLIBC_TUNABLES} = $tunables if $tunables ne '';
	$node = ps_new_node('leakcheck', $portal, conf => q{
log_statement = none
shared_buffers = 128MB
max_wal_size = 4GB
checkpoint_timeout = 30min
});
}
$node->safe_psql($db, <<'EOSQL');
CREATE SCHEMA leakcheck;

-- A C-CDA document of about mb MiB, different for each round r.
CREATE FUNCTION leakcheck.document(r int, mb int) RETURNS text LANGUAGE sql AS $$
SELECT '<?xml version="1.0" encoding="UTF-8"?>' || E'\n'
	|| '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">' || E'\n'
	|| string_agg(format('<entry><observation classCode="OBS" moodCode="EVN"><id root="%s"/>'
						 '<code code="8302-2" codeSystem="2.16.840.1.113883.6.1"/>'
						 '<value xsi:type="PQ" value="%s" unit="cm"/></observation></entry>',
						 md5((r::bigint * 10000000 + g)::text), lpad((g % 1000)::text, 4, '0')), E'\n')
	|| E'\n</ClinicalDocument>\n'
FROM generate_series(1, ceil(mb * 1048576.0 / 213)::int) g
$$;

-- n new shareable rows of one of 6 clinical tables (k picks it) for
-- patients 1..np, in one statement: n events.
CREATE FUNCTION leakcheck.fill(n int, k int, np int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	CASE k % 6
	WHEN 0 THEN
		INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dose, route, frequency, start_date, prescriber)
		SELECT 1 + g % np, 'amoxicillin ' || g % 97, (308182 + g % 50)::text, '250 mg/5 mL', 'oral',
			   'BID x 10 days', date '2024-01-01' + g % 600, 'Dr. Provider ' || g % 12
		FROM generate_series(1, n) g;
	WHEN 1 THEN
		INSERT INTO ehr.allergy (patient_id, allergen, reaction, severity, onset_date, recorded_at)
		SELECT 1 + g % np, 'allergen ' || g % 53, 'hives', (ARRAY['mild','moderate','severe'])[1 + g % 3],
			   date '2020-01-01' + g % 900, date '2024-01-01' + g % 600
		FROM generate_series(1, n) g;
	WHEN 2 THEN
		INSERT INTO ehr.problem (patient_id, description, icd10, onset_date, noted_on)
		SELECT 1 + g % np, 'problem ' || g % 211, 'J0' || g % 10, date '2020-01-01' + g % 900,
			   date '2024-01-01' + g % 600
		FROM generate_series(1, n) g;
	WHEN 3 THEN
		INSERT INTO ehr.immunization (patient_id, vaccine, cvx, dose_number, administered_on, lot_number, site)
		SELECT 1 + g % np, 'DTaP', (20 + g % 30)::text, 1 + g % 5, date '2024-01-01' + g % 600,
			   'LOT' || g % 1000, 'left thigh'
		FROM generate_series(1, n) g;
	WHEN 4 THEN
		INSERT INTO ehr.lab_result (patient_id, test_name, loinc, value, units, status, result_date)
		SELECT 1 + g % np, 'hemoglobin', '718-7', (10 + g % 50 / 10.0)::text, 'g/dL', 'final',
			   date '2024-01-01' + g % 600
		FROM generate_series(1, n) g;
	ELSE
		INSERT INTO ehr.vital_sign (patient_id, measured_at, height_cm, weight_kg, temp_c, pulse)
		SELECT 1 + g % np, timestamp '2024-01-01 08:00' + g * interval '1 minute', 80 + g % 90,
			   10 + g % 60, 36.5 + g % 10 / 10.0, 70 + g % 60
		FROM generate_series(1, n) g;
	END CASE;
END
$$;
EOSQL

# ---------------------------------------------------------------- sampler
my $wpid;
ps_wait_until(sub { $wpid = ps_status($node, $db)->{worker_pid} }, 'the delivery worker');
die "no delivery worker\n" unless $wpid;
my $phase_file = "$PostgreSQL::Test::Utils::tmp_check/phase";
my $mem_log = "$ENV{TESTDIR}/memory.log";

# The phase the samples are tagged with: "label:busy" or "label:idle".
sub set_phase
{
	my ($phase) = @_;
	unlink("$phase_file.new");
	PostgreSQL::Test::Utils::append_to_file("$phase_file.new", "$phase\n");
	rename("$phase_file.new", $phase_file) or die "rename: $!";
	return;
}
set_phase('setup:busy');
my $sampler = IPC::Run::start(
	[ 'perl', PortalSyncTest::ps_root() . '/test/lib/sample_memory.pl', $wpid, $phase_file, $mem_log, 100 ],
	'<', \undef, '>', '/dev/null', '2>', "$PostgreSQL::Test::Utils::tmp_check/sampler.err");

# ---------------------------------------------------------------- faults
# rules: the portal's answer rules for phase p; special: rows written among
# the phase's events ([drug_name, rows], medication rows of their own
# statement) and dead-lettered; doc_dead: the document is dead-lettered;
# poison: reading the document's unit fails until the rule is fixed.
my @faults = (
	{
		name => 'retry',
		poison => 1,
		rules => sub {
			[
				{ mode => 'status', status => 500, count => 3 },
				{ mode => 'status', status => 429, retry_after => '1', count => 2 },
				{ mode => 'hang', seconds => 3, count => 1 },    # > http_timeout (2s)
				{ mode => 'close', count => 1 },
			];
		},
	},
	{
		name => 'split',
		special => [ [ 'lc-reject-1', 1 ], [ 'lc-rejlist-1', 1 ], [ 'lc-reject-2', 1 ],
			[ 'lc-rejlist-bulk', 1000 ], [ 'lc-rejlist-2', 1 ], [ 'lc-reject-3', 1 ], [ 'lc-rejlist-3', 1 ] ],
		rules => sub {
			my ($p) = @_;
			[
				{ mode => 'reject_event', match => { 'data.drug_name' => [ map { "lc-reject-$_ ($p)" } 1 .. 3 ] } },
				{
					mode => 'rejected_list',
					match => { 'data.drug_name' => [ map { "lc-rejlist-$_ ($p)" } 1 .. 3, 'bulk' ] }
				},
			];
		},
	},
	{
		name => '413',
		doc_dead => 1,
		rules => sub { [ { mode => 'max_body', bytes => 100_000 } ] },
	},
	{
		name => 'slow',
		rules => sub {
			my ($p) = @_;
			[ { mode => 'delay', seconds => 0.02 }, { mode => 'random_fail', rate => 0.02, status => 503, seed => $p } ];
		},
	},
);

# ---------------------------------------------------------------- helpers
# The worker's memory contexts as it logs them when asked: bytes used in
# all of them (Grand total) and in TopMemoryContext itself.
sub context_totals
{
	my $log = $node->logfile;
	my $offset = -s $log;
	my ($top, $used);
	$node->safe_psql($db, "SELECT pg_log_backend_memory_contexts($wpid)");
	ps_wait_until(
		sub {
			my $text = PostgreSQL::Test::Utils::slurp_file($log, $offset);
			($top) = $text =~ /\[$wpid\][^\n]*level: 0; TopMemoryContext: [^\n]* (\d+) used/;
			($used) = $text =~ /\[$wpid\][^\n]*Grand total: [^\n]* (\d+) used/;
			return defined $used;
		},
		'the worker logging its memory contexts', 30);
	return { used => $used // -1, top => $top // -1 };
}

sub counters
{
	return ps_sql_row($node, $db, q{SELECT delivered_total, dead_letters, pending_events,
		(SELECT count(*) FROM portal_sync.delivery_log) AS requests FROM portal_sync.status});
}

# The portal's answers logged since t0, as "status xcount" pairs.
sub answers_since
{
	my ($t0) = @_;
	return $node->safe_psql($db, qq{SELECT coalesce(string_agg(s || ' x' || c, ', ' ORDER BY s), '')
		FROM (SELECT coalesce(http_status::text, 'none') s, count(*) c FROM portal_sync.delivery_log
			  WHERE sent_at >= '$t0' GROUP BY 1) x});
}

my @phases;
my ($total_events, $total_dead) = (0, 0);
my $bigdocs_secs = 0;

# One phase: the portal's rules, the C-CDA document, the events (with the
# fault's special rows among them), the drain, idle_s seconds idle, checks.
sub run_phase
{
	my (%a) = @_;
	my ($f, $label, $p) = @a{qw(fault label number)};
	my $t0 = $node->safe_psql($db, 'SELECT clock_timestamp()');
	my $c0 = counters();
	my $tt = time();
	set_phase("$label:busy");
	$portal->modes(@{ $f->{rules}->($p) });
	my ($events, $dead) = (0, 0);
	if ($a{doc} eq 'insert')
	{
		$node->safe_psql($db, "INSERT INTO ehr.ccda_document (doc_id, patient_id, document)
			VALUES (1, 1, leakcheck.document($p, $doc_mb))");
	}
	elsif (!$f->{poison})
	{
		$node->safe_psql($db, "UPDATE ehr.ccda_document SET document = leakcheck.document($p, $doc_mb)
			WHERE doc_id = 1");
		$dead += $f->{doc_dead} // 0;
	}
	else
	{
		# A share_when that fails on one row (SQLSTATE 22012): that row is
		# read again alone in a subtransaction and withheld (sent as a
		# delete), counted in rule_errors; the rest of the unit (the new
		# document) flows.  Attached again without the rule, the row is
		# sent once it changes.
		my $errors0 = ps_status($node, $db)->{rule_errors};
		$node->safe_psql($db, qq{SELECT portal_sync.attach('ehr.immunization', 'clinical', 'patient_id',
				date_col => 'administered_on', privacy_col => 'privacy_level',
				share_when => '(100 / (dose_number - 99)) IS NOT NULL');
			BEGIN;
			UPDATE ehr.ccda_document SET document = leakcheck.document($p, $doc_mb) WHERE doc_id = 1;
			INSERT INTO ehr.immunization (patient_id, vaccine, dose_number, administered_on, lot_number)
			VALUES (2, 'DTaP', 99, date '2024-06-01', 'lc-rule-error-$p');
			COMMIT;});
		$events++;
		ok(ps_wait_until(sub { ps_status($node, $db)->{rule_errors} > $errors0 }, 'a rule error'),
			"$label: the rule failed on one row, counted in rule_errors");
		$node->safe_psql($db, qq{SELECT portal_sync.attach('ehr.immunization', 'clinical', 'patient_id',
				date_col => 'administered_on', privacy_col => 'privacy_level');
			UPDATE ehr.immunization SET site = 'left arm' WHERE lot_number = 'lc-rule-error-$p'});
		$events++;
	}
	$events++;
	my @special = @{ $f->{special} || [] };
	my $special_rows = sum(0, map { $_->[1] } @special);
	my $left = $a{events} - $special_rows;
	my $k = $p;
	my $write_special = sub {
		my ($name, $rows) = @{ shift @special };
		$node->safe_psql($db, "INSERT INTO ehr.medication (patient_id, drug_name, start_date)
			SELECT 1 + ($k + g) % $np, '$name ($p)', date '2024-06-01' FROM generate_series(1, $rows) g");
		$events += $rows;
		$dead += $rows;
	};
	while ($left > 0)
	{
		my $n = $left < $chunk ? $left : $chunk;
		$node->safe_psql($db, "SELECT leakcheck.fill($n, $k, $np)");
		$k++;
		$left -= $n;
		$events += $n;
		$write_special->() if @special;
	}
	$write_special->() while @special;
	my $drained = ps_wait_drained($node, $db, 600);
	my $secs = time() - $tt;
	set_phase("$label:idle");
	sleep($idle_s);
	my $ctx = context_totals();
	my $c1 = counters();
	ok($drained && $c1->{pending_events} == 0, "$label: drained");
	is($c1->{delivered_total} - $c0->{delivered_total}, $events - $dead, "$label: events accepted by the portal");
	is($c1->{dead_letters} - $c0->{dead_letters}, $dead, "$label: dead letters");
	$total_events += $events;
	$total_dead += $dead;
	push @phases,
	  {
		label => $label, fault => $f->{name}, events => $events, dead => $c1->{dead_letters} - $c0->{dead_letters},
		secs => $secs, requests => $c1->{requests} - $c0->{requests}, answers => answers_since($t0),
		ctx => $ctx
	  };
	return;
}

# ---------------------------------------------------------------- phases
my $status0 = ps_status($node, $db);
report("worker pid $wpid; GLIBC_TUNABLES of the server: " . ($tunables eq '' ? '(none)' : $tunables));
my $t_run = time();
set_phase('warmup:busy');
$node->safe_psql($db, qq{SELECT pstest.make_patient(i, 3) FROM generate_series(1, $np) i;
	SELECT pstest.book(i) FROM generate_series(1, $np) i;});
ok(ps_wait_drained($node, $db, 300), 'warm-up: snapshots drained');
ok(ps_wait_until(sub { $node->safe_psql($db, q{SELECT portal_sync.is_ready('1')}) eq 't' }, 'patient 1 ready'),
	'warm-up: patient 1 ready');
$total_events += counters()->{delivered_total} - $status0->{delivered_total};
run_phase(label => 'warmup', fault => $faults[0], number => 0, doc => 'insert', events => $chunk);

my $per_phase = int($nevents / $nphases);
for my $p (1 .. $nphases)
{
	run_phase(
		label => "p$p",
		fault => $faults[ ($p - 1) % @faults ],
		number => $p,
		doc => 'update',
		events => $p == $nphases ? $nevents - $per_phase * ($nphases - 1) : $per_phase);
}
# Large documents (SPEC 5: memory bounded by bytes): 200 documents of
# 1 MB, then 20 of 10 MB, all of one patient, each batch of them sent
# while the worker's RssAnon is sampled.
{
	my $c0 = counters();
	my $tt = time();
	set_phase('bigdocs:busy');
	$portal->mode({ mode => 'ok' });
	$node->safe_psql($db, q{INSERT INTO ehr.ccda_document (doc_id, patient_id, document)
		SELECT 100000 + g, 1, leakcheck.document(1000 + g, 1) FROM generate_series(1, 200) g});
	ok(ps_wait_drained($node, $db, 600), 'large documents: 200 x 1 MB drained');
	$node->safe_psql($db, q{INSERT INTO ehr.ccda_document (doc_id, patient_id, document)
		SELECT 200000 + g, 1, leakcheck.document(2000 + g, 10) FROM generate_series(1, 20) g});
	ok(ps_wait_drained($node, $db, 600), 'large documents: 20 x 10 MB drained');
	my $c1 = counters();
	is($c1->{delivered_total} - $c0->{delivered_total}, 220, 'large documents: all 220 accepted');
	$total_events += 220;
	$bigdocs_secs = time() - $tt;
	set_phase('bigdocs:idle');
	sleep($idle_s);
}

my $run_secs = time() - $t_run;
set_phase('end:idle');
sleep(1);
my $ctx_end = context_totals();
$sampler->signal('TERM');
$sampler->finish;

# ---------------------------------------------------------------- checks
my $s = ps_status($node, $db);
is($s->{pending_events}, 0, 'end: pending_events is 0');
is($node->safe_psql($db, 'SELECT count(*) FROM portal_sync.outbox'), '0', 'end: the outbox is empty');
is($s->{worker_pid}, $wpid, 'end: the same worker process throughout');
is($s->{dead_letters}, $total_dead, "end: $total_dead dead letters");
is($s->{delivered_total} - $status0->{delivered_total}, $total_events - $total_dead,
	'end: every other event accepted by the portal');
my $summary = $portal->summary;    # not state(): hundreds of MB of items
is($summary->{applied_event_ids}, $total_events - $total_dead, 'end: the portal applied each of them');
for my $v (qw(order_violations ccda_violations purge_violations snapshot_violations protocol_errors))
{
	is($summary->{$v}, 0, "end: the portal saw no $v");
}

# ---------------------------------------------------------------- memory
my (%samples, $gone);
open(my $mfh, '<', $mem_log) or die "$mem_log: $!";
while (<$mfh>)
{
	my ($ms, $phase, $anon, $file, $shmem) = split;
	if ($anon eq 'gone') { $gone = $phase; next; }
	my ($label, $state) = split /:/, $phase;
	push @{ $samples{$label}{$state} }, [ $anon, $file, $shmem ];
}
close $mfh;
ok(!$gone, 'the worker was sampled until the end') or diag("it exited during $gone");

sub median { my @v = sort { $a <=> $b } @_; return @v ? ($v[$#v / 2] + $v[@v / 2]) / 2 : 0; }
sub col { my ($label, $state, $i) = @_; return map { $_->[$i] } @{ $samples{$label}{$state} || [] }; }
sub peak { my ($label, $i) = @_; return max(0, col($label, 'busy', $i), col($label, 'idle', $i)); }
sub idle { return median(col($_[0], 'idle', 0)); }
sub mib { return sprintf('%.1f', $_[0] / 1024); }

report('');
report("== worker memory: RssAnon, RssFile, RssShmem (MiB) from /proc/$wpid/status every 100 ms;");
report('   palloc: bytes used in its memory contexts (kB), logged after the idle time');
report(sprintf('%-6s %-5s %7s %5s %5s %6s %9s %9s %8s %8s %8s %8s  %s',
	'phase', 'fault', 'events', 'dead', 'secs', 'posts', 'anon_peak', 'anon_idle', 'file_max', 'shm_max',
	'palloc', 'top', 'answers (status xcount)'));
for my $ph (@phases)
{
	my $l = $ph->{label};
	report(sprintf('%-6s %-5s %7d %5d %5.1f %6d %9s %9s %8s %8s %8.1f %8.1f  %s',
		$l, $ph->{fault}, $ph->{events}, $ph->{dead}, $ph->{secs}, $ph->{requests},
		mib(peak($l, 0)), mib(idle($l)), mib(peak($l, 1)), mib(peak($l, 2)),
		$ph->{ctx}{used} / 1024, $ph->{ctx}{top} / 1024, $ph->{answers}));
}
report(sprintf('%-6s %-5s %7s %5s %5s %6s %9s %9s %8s %8s %8.1f %8.1f', 'end', '', '', '', '', '',
	mib(peak('end', 0)), mib(idle('end')), mib(peak('end', 1)), mib(peak('end', 2)),
	$ctx_end->{used} / 1024, $ctx_end->{top} / 1024));
report(sprintf('%-6s %-5s %7d %5d %5.1f %6s %9s %9s %8s %8s', 'bigdoc', 'ok', 220, 0, $bigdocs_secs, '',
	mib(peak('bigdocs', 0)), mib(idle('bigdocs')), mib(peak('bigdocs', 1)), mib(peak('bigdocs', 2))));
report(sprintf('run: %.0f s, %d events (%d dead-lettered); load average now %s', $run_secs, $total_events,
	$total_dead, join(' ', (split ' ', PostgreSQL::Test::Utils::slurp_file('/proc/loadavg'))[0 .. 2])));

my @drain = map { $_->{label} } grep { $_->{label} ne 'warmup' } @phases;
my $half = int(@drain / 2);
my @first = @drain[ 0 .. $half - 1 ];
my @second = @drain[ @drain - $half .. $#drain ];
my $range = sub { return @_ > 1 ? "$_[0]..$_[-1]" : $_[0]; };
my $end = idle('end') - idle($drain[0]);
my $trend = median(map { idle($_) } @second) - median(map { idle($_) } @first);
my $peaks = max(map { peak($_, 0) } @second) - max(map { peak($_, 0) } @first);
my $highest = max(map { peak($_, 0) } @drain);
my $palloc = $ctx_end->{used} - $phases[1]{ctx}{used};
report('');
report(sprintf('end    idle RssAnon at the end - after %s: %+.1f MiB (tolerance %s MiB)', $drain[0], $end / 1024,
	mib($tol_kb)));
report(sprintf('trend  idle RssAnon, median of %s - of %s: %+.1f MiB (tolerance %s MiB)', $range->(@second),
	$range->(@first), $trend / 1024, mib($tol_kb)));
report(sprintf('peaks  highest RssAnon of %s - of %s: %+.1f MiB (figure only); highest of all: %s MiB',
	$range->(@second), $range->(@first), $peaks / 1024, mib($highest)));
report(sprintf('palloc context bytes used at the end - after %s: %+.1f kB (tolerance %.0f kB)', $drain[0],
	$palloc / 1024, $ctx_tol / 1024));
cmp_ok(peak('bigdocs', 0), '<=', 64 * 1024,
	'RssAnon stays within 64 MiB while 200 x 1 MB and 20 x 10 MB documents of one patient are sent ('
	  . mib(peak('bigdocs', 0)) . ' MiB at most)');
my $flat = ok($end <= $tol_kb, 'RssAnon at the end as after phase 1');
$flat &= ok($trend <= $tol_kb, 'idle RssAnon of the later phases as of the earlier ones');
$flat &= ok($palloc <= $ctx_tol && $ctx_end->{used} > 0, 'palloc bytes at the end as after phase 1');
report('verdict: ' . ($flat ? 'flat once warm: no leak' : 'memory GROWS once warm: leak'));

$node->stop;
$portal->stop;
done_testing();
PostgreSQL::Test::Utils::append_to_file("$ENV{TESTDIR}/leakcheck.result",
	Test::More->builder->is_passing ? "PASS\n" : "FAIL\n");
PERL
# The perl side's exit code is not reliable after a die (END blocks):
# PASS is written only when every check ran and passed.
[ "$(cat "$WORK/leakcheck.result" 2>/dev/null)" = PASS ] || { [ "$rc" -ne 0 ] || rc=1; }
echo "leakcheck: $([ "$rc" -eq 0 ] && echo PASS || echo FAIL) in $(($(date +%s) - t_start)) s"
if [ "$rc" -eq 0 ] && [ "${LEAKCHECK_KEEP:-0}" != 1 ]; then
	rm -rf "$WORK"
else
	echo "leakcheck: samples in $WORK/memory.log, server and portal logs in $WORK/tmp_check/log"
fi
exit $rc
