
# Copyright (c) 2026, portal_sync developers
#
# Edge cases of capture-then-send (SPEC 3, 4, 5): a row whose key changes,
# a row moved from one patient to another (or matched from no patient), a
# TRUNCATE, insert and delete in one transaction, JSON of awkward values and
# types, a patient enrolled without a chart, and long EHR transactions that
# overlap a snapshot or a purge (per-patient order must still hold).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('edge', $portal);
my $db = 'postgres';

sub one { return $node->safe_psql($db, $_[0]) }
sub nreq { return scalar @{ $portal->requests } }
sub sent_since
{
	my ($mark, %f) = @_;
	return ps_events($portal->requests(since => $mark), accepted => 1, %f);
}

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 12) i;
	  SELECT pstest.book(i) FROM generate_series(1, 5) i;});
ok(ps_wait_drained($node, $db), 'initial drain');

# ---------------------------------------------------------------- key change
my $mark = nreq();
my $old_key = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 1});
one(qq{UPDATE ehr.medication SET med_id = 990001 WHERE med_id = $old_key});
ok(ps_wait_drained($node, $db), 'drained after a key change');
my $items = ps_portal_items($portal, $db);
ok(!exists $items->{1}{medication}{$old_key}, 'old key gone from the portal');
ok(exists $items->{1}{medication}{990001}, 'new key on the portal');

# ---------------------------------------------------------------- patient moves
one(q{INSERT INTO ehr.lab_result (patient_id, test_name, value, status, result_date)
	  VALUES (NULL, 'unmatched lead', '2', 'final', '2024-06-01')});
my $moved = one(q{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = 3});
my $moved2 = one(q{SELECT max(allergy_id) FROM ehr.allergy WHERE patient_id = 3});
$mark = nreq();
one(qq{UPDATE ehr.lab_result SET patient_id = 2 WHERE patient_id IS NULL;
	   UPDATE ehr.allergy SET patient_id = 4 WHERE allergy_id = $moved;
	   UPDATE ehr.allergy SET patient_id = 9 WHERE allergy_id = $moved2;});
ok(ps_wait_drained($node, $db), 'drained after moving rows between patients');
$items = ps_portal_items($portal, $db);
ok(!exists $items->{3}{allergy}{$moved}, 'moved row gone from the old patient');
ok(exists $items->{4}{allergy}{$moved}, 'moved row on the new patient');
ok(!exists $items->{3}{allergy}{$moved2}, 'row moved to a patient not enrolled: gone from the old one');
ok(!exists $items->{9}{allergy}, 'and no allergy for the patient not enrolled');
ps_compare_state($node, $db, $portal, 'after key change and moves');

# ---------------------------------------------------------------- TRUNCATE
$mark = nreq();
one(q{TRUNCATE ehr.immunization});
ok(ps_wait_drained($node, $db), 'drained after TRUNCATE');
ok(!grep({ exists $_->{immunization} } values %{ ps_portal_items($portal, $db) }),
	'TRUNCATE removes the source\'s items from the portal');
ps_compare_state($node, $db, $portal, 'after TRUNCATE');

# ---------------------------------------------------------------- insert + delete, many updates
$mark = nreq();
my $tmp = one(q{BEGIN;
	INSERT INTO ehr.problem (patient_id, description) VALUES (1, 'typo') RETURNING problem_id;
	DELETE FROM ehr.problem WHERE description = 'typo';
	COMMIT;});
one(q{BEGIN;
	UPDATE ehr.vital_sign SET pulse = 101 WHERE patient_id = 1;
	UPDATE ehr.vital_sign SET pulse = 102 WHERE patient_id = 1;
	UPDATE ehr.vital_sign SET pulse = 103 WHERE patient_id = 1;
	COMMIT;});
one(q{UPDATE ehr.vital_sign SET pulse = 104 WHERE patient_id = 1});
one(q{UPDATE ehr.vital_sign SET pulse = 105 WHERE patient_id = 1});
ok(ps_wait_drained($node, $db), 'drained after insert+delete and repeated updates');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'problem', key => $tmp) }),
	'a row inserted and deleted in one transaction is never sent as an upsert');
ps_compare_state($node, $db, $portal, 'after repeated updates');

# ---------------------------------------------------------------- awkward values and types
# (Not a jsonb 'null': in a JSON row object it cannot differ from SQL NULL.)
one(q{
CREATE TABLE ehr.device_reading (
	reading_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	patient_id int,
	taken_on date,
	tags text[],
	payload jsonb,
	duration interval,
	ok boolean,
	big numeric(30, 10),
	ratio float8,
	small smallint,
	note text,
	at_tz timestamptz,
	nothing text,
	privacy_level int DEFAULT 0
);
CREATE INDEX ON ehr.device_reading (patient_id);
SELECT portal_sync.attach('ehr.device_reading', 'clinical', 'patient_id',
	date_col => 'taken_on', privacy_col => 'privacy_level');
});
$mark = nreq();
one(q{INSERT INTO ehr.device_reading (patient_id, taken_on, tags, payload, duration, ok, big, ratio, small, note, at_tz)
VALUES
 (1, '2024-05-01', ARRAY['a', 'b "quoted"', NULL], '{"x": [1, 2.5, null, true], "y": {"z": "é"}}',
  '1 day 02:03:04', true, 12345678901234567890.0123456789, 0.1, -32768,
  E'quote " backslash \\\\ slash / newline \n tab \t cr \r ctl \x01 \x1f unicode é 漢字 😀 \u2028',
  '2024-05-01 12:34:56.789+02'),
 (2, '2024-05-02', '{}', '[]', '-3 hours', false, -0.5, 1e300, 0, '', '2024-05-02 00:00:00+00'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, -1.5e-300, NULL, NULL, NULL);
});
ok(ps_wait_drained($node, $db), 'drained after awkward values');
is(scalar @{ sent_since($mark, source => 'device_reading', op => 'upsert') }, 3, 'three readings sent');
is(scalar @{ $portal->state->{protocol_errors} }, 0, 'bodies stay valid JSON');
ps_compare_state($node, $db, $portal, 'after awkward values');

# ---------------------------------------------------------------- enrolled without a chart
one(q{SELECT portal_sync.enroll('777')});
ok(ps_wait_drained($node, $db), 'drained after enrolling a patient without a chart');
ok(!%{ ps_portal_items($portal, $db)->{777} || {} }, 'nothing on the portal for a patient without a chart');

# ---------------------------------------------------------------- long transactions
# A: a change captured before the patient enrolls, committed after the
# snapshot was requested.
my $bg = $node->background_psql($db);
$bg->query_safe(q{BEGIN});
$bg->query_safe(q{UPDATE ehr.medication SET dose = 'long A' WHERE patient_id = 7});
one(q{SELECT pstest.book(7)});
$node->safe_psql($db, 'SELECT pg_sleep(1.5)');
$bg->query_safe(q{COMMIT});
ok(ps_wait_drained($node, $db), 'A: drained');
$items = ps_portal_items($portal, $db);
my @meds7 = split /\n/, one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 7 ORDER BY 1});
is(join(',', map { $items->{7}{medication}{$_}{dose} // 'missing' } @meds7), 'long A,long A',
	'A: the change committed after the snapshot was requested reaches the portal');
ps_compare_state($node, $db, $portal, 'A: change committed across an enrollment');

# B: an enrolled patient's change committed after resync_patient().
$bg->query_safe(q{BEGIN});
$bg->query_safe(q{UPDATE ehr.allergy SET reaction = 'long B' WHERE patient_id = 1});
ps_query($node, $db, q{SELECT portal_sync.resync_patient('1')});
$node->safe_psql($db, 'SELECT pg_sleep(1.5)');
$bg->query_safe(q{COMMIT});
ok(ps_wait_drained($node, $db), 'B: drained');
is(scalar(grep { $_->{patient_id} eq '1' } @{ $portal->state->{order_violations} }), 0,
	'B: patient 1\'s events accepted in seq order across the resync');
ps_compare_state($node, $db, $portal, 'B: change committed across a resync');

# C: a change committed after the chart was restricted (purge).
$bg->query_safe(q{BEGIN});
$bg->query_safe(q{UPDATE ehr.medication SET dose = 'long C' WHERE patient_id = 2});
one(q{UPDATE ehr.patient SET privacy_level = 3 WHERE patient_id = 2});
$node->safe_psql($db, 'SELECT pg_sleep(1.5)');
$bg->query_safe(q{COMMIT});
ok(ps_wait_drained($node, $db), 'C: drained');
is(scalar(grep { $_->{patient_id} eq '2' } @{ $portal->state->{purge_violations} }), 0,
	'C: nothing sent for patient 2 after its purge');
ps_compare_state($node, $db, $portal, 'C: change committed across a purge');
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 2});
ok(ps_wait_drained($node, $db), 'C: drained after unrestricting');
ps_compare_state($node, $db, $portal, 'C: after unrestricting');

# D: one patient's open transaction does not hold back another patient.
$bg->query_safe(q{BEGIN});
$bg->query_safe(q{UPDATE ehr.medication SET dose = 'long D' WHERE patient_id = 3});
$mark = nreq();
one(q{UPDATE ehr.medication SET dose = 'quick D' WHERE patient_id = 4});
my $t0 = time();
ok(ps_wait_until(sub { scalar @{ sent_since($mark, patient => '4', source => 'medication') } }, 'patient 4 sent', 10),
	'D: another patient\'s change flows while a transaction is open');
cmp_ok(time() - $t0, '<', 3, 'D: promptly');
$bg->query_safe(q{COMMIT});
$bg->quit;
ok(ps_wait_drained($node, $db), 'D: drained');
ps_compare_state($node, $db, $portal, 'D: at the end');

ps_check_portal_invariants($portal, 'edge cases');
ps_check_event_ids_stable($portal->requests, 'edge cases');
ps_check_send_order($portal->requests, 'edge cases');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');

$node->stop;
$portal->stop;
done_testing();
