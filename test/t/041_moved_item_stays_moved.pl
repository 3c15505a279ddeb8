
# Copyright (c) 2026, portal_sync developers
#
# Defect found by 027 under the sanitizers (seed 428569): an item of a
# resumed snapshot whose content changed since it was sent in the snapshot
# goes after the snapshot's end, with a new seq and an id of its own.  If
# that batch's answer was lost (the portal may hold the end and what
# follows) and the content was back to the first one when the unit was
# built again, the item's id was back to the one sent inside the
# snapshot: it went out under the snapshot's old seq, after the portal
# had applied later seqs of the patient.
#
#   1. patient 2's snapshot (17 events) is cut by batch_size 10: batch A
#      (held by the portal) is accepted, batch B (with the end) answered
#      500;
#   2. while A is in flight, a lab result of patient 2 in batch B changes;
#   3. the unit built again sends that lab result after the end (batch
#      B'); the portal applies B' and answers after the worker gave up;
#   4. meanwhile the lab result changes back.
#
# The portal must never get an event of patient 2 below a seq it already
# applied, and ends up holding every item as it is.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# Long enough for the test to act while a batch is held at a gate, on a
# loaded machine; B' answers only after the worker gave up on it.
my $HTTP_TIMEOUT = 10;
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('moved_item_stays_moved', $portal,
	conf => "portal_sync.batch_size = 10\nportal_sync.http_timeout = '${HTTP_TIMEOUT}s'\n");
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(2, 2); SELECT pstest.book(2);});
ok(ps_wait_drained($node, $db), 'initial drain');
# the last lab result of patient 2 on the portal: an item of batch B
my ($lab) = sort { $b <=> $a } keys %{ $portal->state->{practices}{postgres}{patients}{2}{items}{lab_result} || {} };
ok(defined $lab, 'patient 2 has a lab result on the portal');
$lab //= 0;
my $value = one(qq{SELECT value FROM ehr.lab_result WHERE result_id = $lab});

# Each step waits for the worker's request to be held at its gate: the
# case happens the same way however slow the machine is.
my $mark = ps_nreq($portal);
$portal->modes(
	{ mode => 'gate', name => 'A', count => 1 },
	{ mode => 'ok', count => 1 },                                   # A
	{ mode => 'reject_event', status => 500, match => { op => 'snapshot_end', patient_id => '2' }, count => 1 },  # B
	{ mode => 'gate', name => 'B2', count => 1 },
	{ mode => 'hang', seconds => $HTTP_TIMEOUT + 0.5, apply => JSON::PP::true, count => 1 },    # B'
	{ mode => 'ok' });
one(q{SELECT portal_sync.resync_patient('2')});
ok(ps_wait_until(sub { ps_nreq($portal) - $mark >= 1 }, 'batch A is held', 60),
	'batch A of the snapshot is in flight');
one(qq{UPDATE ehr.lab_result SET value = 'changed while in flight' WHERE result_id = $lab});
$portal->open_gate('A');

# B' is in flight (held) once the portal has answered A and B.
ok(ps_wait_until(sub { ps_nreq($portal) - $mark >= 3 }, "batch B' is held", 60),
	"batch B' is in flight");
one(qq{UPDATE ehr.lab_result SET value = '$value' WHERE result_id = $lab});
$portal->open_gate('B2');

ok(ps_wait_drained($node, $db, 60), 'drained') or ps_diag_stuck($node, $db);
my $reqs = $portal->requests(since => $mark);
my @p2 = map { my $r = $_; [ $r, [ grep { $_->{patient_id} eq '2' } @{ $r->{events} || [] } ] ] } @$reqs;
# the case: A without the end, B with it and the lab result inside,
# B' with the lab result after the end
my ($a, $b, $b2) = @p2[ 0 .. 2 ];
ok($a && $a->[0]{status} == 200 && !grep({ $_->{op} eq 'snapshot_end' } @{ $a->[1] }),
	'batch A: part of the snapshot, accepted');
ok($b && $b->[0]{status} == 500 && grep({ $_->{op} eq 'upsert' && $_->{source} eq 'lab_result' && $_->{key} eq $lab } @{ $b->[1] }),
	'batch B: the lab result inside the snapshot, answered 500');
my ($end_seq) = map { $_->{seq} } grep { $_->{op} eq 'snapshot_end' } @{ $b2 ? $b2->[1] : [] };
ok($b2 && $end_seq && grep({ $_->{source} && $_->{source} eq 'lab_result' && $_->{key} eq $lab && $_->{seq} > $end_seq } @{ $b2->[1] }),
	"batch B': the changed lab result after the snapshot's end (applied, answer lost)");

ps_check_settled($node, $db, $portal, 'after a moved item and a rebuilt unit', resends => 1);

$node->stop;
$portal->stop;
done_testing();
