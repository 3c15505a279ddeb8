
# Copyright (c) 2026, portal_sync developers
#
# A snapshot started by a change of a purged patient's chart (the chart is
# shareable again: the change itself is the snapshot's request) is resumed
# like any other when a later batch of it fails (SPEC 5: the items of one
# snapshot share its seq; a later event is never sent while an earlier one
# is unanswered):
#
# 1. The rebuilt unit defers that change to a later resync of the patient,
#    and the unit is cut (batch_size) before the resync: the next unit
#    must resume the open snapshot, not begin a new one while it is open
#    at the portal ("snapshot_begin while snapshot N is open"; found by
#    016 in CI).
# 2. The snapshot's end was accepted with items still to follow it, and
#    the batch of those items fails: the next unit must send them, not
#    treat the change as a plain chart update (items lost).
#
# Both failed on the code before the fix.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# ---------------------------------------------------------------- case 1
{
my $portal = PortalSyncTest::Portal->start;
	my $node = ps_new_node('deferred_cut', $portal, conf => q{
	portal_sync.batch_size = 40
	});
	my $db = 'postgres';
	my $one = sub { return $node->safe_psql($db, $_[0]) };
	
	$one->(q{SELECT pstest.make_patient(i, 8) FROM generate_series(1, 2) i;
		  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
	ok(ps_wait_drained($node, $db, 60), 'initial drain');
	is($one->(qq{SELECT portal_sync.wait_ready('$_', '30s')}), 't', "patient $_ ready") for 1 .. 2;
	
	$one->(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 1});
	ok(ps_wait_drained($node, $db, 60), 'purge drained');
	is($one->(q{SELECT purged FROM portal_sync.enrollment WHERE patient_id = '1'}), 't', 'patient 1 purged');
	
	my $mark = ps_nreq($portal);
	$portal->modes({ mode => 'ok', count => 1 }, { mode => 'status', status => 500 });
	$one->(q{BEGIN;
		  UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 1;
		  SELECT portal_sync.resync_patient('2');
		  COMMIT;});
	ok(ps_wait_until(sub {
				grep { ($_->{status} // '') eq '500' } @{ $portal->requests(since => $mark) };
			}, 'a request failed', 30), 'the portal failed a request');
	note($one->(q{SELECT string_agg(seq || ':' || patient_id || ':' || op::text, ' ' ORDER BY seq) FROM portal_sync.outbox}));
	note($one->(q{SELECT string_agg(patient_id || ' req=' || coalesce(snapshot_request::text,'-') || ' seq=' || coalesce(snapshot_seq::text,'-'), '; ') FROM portal_sync.enrollment}));
	$one->(q{SELECT portal_sync.resync_patient('1')});
	$portal->mode({ mode => 'ok' });
	ok(ps_wait_drained($node, $db, 60), 'drained');
	
	my $reqs = $portal->requests(since => $mark, full => 1);
	for my $r (@$reqs)
	{
		note("request $r->{n} status $r->{status}: "
			  . join(' ', map { "$_->{patient_id}/$_->{op}/$_->{seq}" }
				  grep { $_->{op} ne 'upsert' } @{ $r->{events} }));
	}
	my $state = $portal->state;
	ps_check_portal_invariants($portal, 'deferred request cut off', $state);
	ps_compare_state($node, $db, $portal, 'deferred request cut off');
	
	$node->stop;
	$portal->stop;
}

# ---------------------------------------------------------------- case 2
{
my $portal = PortalSyncTest::Portal->start;
	my $node = ps_new_node('items_follow', $portal, conf => q{
	portal_sync.batch_size = 40
	});
	my $db = 'postgres';
	my $one = sub { return $node->safe_psql($db, $_[0]) };
	
	$one->(q{SELECT pstest.make_patient(i, 25) FROM generate_series(1, 2) i;
		  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
	ok(ps_wait_drained($node, $db, 60), 'initial drain');
	is($one->(qq{SELECT portal_sync.wait_ready('$_', '30s')}), 't', "patient $_ ready") for 1 .. 2;
	
	$one->(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 1});
	ok(ps_wait_drained($node, $db, 60), 'purge drained');
	is($one->(q{SELECT purged FROM portal_sync.enrollment WHERE patient_id = '1'}), 't', 'patient 1 purged');
	
	my $mark = ps_nreq($portal);
	# U1: b1 ok, b2 500.  U1': [b2 items, end(items_follow), 75 moved] -> A ok, B (end + 39 moved) ok, C 500.
	$portal->modes({ mode => 'ok', count => 1 }, { mode => 'status', status => 500, count => 1 },
		{ mode => 'ok', count => 2 }, { mode => 'status', status => 500, count => 1 });
	$one->(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 1});
	ok(ps_wait_drained($node, $db, 60), 'drained');
	my $reqs = $portal->requests(since => $mark, full => 1);
	for my $r (@$reqs)
	{
		note("request $r->{n} status $r->{status}: " . scalar(@{ $r->{events} }) . ' events; '
			  . join(' ', map { "$_->{patient_id}/$_->{op}/$_->{seq}" }
				  grep { $_->{op} ne 'upsert' || $_->{source} eq 'patient' } @{ $r->{events} }));
	}
	my $state = $portal->state;
	ps_check_portal_invariants($portal, 'items after the end, failed', $state);
	ps_compare_state($node, $db, $portal, 'items after the end, failed');
	$node->stop;
	$portal->stop;
}

done_testing();
