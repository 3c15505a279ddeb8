
# Copyright (c) 2026, portal_sync developers
#
# A primary with a streaming standby; the standby is promoted in the middle
# of a drain (the primary is stopped in immediate mode while the portal is
# receiving its batches).  SPEC 2, 5: nothing unaccepted is dropped across
# standby promotion; events the primary had sent are sent again with the
# same event_ids (the portal dedupes); the promoted node ends with the
# portal equal to its shareable state.  Synchronous replication, so that
# every commit the primary made (and so every row it could send) is on the
# standby.

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
my $primary = ps_new_node('promo_primary', $portal, init => { allows_streaming => 1 }, conf => q{
portal_sync.batch_size = 10
});
my $db = 'postgres';
sub accepted { return scalar grep { $_->{status} =~ /^2/ } @{ $portal->requests } }

$primary->safe_psql($db, q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 10) i;
	SELECT pstest.book(i) FROM generate_series(1, 5) i;});
ok(ps_wait_drained($primary, $db), 'primary drained');

$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('promo_standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->safe_psql($db, q{ALTER SYSTEM SET synchronous_standby_names = '*'; SELECT pg_reload_conf();});
$primary->wait_for_catchup($standby);

# A slow portal; a large change; promotion when a part is accepted.
$portal->mode({ mode => 'delay', seconds => 0.1 });
my $mark = ps_nreq($portal);
$primary->safe_psql($db, q{BEGIN;
	SELECT pstest.make_patient(i, 3) FROM generate_series(11, 60) i;
	SELECT pstest.book(i) FROM generate_series(6, 60) i;
	UPDATE ehr.medication SET privacy_level = 2 WHERE med_id % 4 = 0;
	COMMIT;});
my $acc = accepted();
ok(ps_wait_until(sub { accepted() >= $acc + 8 }, 'drain under way', 60), 'primary drain under way');
my $pending = ps_status($primary, $db)->{pending_events};
cmp_ok($pending, '>', 30, "events pending on the primary at the failover ($pending)");
$primary->stop('immediate');
$standby->promote;
ok(ps_wait_until(sub { ps_worker_pid($standby, $db) }, 'worker after promotion', 60),
	'a worker starts on the promoted standby');
ps_check_settled($standby, $db, $portal, 'after promotion mid-drain', since => $mark, resends => 1, timeout => 180);

# The new primary keeps delivering.
$mark = ps_nreq($portal);
$standby->safe_psql($db, q{UPDATE ehr.allergy SET severity = 'severe', privacy_level = 1 WHERE patient_id <= 20});
ps_check_settled($standby, $db, $portal, 'new primary', since => $mark, resends => 1);

$standby->stop;
$portal->stop;
done_testing();
