
# Copyright (c) 2026, portal_sync developers
#
# SPEC 5 across crashes: the delivery worker is killed with SIGKILL ten
# times during one large drain (each is a crash-restart of the server), then
# the server is shut down in immediate mode during another drain.  Nothing
# accepted is lost, nothing unaccepted dropped, resent changes keep their
# event_ids, progress is made between kills, and no withheld item reached
# the portal (the changes were committed before the drains started).

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
my $node = ps_new_node('kill_drain', $portal, conf => q{
restart_after_crash = on
portal_sync.batch_size = 5
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }
sub accepted { return scalar grep { $_->{status} =~ /^2/ } @{ $portal->requests } }

# A slow portal: the drain takes a few hundred requests, up to
# max_inflight (4) at a time, so the kills also hit rounds of several
# requests in flight; each new worker first probes with one.
$portal->mode({ mode => 'delay', seconds => 0.06 });

my $mark = ps_nreq($portal);
one(q{BEGIN;
	SELECT pstest.make_patient(i, 3) FROM generate_series(1, 120) i;
	SELECT pstest.book(i) FROM generate_series(1, 100) i;
	UPDATE ehr.medication SET privacy_level = 3 WHERE med_id % 5 = 0;
	UPDATE ehr.patient SET privacy_level = 2 WHERE patient_id % 17 = 0;
	INSERT INTO ehr.ccda_document (patient_id, document) SELECT i, '<ClinicalDocument id="' || i || '"/>' FROM generate_series(1, 120, 7) i;
	COMMIT;});
my $pending0 = ps_status($node, $db)->{pending_events};
note("pending at the start: $pending0");

my @pending_at_kill;
my $pid = ps_worker_pid($node, $db);
for my $k (1 .. 10)
{
	my $acc = accepted();
	ps_wait_until(sub { accepted() >= $acc + 3 }, "progress before kill $k", 60);
	$pid = ps_worker_pid($node, $db);
	unless ($pid)
	{
		fail("kill $k: no worker");
		last;
	}
	push @pending_at_kill, ps_status($node, $db)->{pending_events};
	ps_kill_worker($node, $db, $pid);
	ok(ps_wait_until(sub { my $p = ps_worker_pid($node, $db); $p && $p != $pid }, "worker after kill $k", 60),
		"kill $k: a new worker runs");
}
note('pending events at each kill: ' . join(' ', @pending_at_kill));
cmp_ok($pending_at_kill[-1], '>', 0, 'the tenth kill still happened mid-drain')
  or diag('the drain finished before ten kills; make it larger');
cmp_ok($pending_at_kill[-1], '<', $pending_at_kill[0], 'progress was made across the kills');
ps_check_settled($node, $db, $portal, 'after ten SIGKILLs of the worker', since => $mark, resends => 1,
	timeout => 300);
like(slurp_file($node->logfile), qr/terminated by signal 9/, 'the server log shows the kills');

# ---------------------------------------------------------------- immediate shutdown
$mark = ps_nreq($portal);
one(q{BEGIN;
	SELECT pstest.make_patient(i, 2) FROM generate_series(121, 180) i;
	SELECT pstest.book(i) FROM generate_series(101, 180) i;
	UPDATE ehr.allergy SET reaction = 'changed ' || allergy_id, privacy_level = allergy_id % 2;
	UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id % 17 = 0;
	COMMIT;});
my $acc = accepted();
ok(ps_wait_until(sub { accepted() >= $acc + 10 }, 'drain under way', 60), 'second drain under way');
my $p = ps_status($node, $db)->{pending_events};
cmp_ok($p, '>', 50, "events pending at the immediate shutdown ($p)");
$node->stop('immediate');
$node->start;
ps_check_settled($node, $db, $portal, 'after an immediate shutdown mid-drain', since => $mark, resends => 1,
	timeout => 300);

$node->stop;
$portal->stop;
done_testing();
