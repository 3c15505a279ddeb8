
# Copyright (c) 2026, portal_sync developers
#
# The portal is down (connections refused) for a minute while the EHR keeps
# writing (SPEC 5: nothing unaccepted is dropped across portal outages of
# any length).  During the outage: events queue, status shows the failure
# and backs off (no busy retry), nothing is dead-lettered.  Afterwards the
# portal ends equal to the shareable state, and no withheld item reached it
# (every write happened while the portal was unreachable, so the database
# at the end is the state at send time).
#
# PS_OUTAGE_SECONDS shortens the outage (default 60).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my $outage = $ENV{PS_OUTAGE_SECONDS} // 60;
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('outage', $portal, conf => q{
portal_sync.batch_size = 50
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 30) i;
	  SELECT pstest.book(i) FROM generate_series(1, 20) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'before the outage');

# (The control API shares the port: the request log is read after up.)
my $mark = ps_nreq($portal);
$portal->down;
my $t0 = time();
my $i = 0;
my $max_pending = 0;
my %states;
while (time() - $t0 < $outage)
{
	$i++;
	# Mixed EHR writes, including privacy changes, a restricted chart, new
	# enrollments and deletes.
	one(qq{BEGIN;
		UPDATE ehr.medication SET dose = 'outage $i' WHERE patient_id = 1 + $i % 25;
		INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse) VALUES (1 + $i % 30, timestamp '2025-01-01 12:00' + interval '1 hour' * $i, 60 + $i % 50);
		UPDATE ehr.allergy SET privacy_level = $i % 3 WHERE patient_id = 1 + ($i * 7) % 30;
		UPDATE ehr.problem SET status = CASE WHEN $i % 4 = 0 THEN 'entered_in_error' ELSE 'active' END WHERE patient_id = 1 + ($i * 3) % 30;
		UPDATE ehr.patient SET privacy_level = CASE WHEN $i % 5 = 0 THEN 3 ELSE 0 END WHERE patient_id = 1 + $i % 9;
		DELETE FROM ehr.immunization WHERE imm_id = (SELECT min(imm_id) FROM ehr.immunization WHERE patient_id = 1 + ($i * 11) % 30);
		INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (1 + $i % 30, 'Outage Payer', 'O$i');
		COMMIT;});
	one(qq{SELECT pstest.book(20 + $i)}) if $i <= 10;
	my $s = ps_status($node, $db);
	$max_pending = $s->{pending_events} if $s->{pending_events} > $max_pending;
	$states{ $s->{state} }++;
	sleep(1);
}
my $s = ps_status($node, $db);
note("outage of ${outage}s: $i write rounds, states seen: "
	  . join(', ', map { "$_ x$states{$_}" } sort keys %states));
cmp_ok($s->{pending_events}, '>', 100, "events queued during the outage ($s->{pending_events})");
ok($s->{consecutive_failures} >= 3, "consecutive failures counted ($s->{consecutive_failures})");
like($s->{last_error} // '', qr/connect|refused|couldn|fail/i, 'last_error says the portal cannot be reached')
  or diag('last_error: ' . ($s->{last_error} // 'NULL'));
ok($states{backing_off}, 'status showed backing_off during the outage');
is($s->{dead_letters}, 0, 'nothing dead-lettered during the outage');
# Backoff: with retry_max_delay 2s, at most about one attempt a second
# (plus the ones a commit wakes); not a busy loop.  delivery_log rows of
# failed attempts tell.
my $attempts = one(q{SELECT count(*) FROM portal_sync.delivery_log WHERE accepted_at IS NULL AND sent_at > now() - interval '10 minutes'});
cmp_ok($attempts, '<=', 3 * $outage, "no busy retry: $attempts failed attempts in ${outage}s");

my $t_up = time();
$portal->up;
my $t1 = time();
is(scalar(grep { $_->{time} < $t_up } @{ $portal->requests(since => $mark) }), 0,
	'nothing reached the portal while it was down');
ps_check_settled($node, $db, $portal, 'after a portal outage', since => $mark, timeout => 120);
note(sprintf('backlog delivered in %.1fs', time() - $t1));

# Still working afterwards.
$mark = ps_nreq($portal);
one(q{UPDATE ehr.medication SET dose = 'after the outage' WHERE patient_id = 2});
ps_check_settled($node, $db, $portal, 'after the outage, new changes', since => $mark);

$node->stop;
$portal->stop;
done_testing();
