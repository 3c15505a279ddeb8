
# Copyright (c) 2026, portal_sync developers
#
# Defect found by 027 in CI (seed 525998): a purge whose answer is lost may
# have been applied by the portal, so the patient's next events must be a
# snapshot (037).  The worker knew that only until the end of the unit
# built again for the retry.  When that unit could not reach the
# patient's entries (here: it is filled by another patient's changes,
# made visible meanwhile by the commit of a transaction that wrote them
# before the purge), the next unit sent the chart change as a plain update to a portal
# that had purged the patient: items missing, purge_violations.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('purge_outlives_unit', $portal,
	conf => "portal_sync.batch_size = 10\nportal_sync.http_timeout = '5s'\n");
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(2, 2); SELECT pstest.make_patient(3, 12);
	  SELECT pstest.book(i) FROM generate_series(2, 3) i;});
ok(ps_wait_drained($node, $db), 'initial drain');

# An open transaction changes twelve medications of patient 3, one
# statement each: twelve outbox entries whose seqs come before the purge's,
# visible only when it commits.
my $writer = $node->background_psql($db);
$writer->query_safe('BEGIN');
for my $med (split /\n/, one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 3 ORDER BY med_id}))
{
	$writer->query_safe(qq{UPDATE ehr.medication SET dose = 'open transaction $med' WHERE med_id = $med});
}

# The portal applies the batch just after the worker gives up (5.1 s
# against http_timeout 5 s), before any retry can reach it.
my $mark = ps_nreq($portal);
$portal->modes({ mode => 'hang', seconds => 5.1, apply => JSON::PP::true, count => 1 });
one(q{UPDATE ehr.patient SET privacy_level = 4 WHERE patient_id = 2});
# (the portal records a request when it has answered it: ask the worker)
ok(ps_wait_until(sub { one(q{SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'portal_sync worker' AND query = 'portal_sync: sending a batch'}) eq '1' },
	'the purge is in flight', 30), 'the purge of patient 2 is sent, the portal hangs (and applies it)');
# Before the worker gives up (http_timeout 5 s): the chart is shareable
# again, and the open transaction commits.  The unit built for the retry
# is filled by patient 3's twelve changes before it reaches patient 2.
one(q{BEGIN;
	  UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2;
	  UPDATE ehr.medication SET dose = 'after the purge' WHERE patient_id = 2;
	  COMMIT;});
$writer->query_safe('COMMIT');
$writer->quit;
# (the portal records a request once it has answered it: no more than the
# hung one means both committed before the retry, as the test intends)
diag('the commits came after the retry: this run did not test the case')
  if ps_nreq($portal) - $mark > 1;

ok(ps_wait_drained($node, $db, 60), 'drained') or ps_diag_stuck($node, $db);
ps_check_settled($node, $db, $portal, 'after a lost purge answer and a full unit', since => $mark, resends => 1);
is($portal->state->{practices}{postgres}{patients}{2}{purged} ? 1 : 0, 0, 'patient 2 is not purged on the portal');

$node->stop;
$portal->stop;
done_testing();
