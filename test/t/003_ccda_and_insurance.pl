
# Copyright (c) 2026, portal_sync developers
#
# C-CDA documents are delivered only after the patient's snapshot is
# accepted (SPEC 1, 5), even when the snapshot is refused a few times first;
# insurance flows without enrollment (SPEC 1); per-patient order.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('ccda', $portal);
my $db = 'postgres';

sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 12) i});
ok(ps_wait_drained($node, $db), 'initial drain');

# ---------------------------------------------------------------- C-CDA enrolls,
# its snapshot is refused three times: the document must wait for it.
$portal->mode({ mode => 'status', status => 503, count => 3 });
my $mark = scalar @{ $portal->requests };
my $doc1 = one(q{INSERT INTO ehr.ccda_document (patient_id, document) VALUES (1, '<ClinicalDocument id="1"/>') RETURNING doc_id});
ok(ps_wait_drained($node, $db), 'drained after C-CDA enrollment');
my $reqs = $portal->requests(since => $mark);
is(scalar(grep { $_->{status} eq '503' } @$reqs), 3, 'portal refused three times');
ps_check_ccda_after_snapshot($portal->requests, 'C-CDA enrollment with refused snapshot');
my $ccda_ev = ps_events($reqs, accepted => 1, patient => '1', source => 'ccda', key => $doc1, op => 'upsert');
is(scalar @$ccda_ev, 1, 'the C-CDA document is delivered once accepted');
is(ps_query($node, $db, q{SELECT portal_sync.is_ready('1')}), 't', 'patient 1 ready');

# A second document for a ready patient flows right away.
$mark = scalar @{ $portal->requests };
my $doc2 = one(q{INSERT INTO ehr.ccda_document (patient_id, doc_type, document) VALUES (1, 'referral', '<ClinicalDocument id="2"/>') RETURNING doc_id});
ok(ps_wait_drained($node, $db), 'drained after second document');
is(scalar @{ ps_events($portal->requests(since => $mark), accepted => 1, source => 'ccda', key => $doc2, op => 'upsert') },
	1, 'second document delivered');

# Appointment and C-CDA in one transaction: the C-CDA still waits.
$portal->mode({ mode => 'status', status => 500, count => 2 });
one(q{BEGIN;
SELECT pstest.book(2);
INSERT INTO ehr.ccda_document (patient_id, document) VALUES (2, '<ClinicalDocument id="3"/>');
INSERT INTO ehr.ccda_document (patient_id, document) VALUES (3, '<ClinicalDocument id="4"/>');
COMMIT;});
ok(ps_wait_drained($node, $db), 'drained after appointment + C-CDA');
ps_check_ccda_after_snapshot($portal->requests, 'appointment and C-CDA in one transaction');

# Many patients enrolled by C-CDA at once, with random failures.
$portal->mode({ mode => 'random_fail', rate => 0.4, status => 500, seed => 7 });
one(q{INSERT INTO ehr.ccda_document (patient_id, document)
	SELECT i, '<ClinicalDocument/>' FROM generate_series(4, 8) i, generate_series(1, 2)});
ok(ps_wait_drained($node, $db, 180), 'drained after C-CDA for five patients under random failures');
$portal->mode({ mode => 'ok' });
ps_check_ccda_after_snapshot($portal->requests, 'five C-CDA enrollments under failures');
ps_compare_state($node, $db, $portal, 'after C-CDA enrollments');

# A resync keeps the documents on the portal (they are not dropped by the
# snapshot) and does not send them before the new snapshot_end.
$mark = scalar @{ $portal->requests };
like(ps_query($node, $db, q{SELECT portal_sync.resync_patient('1')}), qr/^\d+$/, 'resync_patient returns a seq');
ok(ps_wait_drained($node, $db), 'drained after resync_patient');
ps_compare_state($node, $db, $portal, 'after resync_patient');
my $ev = ps_events($portal->requests(since => $mark), accepted => 1, patient => '1');
my ($end_i) = grep { $ev->[$_]{op} eq 'snapshot_end' } 0 .. $#$ev;
my @early = grep { ($ev->[$_]{kind} // '') eq 'ccda' && $ev->[$_]{op} eq 'upsert' && (!defined $end_i || $_ < $end_i) } 0 .. $#$ev;
ok(defined $end_i && !@early, 'resync: no C-CDA before the new snapshot_end');

# A document whose privacy is raised is withdrawn; one without a patient is
# skipped and counted.
$mark = scalar @{ $portal->requests };
one(qq{UPDATE ehr.ccda_document SET privacy_level = 4 WHERE doc_id = $doc2});
my $sk0 = ps_status($node, $db)->{skipped_rows};
one(q{INSERT INTO ehr.ccda_document (patient_id, doc_type, document) VALUES (NULL, 'imported', '<ClinicalDocument/>')});
ok(ps_wait_drained($node, $db), 'drained after document changes');
is(join(',', map { $_->{op} } @{ ps_events($portal->requests(since => $mark), accepted => 1, source => 'ccda', key => $doc2) }),
	'delete', 'restricted document sent as a delete');
is(ps_status($node, $db)->{skipped_rows}, $sk0 + 1, 'unmatched document skipped and counted');

# ---------------------------------------------------------------- insurance
# Patient 10 is not enrolled: insurance flows, nothing else does.
$mark = scalar @{ $portal->requests };
my $ins = one(q{INSERT INTO ehr.insurance (patient_id, coverage_rank, payer, member_id) VALUES (10, 2, 'Second Payer', 'X10') RETURNING ins_id});
ok(ps_wait_drained($node, $db), 'drained after insurance insert');
is(join(',', map { $_->{op} } @{ ps_events($portal->requests(since => $mark), accepted => 1, patient => '10') }),
	'upsert', 'insurance insert of a patient not enrolled is sent');
ok(exists ps_portal_items($portal, $db)->{10}{insurance}{$ins}, 'on the portal');
$mark = scalar @{ $portal->requests };
one(qq{UPDATE ehr.insurance SET group_number = 'G1' WHERE ins_id = $ins});
one(q{UPDATE ehr.medication SET dose = '5 mg' WHERE patient_id = 10});
ok(ps_wait_drained($node, $db), 'drained after insurance update');
my $ev10 = ps_events($portal->requests(since => $mark), accepted => 1, patient => '10');
is(join(',', map { "$_->{source}:$_->{op}" } @$ev10), 'insurance:upsert',
	'insurance update sent, clinical change of a patient not enrolled is not');
$mark = scalar @{ $portal->requests };
one(qq{DELETE FROM ehr.insurance WHERE ins_id = $ins});
ok(ps_wait_drained($node, $db), 'drained after insurance delete');
is(join(',', map { $_->{op} } @{ ps_events($portal->requests(since => $mark), accepted => 1, patient => '10') }),
	'delete', 'insurance delete sent');
ok(!exists ps_portal_items($portal, $db)->{10}{insurance}{$ins}, 'gone from the portal');
is_deeply([ grep { $_ eq '10' } @{ ps_enrolled($node, $db) } ], [], 'insurance does not enroll');
is(scalar @{ ps_events($portal->requests, patient => '10', op => 'snapshot_begin') }, 0, 'no snapshot for patient 10');

# Insurance of an enrolled patient, then enrollment of a patient whose
# insurance was already sent: the snapshot carries it too.
$mark = scalar @{ $portal->requests };
one(q{SELECT pstest.book(11)});
ok(ps_wait_drained($node, $db), 'drained after enrolling 11');
ok(grep({ $_->{source} eq 'insurance' && $_->{op} eq 'upsert' }
		@{ ps_events($portal->requests(since => $mark), accepted => 1, patient => '11') }),
	'snapshot carries the insurance');

# Per-patient order under a mixed load with failures.
$portal->mode({ mode => 'random_fail', rate => 0.3, status => 502, seed => 3 });
one(q{
UPDATE ehr.insurance SET plan_name = 'p1' WHERE patient_id = 11;
UPDATE ehr.medication SET dose = 'a' WHERE patient_id = 11;
UPDATE ehr.insurance SET plan_name = 'p2' WHERE patient_id = 11;
UPDATE ehr.medication SET dose = 'b' WHERE patient_id = 11;
UPDATE ehr.patient SET privacy_level = 2 WHERE patient_id = 11;
UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 11;
UPDATE ehr.insurance SET plan_name = 'p3' WHERE patient_id = 12;
});
ok(ps_wait_drained($node, $db, 180), 'drained after mixed load');
$portal->mode({ mode => 'ok' });
ps_compare_state($node, $db, $portal, 'at the end');
ps_check_portal_invariants($portal, 'at the end');
ps_check_event_ids_stable($portal->requests, 'at the end');
ps_check_send_order($portal->requests, 'at the end');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');

$node->stop;
$portal->stop;
done_testing();
