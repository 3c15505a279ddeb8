
# Copyright (c) 2026, portal_sync developers
#
# "wait_ready waits for itself" (SPEC 5, Nobody waits for others: "a
# caller of wait_ready never waits for itself"; read-only and idle
# transactions hold back nothing; no transaction holds back the events of
# patients it did not write).
#
# A: the EHR books an appointment (autocommit) and calls wait_ready() on
#    the same connection right after: it must return true, well before
#    its timeout.
# B: a transaction that has written a row of another patient calls
#    wait_ready() for a patient enrolled by another, committed session:
#    true, well before its timeout.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('wait_ready_self', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 8) i;
	  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');

my $TIMEOUT = 20;    # seconds, wait_ready's timeout
my $PROMPT = 10;     # "well under the timeout"

# ---------------------------------------------------------------- A
# Two statements of one psql session: each its own transaction.
{
	my $t0 = time();
	my ($ret, $out, $err) = $node->psql($db,
		qq{SELECT pstest.book(5) IS NOT NULL;
		   SELECT portal_sync.wait_ready('5', '${TIMEOUT}s');});
	my $elapsed = time() - $t0;
	is($ret, 0, 'A: book + wait_ready on one connection ran') or diag($err);
	my @lines = split /\n/, $out;
	is($lines[-1], 't',
		'A: wait_ready() right after booking, on the same connection, returns true');
	cmp_ok($elapsed, '<', $PROMPT,
		"A: and returns well under its ${TIMEOUT}s timeout (took "
		  . sprintf('%.1f', $elapsed) . ' s)');
	is(one(q{SELECT portal_sync.is_ready('5')}), 't', 'A: patient 5 is ready');
}

# Same, inside one explicit transaction for the wait only (BEGIN ...
# wait_ready ... COMMIT after the booking committed).
{
	my $t0 = time();
	my ($ret, $out, $err) = $node->psql($db,
		qq{SELECT pstest.book(6) IS NOT NULL;
		   BEGIN;
		   SELECT portal_sync.wait_ready('6', '${TIMEOUT}s');
		   COMMIT;});
	my $elapsed = time() - $t0;
	is($ret, 0, 'A2: book, then BEGIN; wait_ready; COMMIT ran') or diag($err);
	my @wr = grep { /^[tf]$/ } split /\n/, $out;
	is(scalar(@wr) . ' ' . ($wr[-1] // ''), '2 t', 'A2: wait_ready() in its own transaction block returns true');
	cmp_ok($elapsed, '<', $PROMPT,
		'A2: well under the timeout (took ' . sprintf('%.1f', $elapsed) . ' s)');
}

ok(ps_wait_drained($node, $db, 60), 'A: drained');

# ---------------------------------------------------------------- B
# The caller's transaction has written a row of enrolled patient 1 (and is
# otherwise idle) when patient 7 is enrolled by another, committed
# session; then it calls wait_ready('7').
{
	my $bg = $node->background_psql($db, on_error_stop => 0);
	$bg->query_safe(q{BEGIN});
	$bg->query_safe(
		q{UPDATE ehr.medication SET dose = 'B caller' WHERE med_id = (SELECT min(med_id) FROM ehr.medication WHERE patient_id = 1)});
	one(q{SELECT pstest.book(7)});
	my $t0 = time();
	my ($out, $failed) = $bg->query(qq{SELECT portal_sync.wait_ready('7', '${TIMEOUT}s')});
	my $elapsed = time() - $t0;
	ok(!$failed, 'B: wait_ready ran inside the writing transaction');
	is($out, 't',
		'B: wait_ready() inside a transaction that wrote another patient returns true');
	cmp_ok($elapsed, '<', $PROMPT,
		'B: well under the timeout (took ' . sprintf('%.1f', $elapsed) . ' s)');
	$bg->query_safe(q{COMMIT});
	$bg->quit;
}

# And the same for a patient whose enrollment committed while the caller's
# transaction was already open but before it wrote anything (read-only so
# far), then wrote another patient.
{
	my $bg = $node->background_psql($db, on_error_stop => 0);
	$bg->query_safe(q{BEGIN});
	$bg->query_safe(q{SELECT count(*) FROM ehr.patient});
	one(q{SELECT pstest.book(8)});
	$bg->query_safe(
		q{UPDATE ehr.allergy SET reaction = 'B2 caller' WHERE allergy_id = (SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = 2)});
	my $t0 = time();
	my ($out, $failed) = $bg->query(qq{SELECT portal_sync.wait_ready('8', '${TIMEOUT}s')});
	my $elapsed = time() - $t0;
	ok(!$failed, 'B2: wait_ready ran');
	is($out, 't', 'B2: wait_ready() in a transaction older than the enrollment returns true');
	cmp_ok($elapsed, '<', $PROMPT,
		'B2: well under the timeout (took ' . sprintf('%.1f', $elapsed) . ' s)');
	$bg->query_safe(q{COMMIT});
	$bg->quit;
}

ok(ps_wait_drained($node, $db, 60), 'B: drained');
ps_compare_state($node, $db, $portal, 'at the end');
ps_check_portal_invariants($portal, 'at the end');

$node->stop;
$portal->stop;
done_testing();
