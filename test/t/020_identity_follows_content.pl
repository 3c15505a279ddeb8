
# Copyright (c) 2026, portal_sync developers
#
# Defect: "A withheld item stays on the portal; an update is lost."
# SPEC v2 section 5, Identity: an event_id names one change with one
# content; when what is sent for that change differs (the row changed
# again, or became a delete) it carries a new event_id, so a portal that
# dedupes by event_id can never keep an older content in place of a newer
# one.  The same content sent again keeps its event_id.
#
# The portal applies a batch but answers only after http_timeout (2 s, set
# by ps_new_node), so the worker never hears that it was accepted.  While
# the request hangs the row changes again; then the portal fails (503)
# until the hung request has been applied, and the retries go through.
#
#   case 1: a medication's dose A -> B: the portal must end with dose B,
#           carried by an event_id other than the one that carried A;
#   case 2: an allergy's privacy_level raised above max_privacy_level (0):
#           the portal must end without the allergy; the delete carries an
#           event_id other than the upsert's.
#
# A row of the same patient changed in the same transaction and not
# changed again must be resent with the same event_id.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('identity', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 4) i;
	  SELECT pstest.book(i) FROM generate_series(1, 4) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

# The portal applies the next request but answers after 4 s (> http_timeout
# of 2 s); every later request fails with 503 until the test has seen the
# hung request applied.  Returns the request number of the hung request
# (undef on timeout).  $change_sql is committed while the request hangs.
sub hang_then_change
{
	my ($mark, $first_sql, $change_sql, $what) = @_;
	$portal->modes(
		{ mode => 'hang', seconds => 4, apply => JSON::PP::true, count => 1 },
		{ mode => 'status', status => 503 });
	one($first_sql);
	my $hung;
	ok(ps_wait_until(sub {
				my $r = $portal->requests(since => $mark);
				$hung = $r->[0]{n} if @$r;
				@$r;
			}, "$what: request in flight", 30),
		"$what: a request is in flight (held by the portal)");
	one($change_sql);
	# Wait until the portal has applied the request it held: the worker
	# never heard it accepted (it timed out), so it must send again.
	ok(ps_wait_until(sub {
				my $r = $portal->requests(since => $hung);
				$r->[0]{applied};
			}, "$what: held request applied", 30),
		"$what: the portal applied the held request after the worker's timeout");
	ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 1 },
			"$what: the worker saw the failure", 30),
		"$what: the worker saw the request fail");
	$portal->mode({ mode => 'ok' });
	ok(ps_wait_drained($node, $db, 60), "$what: drained");
	return $hung;
}

# ---------------------------------------------------------------- case 1: dose A -> B
my $med = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 1});
my $prob = one(q{SELECT min(problem_id) FROM ehr.problem WHERE patient_id = 1});
my $mark = ps_nreq($portal);
my $hung = hang_then_change($mark,
	qq{BEGIN;
	   UPDATE ehr.problem SET description = 'asthma (unchanged after this)' WHERE problem_id = $prob;
	   UPDATE ehr.medication SET dose = 'dose A' WHERE med_id = $med;
	   COMMIT;},
	qq{UPDATE ehr.medication SET dose = 'dose B' WHERE med_id = $med},
	'case 1');

my $reqs = $portal->requests(since => $mark, full => 1);
my $items = ps_portal_items($portal, $db);
is($items->{1}{medication}{$med}{dose} // 'missing', 'dose B',
	'case 1: the portal holds dose B (the update is not lost)');

my @med_up = grep { $_->{op} eq 'upsert' }
  @{ ps_events($reqs, source => 'medication', key => $med) };
my %ids_a = map { $_->{event_id} => 1 } grep { $_->{data}{dose} eq 'dose A' } @med_up;
my %ids_b = map { $_->{event_id} => 1 } grep { $_->{data}{dose} eq 'dose B' } @med_up;
ok(%ids_a, 'case 1: dose A was sent (in the held request)');
ok(%ids_b, 'case 1: dose B was sent');
my @shared = grep { $ids_a{$_} } sort keys %ids_b;
ok(!@shared, 'case 1: the event carrying dose B has an event_id other than the one that carried dose A')
  or diag('event_id(s) sent with dose A and with dose B: ' . join(' ', @shared));

# The unchanged row: sent in the held request (applied, never heard
# accepted), so it must be sent again, with the same event_id.
my @prob_up = grep { $_->{op} eq 'upsert' }
  @{ ps_events($reqs, source => 'problem', key => $prob) };
my $in_hung = grep { $_->{request} == $hung } @prob_up;
SKIP:
{
	skip 'the unchanged row did not ride in the held request', 2 unless $in_hung;
	cmp_ok(scalar(@prob_up), '>=', 2,
		'case 1: the unchanged row of the held request is sent again');
	my %ids = map { $_->{event_id} => 1 } @prob_up;
	is(scalar(keys %ids), 1,
		'case 1: the unchanged row keeps its event_id when resent')
	  or diag('event_ids: ' . join(' ', sort keys %ids));
}
ps_compare_state($node, $db, $portal, 'case 1');
ps_check_portal_invariants($portal, 'case 1');

# ---------------------------------------------------------------- case 2: privacy raised
my $alg = one(q{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = 2});
$mark = ps_nreq($portal);
$hung = hang_then_change($mark,
	qq{UPDATE ehr.allergy SET reaction = 'rash' WHERE allergy_id = $alg},
	qq{UPDATE ehr.allergy SET privacy_level = 1 WHERE allergy_id = $alg},
	'case 2');

$reqs = $portal->requests(since => $mark, full => 1);
$items = ps_portal_items($portal, $db);
ok(!exists $items->{2}{allergy}{$alg},
	'case 2: the allergy made private while its request was held is not on the portal')
  or diag('the portal holds: ' . $PortalSyncTest::JSON->encode($items->{2}{allergy}{$alg}));

my @alg = @{ ps_events($reqs, source => 'allergy', key => $alg) };
my %up_ids = map { $_->{event_id} => 1 } grep { $_->{op} eq 'upsert' } @alg;
my @del = grep { $_->{op} eq 'delete' } @alg;
ok(%up_ids, 'case 2: the upsert was sent (in the held request)');
ok(@del, 'case 2: a delete was sent');
@shared = grep { $up_ids{ $_->{event_id} } } @del;
ok(!@shared, 'case 2: the delete has an event_id other than the upsert it replaces')
  or diag('event_id sent with the upsert and with the delete: '
	  . join(' ', map { $_->{event_id} } @shared));
ps_compare_state($node, $db, $portal, 'case 2');
ps_check_portal_invariants($portal, 'case 2');

$node->stop;
$portal->stop;
done_testing();
