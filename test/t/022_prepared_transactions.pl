
# Copyright (c) 2026, portal_sync developers
#
# Defect: "Prepared transactions break per-patient order."
# SPEC v2 section 5, Order: a patient's events are accepted in seq order
# (seq may be assigned when the event is first sent); a later event of a
# patient is never sent while an earlier one is unanswered.  Nobody waits
# for others: no transaction holds back the events of patients it did not
# write.
#
# An enrolled, ready patient P: session 1 changes a row of P and PREPAREs
# the transaction; session 2 changes another row of P and commits; while
# the prepared transaction stays prepared, session 2's change and every
# other patient's changes are delivered; then COMMIT PREPARED.  The portal
# must see P's events in seq order (its order checks and the send-order
# check), and end holding the database's shareable state.  Several rounds,
# several patients.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('prepared', $portal, conf => q{
max_prepared_transactions = 10
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 8) i;
	  SELECT pstest.book(i) FROM generate_series(1, 8) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');
for my $p (1 .. 8)
{
	is(one(qq{SELECT portal_sync.wait_ready('$p', '30s')}), 't', "patient $p ready");
}
ps_compare_state($node, $db, $portal, 'initial state');

my $s1 = $node->background_psql($db);
$s1->set_query_timer_restart;
my $s2 = $node->background_psql($db);
$s2->set_query_timer_restart;

# The portal holds the data of one row of a patient as ({source}{key}{col}).
sub portal_has
{
	my ($p, $src, $key, $col, $want) = @_;
	my $v = ps_portal_items($portal, $db)->{$p}{$src}{$key}{$col};
	return defined $v && $v eq $want;
}

for my $round (1 .. 3)
{
	my @pts = ($round * 2 - 1, $round * 2);    # two patients prepared per round
	my $other = 7 + ($round % 2);                # a patient nobody prepared
	my %med;
	my %alg;
	for my $p (@pts)
	{
		$med{$p} = one(qq{SELECT min(med_id) FROM ehr.medication WHERE patient_id = $p});
		$alg{$p} = one(qq{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = $p});
	}
	my $gid = "round$round";
	my $mark = ps_nreq($portal);

	# Session 1: one transaction over both patients, prepared.
	$s1->query_safe('BEGIN');
	$s1->query_safe(qq{UPDATE ehr.medication SET dose = 'prepared $round' WHERE med_id = $med{$_}})
	  for @pts;
	$s1->query_safe(qq{PREPARE TRANSACTION '$gid'});

	# Session 2: other rows of the same patients, committed; and another
	# patient.
	$s2->query_safe(qq{UPDATE ehr.allergy SET reaction = 'after prepare $round' WHERE allergy_id = $alg{$_}})
	  for @pts;
	my $oalg = one(qq{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = $other});
	$s2->query_safe(qq{UPDATE ehr.allergy SET reaction = 'other $round' WHERE allergy_id = $oalg});

	# Delivery goes on while the transaction is prepared: nobody waits for
	# it but its own (uncommitted) changes.
	for my $p (@pts)
	{
		ok(ps_wait_until(sub { portal_has($p, 'allergy', $alg{$p}, 'reaction', "after prepare $round") },
				"round $round: patient $p change committed after the prepare delivered", 30),
			"round $round: patient $p: a change committed after PREPARE TRANSACTION is delivered while it is prepared");
	}
	ok(ps_wait_until(sub { portal_has($other, 'allergy', $oalg, 'reaction', "other $round") },
			"round $round: patient $other delivered", 30),
		"round $round: another patient's change is delivered while the transaction is prepared");
	# A few more seconds of delivery (sweeps, wakeups) with the transaction
	# still prepared, before it commits.
	one(q{SELECT pg_sleep(3)});

	one(qq{COMMIT PREPARED '$gid'});
	ok(ps_wait_drained($node, $db, 60), "round $round: drained after COMMIT PREPARED");
	for my $p (@pts)
	{
		ok(portal_has($p, 'medication', $med{$p}, 'dose', "prepared $round"),
			"round $round: patient $p: the prepared change is delivered after COMMIT PREPARED");
	}
	ps_compare_state($node, $db, $portal, "round $round");
	# This round's requests only (the portal's lists are cumulative).
	my $state = $portal->state;
	for my $list (qw(order_violations ccda_violations purge_violations snapshot_violations protocol_errors))
	{
		$state->{$list} = [ grep { $_->{request} >= $mark } @{ $state->{$list} || [] } ];
	}
	ps_check_portal_invariants($portal, "round $round", $state);
	ps_check_send_order($portal->requests(since => $mark), "round $round");
}

# A prepared transaction rolled back: nothing of it, the rest flows.
$s1->query_safe('BEGIN');
$s1->query_safe(q{UPDATE ehr.problem SET description = 'rolled back' WHERE patient_id = 1});
$s1->query_safe(q{PREPARE TRANSACTION 'rb'});
$s2->query_safe(q{UPDATE ehr.problem SET description = 'committed' WHERE patient_id = 2});
ok(ps_wait_until(sub { my $pr = ps_portal_items($portal, $db)->{2}{problem} || {};
			grep { $_->{description} eq 'committed' } values %$pr },
		'patient 2 delivered', 30),
	'a change is delivered while another transaction is prepared');
one(q{ROLLBACK PREPARED 'rb'});
ok(ps_wait_drained($node, $db, 60), 'drained after ROLLBACK PREPARED');
ps_compare_state($node, $db, $portal, 'after ROLLBACK PREPARED');
ps_check_portal_invariants($portal, 'at the end');
ps_check_send_order($portal->requests, 'at the end');
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'nothing dead-lettered');

$s1->quit;
$s2->quit;
$node->stop;
$portal->stop;
done_testing();
