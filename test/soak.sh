#!/usr/bin/env bash
# Soak benchmark of portal_sync (not part of `make installcheck`; run it by
# hand or in a scheduled CI job):
#
#   bash test/soak.sh [--minutes N]        (default 10; as root or as postgres)
#
# A throwaway cluster (PostgreSQL::Test::Cluster, as the TAP tests) with the
# reference schema, the local test portal (test/portal/portal.py) and
# pgbench running mixed EHR writes for N minutes (new clinical rows,
# updates, privacy and chart-privacy changes, deletes, new appointments,
# insurance) while portal faults are injected in turn: 30% random 500s,
# 429 with Retry-After, answers slower than http_timeout, connection
# refused, dropped connections.  Every 10 s it prints events delivered,
# pending events, outbox size and dead tuples, and the worker's RSS; at the
# end it lets the backlog drain and runs the invariant check of the TAP
# tests (portal equal to the shareable state, event ids stable, per-patient
# order, C-CDA after snapshot, no protocol error).  Exit code 0 only if the
# final check passed.
#
# Environment: SOAK_RATE (pgbench transactions/s, default 150), SOAK_CLIENTS
# (default 4), SOAK_PATIENTS (default 300), SOAK_FULL_CHECKS=1 (also the
# checks over the whole request log: slow), PG_CONFIG.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MINUTES=10
while [ $# -gt 0 ]; do
	case "$1" in
		--minutes) MINUTES=$2; shift 2 ;;
		--minutes=*) MINUTES=${1#*=}; shift ;;
		-h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
		*) echo "soak: unknown argument $1" >&2; exit 2 ;;
	esac
done
. "$SRC_DIR/test/lib/tap_script.sh"
tap_script_init soak
echo "soak: $MINUTES minutes; work directory $WORK"
rc=0
tap_script_run \
	SOAK_MINUTES="$MINUTES" SOAK_RATE="${SOAK_RATE:-150}" SOAK_CLIENTS="${SOAK_CLIENTS:-4}" \
	SOAK_PATIENTS="${SOAK_PATIENTS:-300}" SOAK_FULL_CHECKS="${SOAK_FULL_CHECKS:-}" PORTAL_SYNC_TEST_WAIT=600 \
	<<'PERL' || rc=$?
use strict;
use warnings;
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time sleep);

my $minutes = $ENV{SOAK_MINUTES};
my $rate = $ENV{SOAK_RATE};
my $clients = $ENV{SOAK_CLIENTS};
my $np = $ENV{SOAK_PATIENTS};
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('soak', $portal, conf => q{
log_statement = none
shared_buffers = 128MB
restart_after_crash = on
portal_sync.batch_size = 200
});
my $db = 'postgres';
$node->safe_psql($db, qq{SELECT pstest.make_patient(i, 3) FROM generate_series(1, $np) i;
	SELECT pstest.book(i) FROM generate_series(1, $np * 2 / 3) i;});
ps_wait_drained($node, $db, 300) or die "initial drain failed";
diag("setup: $np patients, " . $portal->state->{applied_event_ids} . ' events delivered');

my $script = "$PostgreSQL::Test::Utils::tmp_check/soak.pgbench";
PostgreSQL::Test::Utils::append_to_file($script, <<EOS);
\\set p random(1, $np)
\\set q random(1, $np)
\\set r random(1, 100)
BEGIN;
INSERT INTO ehr.medication (patient_id, drug_name, dose, start_date, privacy_level) VALUES (:p, 'soak drug ' || :r, :r || ' mg', date '2023-01-01' + :r * 7, CASE WHEN :r > 90 THEN 2 ELSE 0 END);
UPDATE ehr.vital_sign SET pulse = 60 + :r WHERE patient_id = :p;
UPDATE ehr.allergy SET privacy_level = CASE WHEN :r > 80 THEN 3 ELSE 0 END WHERE patient_id = :q;
UPDATE ehr.lab_result SET status = CASE WHEN :r > 70 THEN 'preliminary' ELSE 'final' END WHERE patient_id = :q AND test_name = 'hemoglobin';
UPDATE ehr.patient SET privacy_level = CASE WHEN :r > 97 THEN 4 ELSE 0 END WHERE patient_id = :q AND (:r > 97 OR privacy_level > 0);
DELETE FROM ehr.medication WHERE med_id = (SELECT min(med_id) FROM ehr.medication WHERE patient_id = :q AND drug_name LIKE 'soak%') AND :r < 30;
COMMIT;
EOS
PostgreSQL::Test::Utils::append_to_file("$script.appt", <<EOS);
\\set p random(1, $np)
INSERT INTO ehr.appointment (patient_id, provider, starts_at) VALUES (:p, 'Dr. Soak', now() + interval '7 days');
INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (:p, 'Soak Payer', 'S' || :p);
EOS
my @pgb = ('pgbench', '-n', '-h', $node->host, '-p', $node->port, '-c', $clients, '-j', 2,
	'-R', $rate, '-T', int($minutes * 60), '-f', "$script\@19", '-f', "$script.appt\@1", $db);
my ($pgb_out, $pgb_err) = ('', '');
my $pgb = IPC::Run::start(\@pgb, '>', \$pgb_out, '2>', \$pgb_err);

my @faults = (
	[ 'ok', sub { $portal->mode({ mode => 'ok' }) } ],
	[ '30% 500', sub { $portal->mode({ mode => 'random_fail', rate => 0.3, status => 500, seed => int(rand(1e6)) }) } ],
	[ '429 Retry-After 3', sub { $portal->modes({ mode => 'status', status => 429, retry_after => '3', count => 5 }) } ],
	[ 'ok', sub { $portal->mode({ mode => 'ok' }) } ],
	[ 'slower than timeout', sub { $portal->modes({ mode => 'delay', seconds => 2.5, count => 4 }) } ],
	[ 'connection refused 20 s', sub { $portal->down; sleep(20); $portal->up; } ],
	[ 'dropped connections', sub { $portal->modes({ mode => 'close', count => 5 }) } ],
	[ 'slow portal 50 ms', sub { $portal->modes({ mode => 'delay', seconds => 0.05 }) } ],
);
my $t0 = time();
my $end = $t0 + $minutes * 60;
my $next_fault = $t0 + 30;
my $fi = 0;
my $fault = 'ok';
my ($max_rss, $max_outbox, $max_dead, $max_pending) = (0, 0, 0, 0);
# PostgreSQL::Test::Utils sends STDOUT to the log file: print the samples
# on the test output (the terminal) as well.
my $out = Test::More->builder->output;
print $out sprintf "%6s %-24s %10s %9s %11s %10s %9s %8s\n", 'time', 'portal', 'delivered', 'pending', 'outbox_kB', 'dead_tup', 'rss_kB', 'state';
while (time() < $end)
{
	if (time() >= $next_fault)
	{
		$fi = ($fi + 1) % @faults;
		$fault = $faults[$fi][0];
		$faults[$fi][1]->();
		$next_fault = time() + 30;
	}
	my $s = ps_status($node, $db);
	my $o = ps_sql_row($node, $db, q{SELECT pg_total_relation_size('portal_sync.outbox') / 1024 AS kb,
		(SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'portal_sync.outbox'::regclass) AS dead});
	my $rss = 0;
	if (my $pid = $s->{worker_pid})
	{
		if (open(my $fh, '<', "/proc/$pid/status"))
		{
			while (<$fh>) { $rss = $1 if /^VmRSS:\s+(\d+)/ }
			close $fh;
		}
	}
	$max_rss = $rss if $rss > $max_rss;
	$max_outbox = $o->{kb} if $o->{kb} > $max_outbox;
	$max_dead = $o->{dead} if ($o->{dead} // 0) > $max_dead;
	$max_pending = $s->{pending_events} if $s->{pending_events} > $max_pending;
	print $out sprintf "%6.0f %-24s %10d %9d %11d %10d %9d %8s\n", time() - $t0, $fault, $s->{delivered_total},
	  $s->{pending_events}, $o->{kb}, $o->{dead} // 0, $rss, $s->{state};
	sleep(10);
}
$pgb->finish;
my ($tx) = $pgb_out =~ /number of transactions actually processed: (\d+)/;
diag('pgbench: ' . ($tx // '?') . " transactions; $pgb_err") ;
$portal->mode({ mode => 'ok' });
my $t_drain = time();
ok(ps_wait_drained($node, $db, 600), 'backlog drained after the soak');
diag(sprintf('backlog drained in %.1f s', time() - $t_drain));
my $s = ps_status($node, $db);
my $st = $portal->state;
diag("events delivered (accepted by the portal): $st->{applied_event_ids}; duplicates deduped: $st->{duplicates}; requests: $st->{requests}; answers: "
	  . join(', ', map { "$_ x$st->{answers}{$_}" } sort keys %{ $st->{answers} }));
diag("peak: worker RSS $max_rss kB, outbox $max_outbox kB, dead tuples $max_dead, pending $max_pending; dead letters $s->{dead_letters}");
ps_compare_state($node, $db, $portal, 'soak');
ps_check_portal_invariants($portal, 'soak', $st);
# The checks over the whole request log (hundreds of thousands of events,
# decoded by JSON::PP) take long: only with SOAK_FULL_CHECKS=1.  The
# portal's own per-event checks (order, C-CDA, purge, snapshot, protocol)
# ran above in any case.
if ($ENV{SOAK_FULL_CHECKS})
{
	my $reqs = $portal->requests;
	ps_check_event_ids_stable($reqs, 'soak');
	ps_check_ccda_after_snapshot($reqs, 'soak');
	ps_check_send_order($reqs, 'soak');
	ps_check_accepted_once($portal, 'soak', resends => 1, requests => $reqs, state => $st);
}
is($s->{dead_letters}, 0, 'soak: nothing dead-lettered');
$node->stop;
$portal->stop;
done_testing();
PostgreSQL::Test::Utils::append_to_file("$ENV{TESTDIR}/soak.result",
	Test::More->builder->is_passing ? "PASS\n" : "FAIL\n");
PERL
# The perl side's exit code is not reliable after a die (END blocks):
# PASS is written only when every check ran and passed.
[ "$(cat "$WORK/soak.result" 2>/dev/null)" = PASS ] || { [ "$rc" -ne 0 ] || rc=1; }
echo "soak: exit $rc (logs in $WORK/tmp_check/log)"
exit $rc
