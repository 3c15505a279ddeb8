
# Copyright (c) 2026, portal_sync developers
#
# Defect found by 027 under the sanitizers (seed 810831): after a purge
# whose answer was lost (the portal may have applied it), every change of
# the patient in the unit built for the retry started a snapshot of its
# own, as if each were the first event after the purge: two snapshots of
# one patient in one unit.  Only one of them could keep its seq with the
# patient's enrollment; the other, cut by the batch boundary and its
# answer lost too, was built again under a new seq with the same item
# ids.  The portal, holding the first build open, deduped those items,
# so the new snapshot's end dropped them: the patient's chart and items
# missing on the portal.
#
#   1. patient 2 is ready; the portal hangs on the next two requests
#      (applies them, answers after the worker gave up);
#   2. the chart is restricted: the purge is sent, applied, answer lost;
#   3. meanwhile the chart is shareable again, then two items change, in
#      three transactions: three entries of patient 2 for the retry;
#   4. batch_size 20 cuts the rebuilt unit inside a second snapshot.
#
# After the purge the portal must get one snapshot of patient 2 (one seq),
# and hold every item; an item of a snapshot never goes out under the id
# it had in another snapshot.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $HTTP_TIMEOUT = 3;
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('one_snapshot_after_lost_purge', $portal,
	conf => "portal_sync.batch_size = 20\nportal_sync.http_timeout = '${HTTP_TIMEOUT}s'\n");
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(2, 2); SELECT pstest.book(2);});
ok(ps_wait_drained($node, $db), 'initial drain');
my $items = one(q{SELECT count(*) FROM ehr.medication WHERE patient_id = 2});
cmp_ok($items, '>=', 2, 'patient 2 has medications');

my $mark = ps_nreq($portal);
$portal->modes({ mode => 'hang', seconds => $HTTP_TIMEOUT + 0.1, apply => JSON::PP::true, count => 2 },
	{ mode => 'ok' });
one(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 2});
ok(ps_wait_until(sub { one(q{SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'portal_sync worker' AND query = 'portal_sync: sending a batch'}) eq '1' },
	'the purge is in flight', 30), 'the purge of patient 2 is sent, the portal hangs (and applies it)');
# Before the worker gives up: three transactions, three entries.
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2});
for my $med (split /\n/, one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 2 ORDER BY med_id LIMIT 2}))
{
	one(qq{UPDATE ehr.medication SET dose = 'after the purge $med' WHERE med_id = $med});
}
diag('the changes came after the retry: this run did not test the case')
  if ps_nreq($portal) - $mark > 1;

ok(ps_wait_drained($node, $db, 90), 'drained') or ps_diag_stuck($node, $db);
my $reqs = $portal->requests(since => $mark);
my (%begins, $purges);
for my $r (@$reqs)
{
	for my $ev (@{ $r->{events} || [] })
	{
		next unless $ev->{patient_id} eq '2';
		$begins{ $ev->{seq} } = 1 if $ev->{op} eq 'snapshot_begin';
		$purges++ if $ev->{op} eq 'purge';
	}
}
ok($purges, 'the purge of patient 2 was sent');
is(scalar keys %begins, 1, 'after the purge, one snapshot of patient 2 (one seq) however often it is sent')
  or diag('snapshot seqs: ' . join(' ', sort { $a <=> $b } keys %begins));
ps_check_settled($node, $db, $portal, 'after a lost purge answer and a rebuilt unit',
	since => $mark, resends => 1);
is($portal->state->{practices}{postgres}{patients}{2}{open_snapshot}, undef,
	'no snapshot of patient 2 is left open on the portal');

$node->stop;
$portal->stop;
done_testing();
