
# Copyright (c) 2026, portal_sync developers
#
# portal_sync.unenroll() (SPEC 6): true if the patient was enrolled; a
# purge is sent and nothing more of the patient flows but insurance, also
# from long-lived sessions that had cached "enrolled" before (they notice),
# also while the EHR writes that patient's rows; a later initiating event
# enrolls the patient again (a new snapshot).  A patient whose enrollment
# snapshot waits for an open transaction is unenrolled at once (the purge
# is a retraction), and the snapshot is never sent.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('unenroll', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 8) i;
	  SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

# A long-lived session that has written patient 2's rows: its backend
# caches patient 2 as enrolled.
my $session = $node->background_psql($db);
$session->query_safe(q{UPDATE ehr.medication SET dose = 'cached' WHERE patient_id = 2});
ok(ps_wait_drained($node, $db), 'the session\'s change is delivered');

# Events of a patient after its purge, in the requests since mark.
sub events_after_purge
{
	my ($patient, $mark) = @_;
	my @after;
	my $purged = 0;
	for my $r (@{ $portal->requests(since => $mark) })
	{
		next unless ($r->{status} // '') =~ /^2/;
		for my $ev (@{ $r->{events} })
		{
			next unless $ev->{patient_id} eq $patient;
			if ($ev->{op} eq 'purge') { $purged = 1; next }
			push @after, "$ev->{op} " . ($ev->{source} // '') . '/' . ($ev->{key} // '') if $purged;
		}
	}
	return ($purged, \@after);
}

# ---------------------------------------------------------------- unenroll
my $mark = ps_nreq($portal);
is(one(q{SELECT portal_sync.unenroll('2')}), 't', 'unenroll of an enrolled patient: true');
is(one(q{SELECT portal_sync.unenroll('7')}), 'f', 'unenroll of a patient never enrolled: false');
ok(ps_wait_drained($node, $db), 'unenroll: drained');
is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id = '2'}), '0',
	'patient 2 is no longer in portal_sync.patients');
is(one(q{SELECT portal_sync.is_ready('2')}), 'f', 'patient 2 is not ready');
my $items = ps_portal_items($portal, 'postgres')->{2} || {};
is_deeply([ sort keys %$items ], [ 'insurance' ], 'the portal holds only the insurance of patient 2');

# The long-lived session writes patient 2's rows again, and patient 3's.
$session->query_safe(q{UPDATE ehr.medication SET dose = 'after unenroll' WHERE patient_id = 2});
$session->query_safe(q{UPDATE ehr.allergy SET reaction = 'after unenroll' WHERE patient_id = 2});
$session->query_safe(q{UPDATE ehr.insurance SET plan_name = 'Plan after unenroll' WHERE patient_id = 2});
$session->query_safe(q{UPDATE ehr.medication SET dose = 'still enrolled' WHERE patient_id = 3});
ok(ps_wait_drained($node, $db), 'later changes: drained');
my ($purged, $after) = events_after_purge('2', $mark);
ok($purged, 'a purge of patient 2 was accepted');
is_deeply([ grep { !m{^\w+ insurance/} } @$after ], [],
	'nothing but insurance of patient 2 was sent after its purge (also from the long-lived session)');
is(one(q{SELECT count(*) FROM portal_sync.outbox WHERE patient_id = '2'}), '0',
	'nothing of patient 2 stays queued');
ps_compare_state($node, $db, $portal, 'after unenroll');

# ---------------------------------------------------------------- while the EHR writes
{
	my $writer = $node->background_psql($db);
	my $mark2 = ps_nreq($portal);
	$writer->query_safe(q{BEGIN});
	for my $i (1 .. 30)
	{
		$writer->query_safe(qq{UPDATE ehr.medication SET dose = 'w$i' WHERE patient_id = 4});
		$writer->query_safe(q{COMMIT; BEGIN});
		one(q{SELECT portal_sync.unenroll('4')}) if $i == 10;
	}
	$writer->query_safe(q{COMMIT});
	$writer->quit;
	ok(ps_wait_drained($node, $db), 'unenroll while the EHR writes: drained');
	my ($p4, $after4) = events_after_purge('4', $mark2);
	ok($p4, 'patient 4 was purged');
	is_deeply([ grep { !m{^\w+ insurance/} } @$after4 ], [], 'nothing of patient 4 after its purge');
	ps_compare_state($node, $db, $portal, 'after unenroll while the EHR writes');
}

# ---------------------------------------------------------------- enrolled again
$mark = ps_nreq($portal);
one(q{SELECT pstest.book(2)});
ok(ps_wait_drained($node, $db), 'a new appointment: drained');
is(one(q{SELECT portal_sync.is_ready('2')}), 't', 'patient 2 is enrolled and ready again');
my $snapshots = grep { $_->{patient_id} eq '2' && $_->{op} eq 'snapshot_end' }
  map { @{ $_->{events} } } grep { ($_->{status} // '') =~ /^2/ } @{ $portal->requests(since => $mark) };
is($snapshots, 1, 'with a new snapshot');
$session->query_safe(q{UPDATE ehr.medication SET dose = 'flows again' WHERE patient_id = 2});
ok(ps_wait_drained($node, $db), 'patient 2 changes flow again');
ps_compare_state($node, $db, $portal, 'enrolled again');

# ---------------------------------------------------------------- a waiting snapshot
# A transaction writes patient 8's rows, then patient 8 is enrolled: the
# snapshot waits for that transaction.  unenroll() does not wait.
{
	my $open = $node->background_psql($db);
	$open->query_safe(q{BEGIN; UPDATE ehr.problem SET description = 'open' WHERE patient_id = 8});
	one(q{SELECT pstest.book(8)});
	ok(ps_wait_until(sub { ps_status($node, $db)->{state} eq 'waiting' }, 'waiting', 30),
		'the snapshot of patient 8 waits for the open transaction');
	$mark = ps_nreq($portal);
	is(one(q{SELECT portal_sync.unenroll('8')}), 't', 'unenroll of a patient whose snapshot waits: true');
	ok(ps_wait_until(sub { one(q{SELECT count(*) FROM portal_sync.outbox WHERE patient_id = '8'}) eq '0' },
		'unenrolled', 30), 'the unenrollment is done while the transaction is open');
	$open->query_safe(q{COMMIT});
	$open->quit;
	ok(ps_wait_drained($node, $db), 'transaction ended: drained');
	my @sent8 = grep { $_->{patient_id} eq '8' && ($_->{source} // '') ne 'insurance' && $_->{op} ne 'purge' }
	  map { @{ $_->{events} } } @{ $portal->requests(since => $mark) };
	is(scalar @sent8, 0, 'nothing of patient 8 was sent but its purge and insurance');
	is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id = '8'}), '0', 'patient 8 is not enrolled');
}

# ---------------------------------------------------------------- enrolled again before the purge went out
# The portal is down: unenroll() is not delivered yet when a new
# appointment comes; the patient ends enrolled, with a new snapshot.
{
	$portal->modes({ mode => 'status', status => 503 });
	is(one(q{SELECT portal_sync.unenroll('3')}), 't', 'unenroll while the portal is down');
	is(one(q{SELECT portal_sync.unenroll('3')}), 'f', 'a second unenroll(): the patient is being unenrolled already');
	one(q{SELECT pstest.book(3)});
	$session->query_safe(q{UPDATE ehr.medication SET dose = 'after the new appointment' WHERE patient_id = 3});
	$portal->mode({ mode => 'ok' });
	ok(ps_wait_drained($node, $db), 'portal back: drained');
	is(one(q{SELECT portal_sync.is_ready('3')}), 't', 'patient 3 is enrolled again and ready');
	ps_compare_state($node, $db, $portal, 'unenrolled and enrolled again before the purge was delivered');
}

$session->quit;
ps_check_settled($node, $db, $portal, 'at the end', resends => 1);

$node->stop;
$portal->stop;
done_testing();
