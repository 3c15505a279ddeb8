
# Copyright (c) 2026, portal_sync developers
#
# Attachments, enrollments and the outbox survive pg_dump / pg_restore and
# CREATE DATABASE ... TEMPLATE (SPEC 3, 6).  A practice with several
# sources (a columns list, share_when, enroll_when, date and privacy
# columns), enrolled patients, a column renamed before the dump, and
# events pending while the portal is down, is dumped in custom format
# (restored with pg_restore into a new database of the same cluster) and
# in plain format (restored with psql into a database of a second
# cluster).  Both restores exit 0 with no ERROR or WARNING; each copy
# captures at once (no WARNING, the outbox grows), keeps its columns
# protected, follows a rename made after the restore, says
# needs_adoption, and after adopt() (another practice_id, or another
# portal) delivers its pending events as the right source and row and then
# its new writes.  A template copy works the same.  Writers keep writing
# while delivery runs.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('dump_origin', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# medication with a columns list, attached again late so that its source
# id is not the one a fresh attach in table order would give it
one(q{
SELECT portal_sync.detach('ehr.medication');
SELECT portal_sync.attach('ehr.medication', 'clinical', 'patient_id',
	date_col => 'start_date', privacy_col => 'privacy_level',
	share_when => 'status <> ''entered_in_error''',
	columns => '{med_id, drug_name, dose, route, frequency, start_date, status}');
UPDATE portal_sync.settings SET date_cutoff = '2024-01-01', max_privacy_level = 1;
SELECT pstest.make_patient(i, 2) FROM generate_series(1, 10) i;
SELECT pstest.book(i) FROM generate_series(1, 6) i;
UPDATE ehr.visit_note SET finalized = true WHERE patient_id = 7;
});
ps_check_settled($node, $db, $portal, 'origin, before the dump');

# A rename before the dump: a listed column, and a column both rules of the
# notes read.
one(q{ALTER TABLE ehr.medication RENAME COLUMN dose TO dosage;
	  ALTER TABLE ehr.visit_note RENAME COLUMN finalized TO is_final});
is(one(q{SELECT columns FROM portal_sync.sources WHERE name = 'medication'}),
	'{med_id,drug_name,dosage,route,frequency,start_date,status}',
	'rename before the dump: the columns list follows');
is(one(q{SELECT share_when || ' / ' || enroll_when FROM portal_sync.sources WHERE name = 'visit_note'}),
	q{is_final / (is_final AND (note_type = ANY (ARRAY['encounter'::text, 'well_visit'::text])))},
	'rename before the dump: the rules follow');
# (the portal gets the new column name with each row's next change: send
# every row again)
one(q{SELECT portal_sync.resync_all()});
ps_check_settled($node, $db, $portal, 'origin, after the renames');

# Events pending at dump time: the portal is down.
my $mark = ps_nreq($portal);
$portal->down;
my $deleted_allergy = one(q{SELECT min(allergy_id) FROM ehr.allergy WHERE patient_id = 3});
one(qq{UPDATE ehr.medication SET dosage = 'PENDING ' || med_id WHERE patient_id = 2;
	   DELETE FROM ehr.allergy WHERE allergy_id = $deleted_allergy;
	   UPDATE ehr.visit_note SET is_final = true WHERE patient_id = 8;
	   SELECT pstest.book(9);});
my $outbox_q = q{SELECT string_agg(format('%s %s %s %s %s', o.seq, o.patient_id, coalesce(s.name, '-'), o.op, o.keys),
								 E'\n' ORDER BY o.seq)
				 FROM portal_sync.outbox o LEFT JOIN portal_sync.source s USING (source_id)};
my $outbox_at_dump = one($outbox_q);
like($outbox_at_dump, qr/ medication u /, 'pending at dump time: a medication change');
like($outbox_at_dump, qr/ allergy d \{$deleted_allergy\}/, 'pending at dump time: an allergy delete');
my $sources_q = q{SELECT string_agg(format('%s %s %s %s %s %s %s %s %s %s %s', s.source_id, v.name, v.source, v.kind,
										   v.patient_col, v.key_col, v.date_col, v.privacy_col, v.share_when,
										   v.enroll_when, v.columns),
									E'\n' ORDER BY s.source_id)
				  FROM portal_sync.sources v JOIN portal_sync.source s USING (name)};
my $sources_at_dump = one($sources_q);

my $custom = "$PostgreSQL::Test::Utils::tmp_check/practice.dump";
my $plain = "$PostgreSQL::Test::Utils::tmp_check/practice.sql";
for my $dump ([ 'custom', '-Fc', $custom ], [ 'plain', '-Fp', $plain ])
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ 'pg_dump', $dump->[1], '-f', $dump->[2], '-d', $node->connstr($db) ],
		'>', \$out, '2>', \$err);
	ok($ok, "pg_dump ($dump->[0]) exits 0");
	unlike($err, qr/ERROR|WARNING/, "pg_dump ($dump->[0]): no ERROR or WARNING") or diag($err);
}

# Custom format, restored into a new database of the same cluster.
$node->safe_psql('template1', 'CREATE DATABASE restored');
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ 'pg_restore', '-d', $node->connstr('restored'), $custom ], '>', \$out, '2>', \$err);
	ok($ok, 'pg_restore exits 0');
	unlike($err, qr/ERROR|WARNING/, 'pg_restore: no ERROR or WARNING') or diag($err);
}

# Plain format, restored with psql into a database of a second cluster
# that sends to another portal.
my $portal2 = PortalSyncTest::Portal->start;
my $node2 = ps_new_node('dump_target', $portal2, no_setup => 1);
$node2->safe_psql('postgres', 'CREATE DATABASE practice_copy');
{
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node2->connstr('practice_copy'),
			'-f', $plain ], '>', \$out, '2>', \$err);
	ok($ok, 'psql restoring the plain dump in another cluster exits 0');
	unlike($err, qr/ERROR|WARNING/, 'plain restore: no ERROR or WARNING') or diag($err);
}

# What every copy must be: its settings and its outbox as dumped, the
# rules analyzed again, capture working at once, columns still protected.
sub check_copy
{
	my ($n, $cdb, $name) = @_;
	is($n->safe_psql($cdb, $sources_q), $sources_at_dump, "$name: the attachments, as dumped");
	is($n->safe_psql($cdb, $outbox_q), $outbox_at_dump,
		"$name: pending events name the same sources and rows");
	is($n->safe_psql($cdb, q{SELECT capture_disabled FROM portal_sync.status}), '{}',
		"$name: capture can fire on every attached table");
	ok(ps_wait_until(sub { (ps_status($n, $cdb)->{state} // '') eq 'needs_adoption' }, "$name needs_adoption", 60),
		"$name: status says needs_adoption");

	my $before = $n->safe_psql($cdb, q{SELECT count(*) FROM portal_sync.outbox});
	my ($ret, $out, $err) = $n->psql($cdb,
		q{UPDATE ehr.medication SET dosage = dosage || ' (copy)' WHERE patient_id = 4;
		  UPDATE ehr.visit_note SET is_final = true WHERE patient_id = 10;
		  INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, dosage, route, frequency, start_date)
		  VALUES (5, 'ibuprofen', '5640', '100 mg', 'oral', 'PRN', date '2025-01-01');});
	is($ret, 0, "$name: writes to attached tables succeed");
	unlike($err, qr/WARNING|ERROR/, "$name: and raise no WARNING") or diag($err);
	cmp_ok($n->safe_psql($cdb, q{SELECT count(*) FROM portal_sync.outbox}), '>=', $before + 3,
		"$name: writes are captured at once");
	is($n->safe_psql($cdb, q{SELECT enrolled_by FROM portal_sync.patients WHERE patient_id = '10'}), 'visit_note',
		"$name: enroll_when (over a renamed column) enrolls");

	($ret, $out, $err) = $n->psql($cdb, q{ALTER TABLE ehr.medication DROP COLUMN drug_name});
	isnt($ret, 0, "$name: a listed column cannot be dropped");
	like($err, qr/depends on column drug_name/, "$name: because capture depends on it");
	($ret, $out, $err) = $n->psql($cdb, q{ALTER TABLE ehr.visit_note DROP COLUMN is_final});
	isnt($ret, 0, "$name: a column a rule reads cannot be dropped");

	# a rename after the restore: the key, and a column share_when reads
	$n->safe_psql($cdb, q{ALTER TABLE ehr.medication RENAME COLUMN status TO med_status;
		ALTER TABLE ehr.allergy RENAME COLUMN allergy_id TO allergy_key});
	is($n->safe_psql($cdb, q{SELECT share_when || ' ' || array_to_string(columns, ',') FROM portal_sync.sources
							  WHERE name = 'medication'}),
		q{(med_status <> 'entered_in_error'::text) med_id,drug_name,dosage,route,frequency,start_date,med_status},
		"$name: a rename after the restore is followed");
	is($n->safe_psql($cdb, q{SELECT key_col FROM portal_sync.sources WHERE name = 'allergy'}), 'allergy_key',
		"$name: a renamed key is followed");
	$before = $n->safe_psql($cdb, q{SELECT count(*) FROM portal_sync.outbox});
	($ret, $out, $err) = $n->psql($cdb,
		q{UPDATE ehr.medication SET med_status = 'entered_in_error' WHERE patient_id = 6;
		  UPDATE ehr.allergy SET reaction = 'rash' WHERE patient_id = 1;});
	unlike($err, qr/WARNING|ERROR/, "$name: writes after the rename raise nothing") or diag($err);
	cmp_ok($n->safe_psql($cdb, q{SELECT count(*) FROM portal_sync.outbox}), '>=', $before + 2,
		"$name: writes after the rename are captured");
	return;
}

check_copy($node, 'restored', 'pg_restore -Fc');
check_copy($node2, 'practice_copy', 'plain dump, second cluster');

# The portal comes back: the original delivers what it holds; no copy
# sends anything before adopt().
$portal->up;
ps_check_settled($node, $db, $portal, 'origin, after the outage');
sleep(2);
is(scalar(grep { ($_->{practice_id} // '') ne 'postgres' } @{ $portal->requests(since => $mark) }), 0,
	'nothing of the restored copy reaches the portal before adopt()');
is(scalar @{ $portal2->requests }, 0, 'nothing of the second cluster\'s copy is sent before adopt()');

# The events a copy sends after adopt(): no delete of a row the portal
# must hold (a pending change of one source sent as a delete of another),
# and the pending medication changes arrive as medication rows.
sub check_adopted
{
	my ($n, $cdb, $p, $practice, $name) = @_;
	my $since = ps_nreq($p);
	$n->safe_psql($cdb, qq{UPDATE portal_sync.settings SET practice_id = '$practice'}) if $practice;
	$n->safe_psql($cdb, q{SELECT portal_sync.adopt()});
	ok(ps_wait_until(sub { (ps_status($n, $cdb)->{state} // '') ne 'needs_adoption' }, "$name adopted", 60),
		"$name: adopted (status no longer needs_adoption)");
	# a writer keeps writing while the copy delivers
	my $writer = $n->background_psql($cdb);
	$writer->query_safe(q{UPDATE ehr.allergy SET severity = 'mild' WHERE patient_id = 2});
	$writer->query_safe(q{SELECT pstest.book(10)});
	$writer->quit;
	ok(ps_wait_drained($n, $cdb), "$name: drained after adopt()");
	ps_compare_state($n, $cdb, $p, "$name after adopt()");
	my $practice_id = $n->safe_psql($cdb, q{SELECT practice_id FROM portal_sync.settings});
	my @events = map { @{ $_->{events} } }
	  grep { ($_->{practice_id} // '') eq $practice_id } @{ $p->requests(since => $since, full => 1) };
	ok(scalar @events, "$name: events sent");
	my $exp = ps_expected_items($n, $cdb);
	my @bad_deletes = grep { $_->{op} eq 'delete' && $exp->{ $_->{patient_id} }{ $_->{source} }{ $_->{key} } } @events;
	is(scalar @bad_deletes, 0, "$name: no delete of a row the portal must hold")
	  or diag(explain [ @bad_deletes[ 0 .. ($#bad_deletes > 5 ? 5 : $#bad_deletes) ] ]);
	my @pending = grep { ($_->{source} // '') eq 'medication' && ($_->{data}{dosage} // '') =~ /^PENDING / } @events;
	ok(@pending && !grep({ $_->{patient_id} ne '2' } @pending),
		"$name: the pending medication changes arrive as medication rows of their patient");
	is(scalar(grep { ($_->{source} // '') ne 'medication' && exists(($_->{data} // {})->{dosage}) } @events), 0,
		"$name: no other source carries a medication row");

	# new writes flow
	$since = ps_nreq($p);
	$n->safe_psql($cdb, q{UPDATE ehr.medication SET dosage = 'after adopt' WHERE patient_id = 3});
	ok(ps_wait_drained($n, $cdb), "$name: a new write is delivered");
	ps_compare_state($n, $cdb, $p, "$name, a new write");
	return;
}

check_adopted($node, 'restored', $portal, 'restored-copy', 'pg_restore -Fc');
check_adopted($node2, 'practice_copy', $portal2, undef, 'plain dump, second cluster');
ps_check_settled($node, $db, $portal, 'origin, beside its copies');

# A template copy works the same (its catalogs are copied as they are).
{
	my ($ret, $out, $err) = $node->psql('template1', 'CREATE DATABASE template_copy TEMPLATE postgres', timeout => 60);
	is($ret, 0, 'CREATE DATABASE ... TEMPLATE') or diag($err);
	is($node->safe_psql('template_copy', $sources_q), one($sources_q), 'template copy: the attachments');
	ok(ps_wait_until(sub { (ps_status($node, 'template_copy')->{state} // '') eq 'needs_adoption' },
		'template copy needs_adoption', 60), 'template copy: status says needs_adoption');
	my $before = $node->safe_psql('template_copy', q{SELECT count(*) FROM portal_sync.outbox});
	($ret, $out, $err) = $node->psql('template_copy',
		q{ALTER TABLE ehr.medication RENAME COLUMN route TO route_of_administration;
		  UPDATE ehr.medication SET route_of_administration = 'topical' WHERE patient_id = 1;});
	is($ret, 0, 'template copy: a rename and a write') or diag($err);
	unlike($err, qr/WARNING|ERROR/, 'template copy: no WARNING');
	cmp_ok($node->safe_psql('template_copy', q{SELECT count(*) FROM portal_sync.outbox}), '>', $before,
		'template copy: writes are captured at once');
	($ret, $out, $err) = $node->psql('template_copy', q{ALTER TABLE ehr.medication DROP COLUMN route_of_administration});
	isnt($ret, 0, 'template copy: a listed column cannot be dropped');
	# pg_upgrade creates the triggers before the settings' data is back,
	# and so without their column dependencies: here they are deleted by
	# hand, and adopt() (which an upgraded cluster needs anyway) records
	# them again.
	$node->safe_psql('template_copy', q{DELETE FROM pg_depend WHERE classid = 'pg_trigger'::regclass AND refobjsubid > 0
		AND objid IN (SELECT oid FROM pg_trigger WHERE tgname = 'portal_sync_capture_insert')});
	($ret, $out, $err) = $node->psql('template_copy',
		q{BEGIN; ALTER TABLE ehr.medication DROP COLUMN route_of_administration; ROLLBACK;}, on_error_stop => 1);
	is($ret, 0, 'template copy: without the dependencies a listed column could be dropped') or diag($err);
	my $since = ps_nreq($portal);
	$node->safe_psql('template_copy', q{UPDATE portal_sync.settings SET practice_id = 'template-copy';
		SELECT portal_sync.adopt()});
	($ret, $out, $err) = $node->psql('template_copy', q{ALTER TABLE ehr.medication DROP COLUMN route_of_administration});
	isnt($ret, 0, 'template copy: adopt() records the dependencies again');
	($ret, $out, $err) = $node->psql('template_copy', q{ALTER TABLE ehr.visit_note DROP COLUMN is_final});
	isnt($ret, 0, 'template copy: ... of the columns the rules read too');
	ok(ps_wait_drained($node, 'template_copy'), 'template copy: drained after adopt()');
	ps_compare_state($node, 'template_copy', $portal, 'template copy after adopt()');

	# A rule that names a type: renaming the type, or moving it to another
	# schema, rewrites the rule's text too.
	$node->safe_psql('template_copy', q{
		CREATE TYPE ehr.triage AS ENUM ('routine', 'urgent', 'internal');
		CREATE TABLE ehr.referral (referral_id int PRIMARY KEY, patient_id int NOT NULL, level ehr.triage);
		CREATE INDEX ON ehr.referral (patient_id);
		SELECT portal_sync.attach('ehr.referral', 'clinical', 'patient_id', share_when => 'level <> ''internal''');
		CREATE SCHEMA referrals;
		ALTER TYPE ehr.triage RENAME TO triage_level;
		ALTER TYPE ehr.triage_level SET SCHEMA referrals;});
	is($node->safe_psql('template_copy', q{SELECT share_when FROM portal_sync.sources WHERE name = 'referral'}),
		q{(level <> 'internal'::referrals.triage_level)}, 'a renamed and moved type: the rule follows');
	($ret, $out, $err) = $node->psql('template_copy',
		q{INSERT INTO ehr.referral VALUES (1, 1, 'urgent'), (2, 1, 'internal')});
	is($ret, 0, 'a renamed type: writes succeed') or diag($err);
	ok(ps_wait_drained($node, 'template_copy'), 'a renamed type: delivered');
	ps_compare_state($node, 'template_copy', $portal, 'a renamed type');
}

ps_check_settled($node, $db, $portal, 'origin, at the end');

done_testing();
