
# Copyright (c) 2026, portal_sync developers
#
# Minimal reproductions of defects the randomized and fault tests found
# (each block names the SPEC line it checks).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $db = 'postgres';
my ($node, $nn);
sub one { return $node->safe_psql($db, $_[0]) }

# Each block on a fresh node and portal state, so that a stuck patient in
# one does not fail the next.
sub fresh
{
	$node->stop('immediate') if $node;
	$portal->reset;
	$nn++;
	$node = ps_new_node("regressions_$nn", $portal);
	ok(ps_wait_until(sub { ps_worker_pid($node, $db) }, 'worker after CREATE EXTENSION', 30),
		"node $nn: a worker runs within 30 s of CREATE EXTENSION at server start");
	one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 6) i;
		  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
	ok(ps_wait_drained($node, $db, 60), "node $nn: initial drain");
}

# The worker must start after CREATE EXTENSION right after the server
# start (SPEC 2: found automatically, without a restart): checked by
# fresh() for every node.

# ---------------------------------------------------------------- C-CDA + resync_all in one transaction
# SPEC 5: a patient's ccda upserts wait until its snapshot_end is accepted;
# nothing pending may be stuck.  A C-CDA document enrolls patient 3 and
# resync_all() runs in the same transaction.
fresh();
my $mark = ps_nreq($portal);
one(q{BEGIN;
	INSERT INTO ehr.ccda_document (patient_id, document) VALUES (3, '<ClinicalDocument/>');
	SELECT portal_sync.resync_all();
	COMMIT;});
ps_check_settled($node, $db, $portal, 'ccda enrollment + resync_all in one transaction', since => $mark, timeout => 30)
  or ps_diag_stuck($node, $db);

# resync_all() in its own transaction, while the snapshot of a patient just
# enrolled by a C-CDA document is still pending (delivery paused).
fresh();
$mark = ps_nreq($portal);
one(q{UPDATE portal_sync.settings SET enabled = false});
one(q{INSERT INTO ehr.ccda_document (patient_id, document) VALUES (3, '<ClinicalDocument/>')});
one(q{SELECT portal_sync.resync_all()});
one(q{UPDATE portal_sync.settings SET enabled = true});
ps_check_settled($node, $db, $portal, 'ccda enrollment, then resync_all while its snapshot is pending', since => $mark, timeout => 30)
  or ps_diag_stuck($node, $db);

# Same with resync_patient() of the newly enrolled patient, and an update
# of the document in the same transaction.
fresh();
$mark = ps_nreq($portal);
one(q{BEGIN;
	INSERT INTO ehr.ccda_document (patient_id, document) VALUES (4, '<ClinicalDocument/>');
	UPDATE ehr.ccda_document SET privacy_level = 0 WHERE patient_id = 4;
	SELECT portal_sync.resync_patient('4');
	COMMIT;});
ps_check_settled($node, $db, $portal, 'ccda enrollment + resync_patient in one transaction', since => $mark, timeout => 30)
  or ps_diag_stuck($node, $db);

# ---------------------------------------------------------------- insurance of a patient not enrolled
# SPEC 4: insurance flows enrolled or not; a chart that becomes restricted
# sends a purge (an item no longer shareable is sent as a delete); when it
# is shareable again its items come back.  Patient 5 is not enrolled.
fresh();
ok(exists ps_portal_items($portal, $db)->{5}{insurance}, 'insurance of patient 5 (not enrolled) on the portal');
$mark = ps_nreq($portal);
one(q{UPDATE ehr.patient SET privacy_level = 3 WHERE patient_id = 5});
ok(ps_wait_drained($node, $db, 30), 'drained');
ok(!exists ps_portal_items($portal, $db)->{5}{insurance},
	'chart of a patient not enrolled restricted: the insurance is removed from the portal')
  or diag('events sent: ' . join(' ', map { "$_->{op}/" . ($_->{source} // '') } @{ ps_events($portal->requests(since => $mark), patient => '5') }));
ps_compare_state($node, $db, $portal, 'restricted chart of a patient not enrolled');
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 5});
ok(ps_wait_drained($node, $db, 30), 'drained');
ps_compare_state($node, $db, $portal, 'chart of a patient not enrolled shareable again');
# A patient not enrolled whose chart was restricted from the start: the
# insurance was withheld; when the chart becomes shareable it must arrive.
one(q{SELECT pstest.make_patient(7, 1, 2)});
ok(ps_wait_drained($node, $db, 30), 'drained');
ok(!exists ps_portal_items($portal, $db)->{7}, 'insurance of a restricted chart withheld');
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 7});
ok(ps_wait_drained($node, $db, 30), 'drained');
ok(exists ps_portal_items($portal, $db)->{7}{insurance},
	'chart of a patient not enrolled becomes shareable: its withheld insurance is sent');
# Settings: resync_all() re-applies them to everything (SPEC 4), the
# insurance of patients not enrolled included.
one(q{UPDATE portal_sync.settings SET max_privacy_level = 1; UPDATE ehr.patient SET privacy_level = 1 WHERE patient_id = 6;});
one(q{SELECT portal_sync.resync_all()});
ok(ps_wait_drained($node, $db, 30), 'drained');
ps_compare_state($node, $db, $portal, 'insurance of a patient not enrolled after a settings change and resync_all');
one(q{UPDATE portal_sync.settings SET max_privacy_level = 0});
one(q{SELECT portal_sync.resync_all()});
ok(ps_wait_drained($node, $db, 30), 'drained');
ps_compare_state($node, $db, $portal, 'insurance of a patient not enrolled after lowering max_privacy_level and resync_all');

# ---------------------------------------------------------------- a retry re-applies the rules
# SPEC 4: rules are applied when the worker sends, to the row as it is
# then.  A batch that failed while the portal was down must not be resent
# later with the row as it was at the first attempt: here the row was made
# private (privacy 3) in between, so the portal must never receive it.
fresh();
my $med = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 1});
$mark = ps_nreq($portal);
$portal->down;
one(qq{UPDATE ehr.medication SET dose = 'before the retry' WHERE med_id = $med});
ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 1 }, 'a failed attempt', 30),
	'the batch was attempted while the portal was down');
one(qq{UPDATE ehr.medication SET privacy_level = 3, dose = 'made private' WHERE med_id = $med});
$portal->up;
ok(ps_wait_drained($node, $db, 30), 'drained');
my @up = grep { $_->{op} eq 'upsert' && $_->{key} eq $med }
  @{ ps_events($portal->requests(since => $mark, full => 1), source => 'medication') };
ok(!@up, 'a row made private while its batch was being retried never reaches the portal')
  or diag('upserts received: ' . join(', ', map { "request $_->{request} ($_->{status}): dose '$_->{data}{dose}' privacy $_->{data}{privacy_level}" } @up));
ps_check_sent_shareable($node, $db, $portal, $mark, 'retry after the row was made private');
ps_compare_state($node, $db, $portal, 'retry after the row was made private');

$node->stop;
$portal->stop;
done_testing();
