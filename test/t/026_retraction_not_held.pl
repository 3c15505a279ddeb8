
# Copyright (c) 2026, portal_sync developers
#
# "A retraction waits behind a snapshot" (SPEC 5: a retraction (delete,
# purge) is never held back behind a snapshot that waits; SPEC 4: an item
# that is no longer shareable is sent as a delete, a chart that becomes
# restricted sends a purge).
#
# A ready patient's snapshot is made pending (resync_patient) while a
# writing transaction W is open; then one of the patient's items is made
# private (A) or the chart restricted (B).  The delete / purge must reach
# the portal while W is still open.  After W commits, the portal must equal
# the database.  Delivery is never paused.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('retraction_not_held', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{CREATE TABLE public.scratch (id int PRIMARY KEY, v text);
	  INSERT INTO public.scratch VALUES (1, 'x');
	  SELECT pstest.make_patient(i, 2) FROM generate_series(1, 8) i;
	  SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');
is(one(q{SELECT max_privacy_level FROM portal_sync.settings}), '0', 'max_privacy_level is 0');

sub events_since
{
	my ($mark, %f) = @_;
	return ps_events($portal->requests(since => $mark), accepted => 1, %f);
}

# ---------------------------------------------------------------- A: delete
# Patient 3's allergy is on the portal; W writes an unattached table.
{
	my $p = 3;
	my $allergy = one(qq{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = $p});
	ok(exists ps_portal_items($portal, $db)->{$p}{allergy}{$allergy}, "A: allergy $allergy of patient $p on the portal");

	my $w = $node->background_psql($db);
	$w->query_safe('BEGIN');
	$w->query_safe(q{UPDATE public.scratch SET v = 'W' WHERE id = 1});
	my $seq = one(qq{SELECT portal_sync.resync_patient('$p')});
	like($seq, qr/^\d+$/, "A: resync_patient('$p') queued a snapshot (seq $seq)");

	my $mark = ps_nreq($portal);
	one(qq{UPDATE ehr.allergy SET privacy_level = 3 WHERE allergy_id = $allergy});
	ok(ps_wait_until(sub { !exists ps_portal_items($portal, $db)->{$p}{allergy}{$allergy} },
			'A: allergy removed from the portal', 30),
		'A: the allergy made private is removed from the portal while W is open')
	  or do {
		diag('accepted events of the patient since: '
			  . join(' ', map { "$_->{op}/" . ($_->{source} // '') . "/" . ($_->{key} // '') } @{ events_since($mark, patient => "$p") }));
		ps_diag_stuck($node, $db);
	  };
	# The resync's snapshot may have been read before the privacy change
	# committed (it does not wait: the patient was enrolled all along), so
	# it may carry the allergy; once its delete was accepted, no upsert of
	# it may follow.
	my @evs = @{ ps_events($portal->requests(since => $mark), source => 'allergy', patient => "$p") };
	my ($del) = grep { $evs[$_]{op} eq 'delete' && ($evs[$_]{key} // '') eq $allergy } 0 .. $#evs;
	ok(defined $del, 'A: a delete of the allergy was sent');
	my @up = grep { $_->{op} eq 'upsert' && ($_->{key} // '') eq $allergy } @evs[ ($del // 0) + 1 .. $#evs ];
	ok(!@up, 'A: the private allergy was never sent again as an upsert after its delete');

	$w->query_safe('COMMIT');
	$w->quit;
	ok(ps_wait_drained($node, $db, 60), 'A: drained after W committed');
	ok(ps_wait_until(sub { one(qq{SELECT portal_sync.is_ready('$p')}) eq 't' }, 'A: ready', 30),
		"A: patient $p ready after the resync");
	ps_compare_state($node, $db, $portal, 'A: after W committed');
}

# ---------------------------------------------------------------- B: purge
# Patient 4's chart becomes restricted; W wrote a row of another enrolled
# patient (5).
{
	my $p = 4;
	ok(%{ ps_portal_items($portal, $db)->{$p} || {} }, "B: patient $p has items on the portal");

	my $w = $node->background_psql($db);
	$w->query_safe('BEGIN');
	$w->query_safe(q{UPDATE ehr.problem SET description = 'B: W' WHERE problem_id = (SELECT min(problem_id) FROM ehr.problem WHERE patient_id = 5)});
	my $seq = one(qq{SELECT portal_sync.resync_patient('$p')});
	like($seq, qr/^\d+$/, "B: resync_patient('$p') queued a snapshot (seq $seq)");

	my $mark = ps_nreq($portal);
	one(qq{UPDATE ehr.patient SET privacy_level = 3 WHERE patient_id = $p});
	ok(ps_wait_until(sub { @{ events_since($mark, patient => "$p", op => 'purge') } }, 'B: purge accepted', 30),
		'B: a purge of the restricted chart reaches the portal while W is open')
	  or ps_diag_stuck($node, $db);
	ok(!%{ ps_portal_items($portal, $db)->{$p} || {} }, "B: nothing of patient $p left on the portal while W is open");

	# Another patient still flows meanwhile.
	one(q{UPDATE ehr.medication SET dose = 'B: other' WHERE med_id = (SELECT min(med_id) FROM ehr.medication WHERE patient_id = 6)});
	ok(ps_wait_until(sub { grep { (($_->{dose} // '') eq 'B: other') } values %{ ps_portal_items($portal, $db)->{6}{medication} || {} } }, 'B: other patient', 30),
		'B: another patient\'s update flows while W is open');

	$w->query_safe('COMMIT');
	$w->quit;
	ok(ps_wait_drained($node, $db, 60), 'B: drained after W committed');
	ps_compare_state($node, $db, $portal, 'B: after W committed');
	is(scalar(grep { $_->{patient_id} eq "$p" } @{ $portal->state->{purge_violations} }), 0,
		"B: nothing sent for patient $p after its purge");

	# Shareable again: a snapshot brings the record back.
	one(qq{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = $p});
	ok(ps_wait_drained($node, $db, 60), 'B: drained after unrestricting');
	ps_compare_state($node, $db, $portal, 'B: chart shareable again');
}

ps_check_portal_invariants($portal, 'at the end');
ps_check_send_order($portal->requests, 'at the end');
ps_check_accepted_once($portal, 'at the end');
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'nothing dead-lettered');

$node->stop;
$portal->stop;
done_testing();
