
# Copyright (c) 2026, portal_sync developers
#
# Sharing rules (SPEC 4) applied at send time: date cutoff (also for a
# timestamp date column), privacy levels, share_when, the chart's privacy
# (purge, then a snapshot when shareable again), a deleted chart, a deleted
# row, settings changes with resync_all(), and enabled = false.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('sharing', $portal);
my $db = 'postgres';

# So that a chart can be deleted while its rows remain (SPEC 4: a patient
# who has no chart row counts as restricted).
$node->safe_psql($db, q{
DO $$
DECLARE c record;
BEGIN
	FOR c IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
			 WHERE confrelid = 'ehr.patient'::regclass AND contype = 'f' LOOP
		EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
	END LOOP;
END
$$;
});

$node->safe_psql($db, q{
SELECT pstest.make_patient(i, 3) FROM generate_series(1, 10) i;
SELECT pstest.book(i) FROM generate_series(1, 10) i;
});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');

sub sent_since
{
	my ($mark, %f) = @_;
	return ps_events($portal->requests(since => $mark), accepted => 1, %f);
}

sub ops_of
{
	my ($events) = @_;
	return join(',', map { $_->{op} } @$events);
}

sub one
{
	my ($q) = @_;
	return $node->safe_psql($db, $q);
}

# ---------------------------------------------------------------- date cutoff
my $mark = scalar @{ $portal->requests };
one(q{UPDATE portal_sync.settings SET date_cutoff = '2024-02-03'});
my $med_old = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 1});   # start 2024-02-02
my $med_new = one(q{SELECT max(med_id) FROM ehr.medication WHERE patient_id = 1});   # start 2024-02-04
one(qq{UPDATE ehr.medication SET dose = '1 g' WHERE med_id IN ($med_old, $med_new)});
my $med_ins = one(q{INSERT INTO ehr.medication (patient_id, drug_name, start_date)
	VALUES (1, 'old drug', '2023-06-01') RETURNING med_id});
my $med_moved = one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 2 ORDER BY med_id OFFSET 2 LIMIT 1});
one(qq{UPDATE ehr.medication SET start_date = '2023-01-01' WHERE med_id = $med_moved});
# vital_sign.measured_at is a timestamp: compared by its date.
my ($vit_before, $vit_on) = split /\n/, one(q{
INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse) VALUES
	(3, '2024-02-02 23:59:00', 100), (3, '2024-02-03 00:01:00', 101) RETURNING vital_id});
ok(ps_wait_drained($node, $db), 'drained after cutoff changes');
is(ops_of(sent_since($mark, source => 'medication', key => $med_old)), 'delete',
	'changed item dated before the cutoff is sent as a delete');
is(ops_of(sent_since($mark, source => 'medication', key => $med_new)), 'upsert',
	'changed item on/after the cutoff is sent as an upsert');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'medication', key => $med_ins) }),
	'new item dated before the cutoff is not sent');
is(ops_of(sent_since($mark, source => 'medication', key => $med_moved)), 'delete',
	'item moved before the cutoff is sent as a delete');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'vital_sign', key => $vit_before) }),
	'timestamp the day before the cutoff is not sent');
is(ops_of(sent_since($mark, source => 'vital_sign', key => $vit_on)), 'upsert',
	'timestamp on the cutoff day is sent');

# Untouched old items stay until resync_all() re-applies the settings.
my $old_allergy = one(q{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = 4});
ok(exists ps_portal_items($portal, $db)->{4}{allergy}{$old_allergy},
	'settings change alone does not touch what was sent');
$mark = scalar @{ $portal->requests };
like(ps_query($node, $db, q{SELECT portal_sync.resync_all()}), qr/^\d+$/, 'resync_all returns a seq');
ok(ps_wait_drained($node, $db), 'drained after resync_all');
ps_compare_state($node, $db, $portal, 'cutoff after resync_all');
is(scalar @{ sent_since($mark, op => 'snapshot_begin') }, 10, 'resync_all: one snapshot per enrolled patient');

# ---------------------------------------------------------------- privacy
one(q{UPDATE portal_sync.settings SET date_cutoff = NULL});
$mark = scalar @{ $portal->requests };
my $med_p = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 5});
one(qq{UPDATE ehr.medication SET privacy_level = 2 WHERE med_id = $med_p});
my $all_p = one(q{INSERT INTO ehr.allergy (patient_id, allergen, privacy_level) VALUES (5, 'secret', 1) RETURNING allergy_id});
ok(ps_wait_drained($node, $db), 'drained after privacy changes');
is(ops_of(sent_since($mark, source => 'medication', key => $med_p)), 'delete',
	'item whose privacy was raised is sent as a delete');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'allergy', key => $all_p) }),
	'new item above max_privacy_level is not sent');
ok(!exists ps_portal_items($portal, $db)->{5}{medication}{$med_p}, 'restricted item gone from the portal');
$mark = scalar @{ $portal->requests };
one(qq{UPDATE ehr.medication SET privacy_level = 0 WHERE med_id = $med_p});
ok(ps_wait_drained($node, $db), 'drained after privacy lowered');
is(ops_of(sent_since($mark, source => 'medication', key => $med_p)), 'upsert',
	'item whose privacy was lowered is sent again');

# NULL privacy counts as 0 (a table whose privacy column is nullable).
one(q{ALTER TABLE ehr.problem ALTER privacy_level DROP NOT NULL});
my $prob_null = one(q{INSERT INTO ehr.problem (patient_id, description, privacy_level) VALUES (5, 'null privacy', NULL) RETURNING problem_id});
ok(ps_wait_drained($node, $db), 'drained after NULL privacy row');
ok(exists ps_portal_items($portal, $db)->{5}{problem}{$prob_null}, 'NULL privacy counts as 0');

# max_privacy_level raised, then resync_all.
one(q{UPDATE portal_sync.settings SET max_privacy_level = 1});
ps_query($node, $db, q{SELECT portal_sync.resync_all()});
ok(ps_wait_drained($node, $db), 'drained after max_privacy_level 1 + resync_all');
ok(exists ps_portal_items($portal, $db)->{5}{allergy}{$all_p}, 'privacy 1 item shared at max_privacy_level 1');
ps_compare_state($node, $db, $portal, 'max_privacy_level 1');
one(q{UPDATE portal_sync.settings SET max_privacy_level = 0});
ps_query($node, $db, q{SELECT portal_sync.resync_all()});
ok(ps_wait_drained($node, $db), 'drained after max_privacy_level 0 + resync_all');
ps_compare_state($node, $db, $portal, 'max_privacy_level back to 0');

# ---------------------------------------------------------------- share_when
$mark = scalar @{ $portal->requests };
my $med_err = one(q{SELECT min(med_id) FROM ehr.medication WHERE patient_id = 6});
one(qq{UPDATE ehr.medication SET status = 'entered_in_error' WHERE med_id = $med_err});
my $lab = one(q{INSERT INTO ehr.lab_result (patient_id, test_name, value, status, result_date)
	VALUES (6, 'CBC', 'pending', 'preliminary', '2024-04-01') RETURNING result_id});
my $note = one(q{INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, body)
	VALUES (6, 'Dr. B', 'phone', '2024-04-01', 'called mom') RETURNING note_id});
ok(ps_wait_drained($node, $db), 'drained after share_when changes');
is(ops_of(sent_since($mark, source => 'medication', key => $med_err)), 'delete',
	'share_when turning false sends a delete');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'lab_result', key => $lab) }),
	'preliminary lab not sent');
ok(!grep({ $_->{op} eq 'upsert' } @{ sent_since($mark, source => 'visit_note', key => $note) }),
	'draft note not sent');
$mark = scalar @{ $portal->requests };
one(qq{UPDATE ehr.lab_result SET status = 'final', value = '13.1' WHERE result_id = $lab});
one(qq{UPDATE ehr.visit_note SET finalized = true, finalized_at = now() WHERE note_id = $note});
ok(ps_wait_drained($node, $db), 'drained after share_when turning true');
is(ops_of(sent_since($mark, source => 'lab_result', key => $lab)), 'upsert', 'final lab sent');
is(ops_of(sent_since($mark, source => 'visit_note', key => $note)), 'upsert', 'finalized phone note sent');
ps_compare_state($node, $db, $portal, 'share_when');

# ---------------------------------------------------------------- deleted row
$mark = scalar @{ $portal->requests };
my $imm = one(q{SELECT min(imm_id) FROM ehr.immunization WHERE patient_id = 7});
one(qq{DELETE FROM ehr.immunization WHERE imm_id = $imm});
ok(ps_wait_drained($node, $db), 'drained after delete');
is(ops_of(sent_since($mark, source => 'immunization', key => $imm)), 'delete', 'deleted row sent as delete');

# ---------------------------------------------------------------- restricted chart
$mark = scalar @{ $portal->requests };
one(q{UPDATE ehr.patient SET privacy_level = 3 WHERE patient_id = 8});
ok(ps_wait_drained($node, $db), 'drained after restricting chart 8');
my $ev8 = sent_since($mark, patient => '8');
is(ops_of($ev8), 'purge', 'restricted chart: exactly one purge for the patient');
my $st8 = $portal->state->{practices}{$db}{patients}{8};
ok($st8->{purged} && !%{ $st8->{items} }, 'portal holds nothing for the restricted patient');
# Changes while restricted send nothing.
$mark = scalar @{ $portal->requests };
one(q{
INSERT INTO ehr.medication (patient_id, drug_name) VALUES (8, 'while restricted');
UPDATE ehr.allergy SET reaction = 'rash' WHERE patient_id = 8;
UPDATE ehr.insurance SET plan_name = 'changed' WHERE patient_id = 8;
UPDATE ehr.patient SET guardian_phone = '555-0100' WHERE patient_id = 8;
SELECT pstest.book(8);
});
ok(ps_wait_drained($node, $db), 'drained after changes to a restricted chart');
is(scalar @{ ps_events($portal->requests(since => $mark), patient => '8') }, 0,
	'nothing sent for a restricted chart');
ps_compare_state($node, $db, $portal, 'restricted chart');
# Shareable again: a snapshot.
$mark = scalar @{ $portal->requests };
one(q{UPDATE ehr.patient SET privacy_level = 0 WHERE patient_id = 8});
ok(ps_wait_drained($node, $db), 'drained after unrestricting chart 8');
$ev8 = sent_since($mark, patient => '8');
ok((grep { $_->{op} eq 'snapshot_begin' } @$ev8) && (grep { $_->{op} eq 'snapshot_end' } @$ev8),
	'chart shareable again: a snapshot is sent');
ps_compare_state($node, $db, $portal, 'chart unrestricted');

# ---------------------------------------------------------------- deleted chart
$mark = scalar @{ $portal->requests };
one(q{DELETE FROM ehr.patient WHERE patient_id = 9});
ok(ps_wait_drained($node, $db), 'drained after deleting chart 9');
my $ev9 = sent_since($mark, patient => '9');
is(ops_of($ev9), 'purge', 'deleted chart: one purge');
$mark = scalar @{ $portal->requests };
one(q{UPDATE ehr.medication SET dose = '2 mg' WHERE patient_id = 9});
ok(ps_wait_drained($node, $db), 'drained after changes without a chart');
is(scalar @{ ps_events($portal->requests(since => $mark), patient => '9') }, 0,
	'nothing sent for a patient without a chart');
ps_compare_state($node, $db, $portal, 'deleted chart');
$mark = scalar @{ $portal->requests };
one(q{INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob) VALUES (9, 'MRN9b', 'Again', 'Nine', '2015-01-01')});
ok(ps_wait_drained($node, $db), 'drained after re-creating chart 9');
ok(grep({ $_->{op} eq 'snapshot_end' } @{ sent_since($mark, patient => '9') }), 'chart back: a snapshot');
ps_compare_state($node, $db, $portal, 'chart re-created');

# ---------------------------------------------------------------- enabled = false
one(q{UPDATE portal_sync.settings SET enabled = false});
ok(ps_wait_until(sub { ps_status($node, $db)->{state} eq 'disabled' }, 'state disabled', 30),
	'status says disabled');
$mark = scalar @{ $portal->requests };
one(q{UPDATE ehr.medication SET dose = '3 mg' WHERE patient_id = 10});
ok(ps_wait_until(sub { ps_status($node, $db)->{pending_events} > 0 }, 'pending while disabled', 10),
	'capture continues while disabled');
# Give the worker a chance to (wrongly) send, then check nothing went.
is($node->safe_psql($db, q{SELECT pg_sleep(2)}), '', 'waited while disabled');
is(scalar @{ $portal->requests(since => $mark) }, 0, 'nothing sent while disabled');
one(q{UPDATE portal_sync.settings SET enabled = true});
ok(ps_wait_drained($node, $db), 'drained after enabling again');
ps_compare_state($node, $db, $portal, 'enabled again');

# ---------------------------------------------------------------- resync_rate pacing
ps_set_conf($node, 'portal_sync.resync_rate' => '4');
one(q{SELECT pstest.make_patient(11)});
ok(ps_wait_drained($node, $db), 'drained before paced resync');
$mark = scalar @{ $portal->requests };
my $enrolled = scalar @{ ps_enrolled($node, $db) };
ps_query($node, $db, q{SELECT portal_sync.resync_all()});
one(q{UPDATE ehr.insurance SET plan_name = 'during resync' WHERE patient_id = 11});
ok(ps_wait_drained($node, $db, 120), 'drained after paced resync_all');
my $rq = $portal->requests(since => $mark);
my @begins = sort { $a <=> $b } map { $_->{time} } grep {
	my $r = $_; grep { $_->{op} eq 'snapshot_begin' } @{ $r->{events} } } grep { $_->{status} =~ /^2/ } @$rq;
my ($ins_req) = grep { my $r = $_; $r->{status} =~ /^2/ && grep { ($_->{source} // '') eq 'insurance' && $_->{patient_id} eq '11' } @{ $r->{events} } } @$rq;
is(scalar(map { grep { $_->{op} eq 'snapshot_begin' } @{ $_->{events} } } grep { $_->{status} =~ /^2/ } @$rq), $enrolled,
	'paced resync_all: a snapshot for every enrolled patient');
my $spread = @begins ? $begins[-1] - $begins[0] : 0;
cmp_ok($spread, '>=', ($enrolled - 1) / 4 - 0.75, "snapshots paced by resync_rate ($enrolled over ${spread}s)");
ok($ins_req && @begins && $ins_req->{time} < $begins[-1],
	'an incremental update is not starved by the resync');
ps_set_conf($node, 'portal_sync.resync_rate' => undef);
ps_compare_state($node, $db, $portal, 'after paced resync');

ps_check_portal_invariants($portal, 'sharing rules');
ps_check_event_ids_stable($portal->requests, 'sharing rules');
ps_check_send_order($portal->requests, 'sharing rules');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');

$node->stop;
$portal->stop;
done_testing();
