
# Copyright (c) 2026, portal_sync developers
#
# Defect found by 027 in CI (seed 253725): a snapshot resumed under its
# old seq after a purge of the patient with a higher seq whose answer was
# lost.  The portal had applied the purge, then got the snapshot's seq,
# below it (an order violation), and a snapshot_end with no open snapshot
# (the purge had closed it), after which the patient's updates went to a
# purged patient with no snapshot.
#
#   1. patient 2's snapshot (17 events) is cut by batch_size 10: batch A,
#      its begin and first items, is applied by the portal and its answer
#      lost;
#   2. meanwhile the chart is restricted.  Batch A goes again as it was
#      (since the late-copy fix of test 055) and is accepted; the unit
#      built then sends a purge (a higher seq), applied, its answer lost
#      too;
#   3. meanwhile the chart is shareable again.
#
# The portal must never get an event of patient 2 below a seq it applied,
# and ends up holding every item as it is.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# The test acts while a request hangs: a window of http_timeout.
my $HTTP_TIMEOUT = 10;
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('no_resume_below_lost_purge', $portal,
	conf => "portal_sync.batch_size = 10\nportal_sync.http_timeout = '${HTTP_TIMEOUT}s'\n");
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(2, 2); SELECT pstest.book(2);
	  SELECT pstest.make_patient(3, 1); SELECT pstest.book(3);});
ok(ps_wait_drained($node, $db), 'initial drain');

my $mark = ps_nreq($portal);
# applied, answered after the worker gave up
$portal->modes({ mode => 'hang', seconds => $HTTP_TIMEOUT + 0.2, apply => JSON::PP::true, count => 1 },
	{ mode => 'ok', count => 1 },
	{ mode => 'hang', seconds => $HTTP_TIMEOUT + 0.2, apply => JSON::PP::true, count => 1 },
	{ mode => 'ok' });
one(q{SELECT portal_sync.resync_patient('2')});
ok(ps_wait_until(sub { ps_nreq($portal) - $mark >= 1 }, 'batch A is in flight', 60),
	'batch A (part of the snapshot) is in flight');
one(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 2});
ok(ps_wait_until(sub { ps_nreq($portal) - $mark >= 3 }, 'the purge is in flight', 60),
	'the purge is in flight');
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2;
	  UPDATE ehr.medication SET dose = 'after the purge' WHERE patient_id = 3});

ok(ps_wait_drained($node, $db, 90), 'drained') or ps_diag_stuck($node, $db);
my $reqs = $portal->requests(since => $mark);
my @p2 = map { my $r = $_; [ grep { $_->{patient_id} eq '2' } @{ $r->{events} || [] } ] } @$reqs;
ok(@p2 >= 3 && grep({ $_->{op} eq 'snapshot_begin' } @{ $p2[0] }) && !grep({ $_->{op} eq 'snapshot_end' } @{ $p2[0] }),
	'batch A: the begin of the snapshot, not its end');
ok(@p2 >= 3 && $reqs->[1]{batch_id} eq $reqs->[0]{batch_id}, 'batch A again, as it was');
ok(@p2 >= 3 && grep({ $_->{op} eq 'purge' } @{ $p2[2] }), 'batch B: the purge');

ps_check_settled($node, $db, $portal, 'after a lost purge over an open snapshot', resends => 1);
is($portal->state->{practices}{postgres}{patients}{2}{purged} ? 1 : 0, 0, 'patient 2 is not purged on the portal');

$node->stop;
$portal->stop;
done_testing();
