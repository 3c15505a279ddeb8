
# Copyright (c) 2026, portal_sync developers
#
# A purge whose answer is lost (SPEC 5: the portal applies a batch and the
# answer is lost): the portal applied it, the worker times out.  Meanwhile
# the chart becomes shareable again.  The retry must not send the
# patient's changes as plain updates to a portal that has purged the
# patient: it sends a snapshot, as after an accepted purge.  027 found this
# under the sanitizers (purge_violations, items missing on the portal);
# this test did not fail on the code before the fix (there its retry sent
# the purge again, then the snapshot), so it guards the outcome, not that
# path.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('lost_purge_answer', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 4) i;
	  SELECT pstest.book(i) FROM generate_series(1, 4) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial state');

my $mark = ps_nreq($portal);
# the purge is applied, its answer comes after http_timeout (2 s)
$portal->modes({ mode => 'hang', seconds => 4, apply => JSON::PP::true, count => 1 });
one(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 2});
ok(ps_wait_until(sub { grep { $_->{rule} && $_->{rule} eq 'hang' } @{ $portal->requests(since => $mark) } },
	'the purge is in flight', 30), 'the purge is sent, the portal hangs');
# One transaction (psql runs each statement of a script in its own): the
# sent-data check below compares with the rows as they are now, which is
# only what was sent if no snapshot can be read between the two updates.
one(q{BEGIN;
	  UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2;
	  UPDATE ehr.medication SET dose = 'after the purge' WHERE patient_id = 2;
	  COMMIT;});
ok(ps_wait_drained($node, $db), 'drained');
ps_check_settled($node, $db, $portal, 'after a lost purge answer', since => $mark, resends => 1);
is($portal->state->{practices}{postgres}{patients}{2}{purged} ? 1 : 0, 0, 'patient 2 is not purged on the portal');

$node->stop;
$portal->stop;
done_testing();
