
# Copyright (c) 2026, portal_sync developers
#
# Nothing accepted is lost and nothing unaccepted is dropped (SPEC 5) across
# a kill -9 of the delivery worker mid-drain, an immediate server shutdown
# mid-drain, and a kill -9 of the worker while a request is in flight.  A
# change resent after a crash keeps its event_id.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('crashes', $portal, conf => qq{
restart_after_crash = on
portal_sync.batch_size = 6
});
my $db = 'postgres';

sub one { return $node->safe_psql($db, $_[0]) }
sub accepted { return scalar grep { $_->{status} =~ /^2/ } @{ $portal->requests } }


# A slow portal, so that the drain takes many requests and some seconds.
$portal->mode({ mode => 'delay', seconds => 0.15 });

# ---------------------------------------------------------------- kill -9 of the worker
one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 30) i;
	  SELECT pstest.book(i) FROM generate_series(1, 20) i;});
my $acc0 = accepted();
ok(ps_wait_until(sub { accepted() >= $acc0 + 8 }, 'drain under way', 60), 'drain under way');
my $pid = ps_worker_pid($node, $db);
ok($pid, "worker pid $pid");
cmp_ok(ps_status($node, $db)->{pending_events}, '>', 20, 'events still pending at the kill');
# More changes once the server has recovered.
ok(ps_kill_worker($node, $db, $pid), 'kill -9 the worker mid-drain; the server is back');
one(q{UPDATE ehr.medication SET dose = 'after crash 1' WHERE patient_id <= 25;
	  SELECT pstest.book(i) FROM generate_series(21, 25) i;});
ok(ps_wait_until(sub { my $p = ps_worker_pid($node, $db); $p && $p != $pid }, 'new worker', 60),
	'a new worker runs');
ok(ps_wait_drained($node, $db, 240), 'drained after kill -9 of the worker');
ps_compare_state($node, $db, $portal, 'after kill -9 of the worker');
ps_check_portal_invariants($portal, 'after kill -9 of the worker');
ps_check_event_ids_stable($portal->requests, 'after kill -9 of the worker');
ps_check_send_order($portal->requests, 'after kill -9 of the worker');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');

# ---------------------------------------------------------------- kill -9 with a request in flight
# The portal applies the batch but the worker dies before it hears the
# answer: the batch is sent again with the same event_ids; the portal
# dedupes.
$portal->mode({ mode => 'hang', seconds => 1.5, apply => JSON::PP::true, count => 1 });
my $mark = scalar @{ $portal->requests };
one(q{UPDATE ehr.allergy SET reaction = 'in flight' WHERE patient_id <= 10});
ok(ps_wait_until(sub { scalar @{ $portal->requests(since => $mark) } }, 'request in flight', 30),
	'request in flight');
$pid = ps_worker_pid($node, $db);
ok(ps_kill_worker($node, $db, $pid), 'kill -9 the worker while the portal holds the request; the server is back');
ok(ps_wait_drained($node, $db, 120), 'drained after kill -9 with a request in flight');
# The restarted worker may resend the batch before the portal has finished
# holding the first copy (1.5 s): whichever copy is applied second is the
# duplicate, so wait for both.
my $dups = 0;
ps_wait_until(sub { $dups = $portal->state->{duplicates}; $dups > 0 },
	'both copies of the batch applied', 30);
ok($dups > 0, "applied batch resent after the crash and deduped ($dups duplicates)");
ps_compare_state($node, $db, $portal, 'after kill -9 in flight');
ps_check_event_ids_stable($portal->requests, 'after kill -9 in flight');
ps_check_send_order($portal->requests, 'after kill -9 in flight');

# ---------------------------------------------------------------- immediate shutdown mid-drain
$portal->mode({ mode => 'delay', seconds => 0.15 });
one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(31, 50) i;
	  SELECT pstest.book(i) FROM generate_series(26, 50) i;});
$acc0 = accepted();
ok(ps_wait_until(sub { accepted() >= $acc0 + 8 }, 'drain under way', 60), 'second drain under way');
cmp_ok(ps_status($node, $db)->{pending_events}, '>', 20, 'events still pending at the shutdown');
$node->stop('immediate');
# While the server is down, the portal has an outage too for a moment.
$portal->down;
$node->start;
one(q{UPDATE ehr.problem SET status = 'resolved' WHERE patient_id BETWEEN 20 AND 40;
	  DELETE FROM ehr.immunization WHERE patient_id BETWEEN 45 AND 50;});
$portal->up;
ok(ps_wait_drained($node, $db, 240), 'drained after an immediate shutdown');
ps_compare_state($node, $db, $portal, 'after immediate shutdown');
ps_check_portal_invariants($portal, 'after immediate shutdown');
ps_check_event_ids_stable($portal->requests, 'after immediate shutdown');
ps_check_send_order($portal->requests, 'after immediate shutdown');
ps_check_ccda_after_snapshot($portal->requests, 'after immediate shutdown');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');

# ---------------------------------------------------------------- clean restart with a backlog
$portal->mode({ mode => 'status', status => 503 });
one(q{UPDATE ehr.vital_sign SET pulse = pulse + 1 WHERE patient_id <= 30});
ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 1 }, 'failing', 60), 'portal failing');
$node->restart;
$portal->mode({ mode => 'ok' });
ok(ps_wait_drained($node, $db, 120), 'backlog drained after restart');
ps_compare_state($node, $db, $portal, 'after restart with a backlog');
ps_check_portal_invariants($portal, 'at the end');

$node->stop;
$portal->stop;
done_testing();
