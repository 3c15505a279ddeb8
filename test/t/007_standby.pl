
# Copyright (c) 2026, portal_sync developers
#
# Workers do nothing on a hot standby and start after promotion; nothing
# unaccepted is dropped across the promotion (SPEC 2, 5).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $primary = ps_new_node('primary', $portal, init => { allows_streaming => 1 });
my $db = 'postgres';

$primary->safe_psql($db, q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 10) i;
	SELECT pstest.book(i) FROM generate_series(1, 6) i;});
ok(ps_wait_drained($primary, $db), 'primary drained');
ps_compare_state($primary, $db, $portal, 'primary');

$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;

# The portal now refuses everything: the primary's changes stay pending.
$portal->mode({ mode => 'status', status => 503 });
$primary->safe_psql($db, q{
UPDATE ehr.medication SET dose = 'before failover' WHERE patient_id <= 6;
SELECT pstest.book(i) FROM generate_series(7, 9) i;
INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (10, 'Other Payer', 'Z10');
});
$primary->wait_for_catchup($standby);
is($standby->safe_psql($db, 'SELECT pg_is_in_recovery()'), 't', 'standby in recovery');
ok($standby->safe_psql($db, 'SELECT count(*) FROM portal_sync.outbox') > 0,
	'pending events replicated to the standby');

# Only the standby is left.
$primary->stop('immediate');
my $mark = scalar @{ $portal->requests };
$portal->mode({ mode => 'ok' });
# Give a (wrong) standby worker time to send; the sweep is a few seconds.
$standby->safe_psql($db, 'SELECT pg_sleep(6)');
is(scalar @{ $portal->requests(since => $mark) }, 0, 'nothing sent from the hot standby');
is($standby->safe_psql($db,
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'portal_sync worker'"),
	'0', 'no delivery worker on the hot standby');

$standby->promote;
ok(ps_wait_until(sub { ps_worker_pid($standby, $db) }, 'worker after promotion', 60),
	'a worker starts after promotion');
ok(ps_wait_drained($standby, $db), 'promoted standby drained');
ps_compare_state($standby, $db, $portal, 'after promotion');
ps_check_portal_invariants($portal, 'after promotion');
ps_check_event_ids_stable($portal->requests, 'after promotion');
ps_check_send_order($portal->requests, 'after promotion');
is(ps_status($standby, $db)->{dead_letters}, 0, 'nothing dead-lettered');

# And it keeps working as the new primary.
$standby->safe_psql($db, q{UPDATE ehr.allergy SET severity = 'severe' WHERE patient_id = 1});
ok(ps_wait_drained($standby, $db), 'new primary delivers new changes');
ps_compare_state($standby, $db, $portal, 'new primary');

$standby->stop;
$portal->stop;
done_testing();
