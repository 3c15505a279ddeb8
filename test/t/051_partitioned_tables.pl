
# Copyright (c) 2026, portal_sync developers
#
# Partitioned tables (SPEC §3).  A date-partitioned lab observation table
# (its only unique index is (obs_id, observed_on), as PostgreSQL requires
# of a partitioned table) is attached with a date cutoff, a privacy
# column, a share_when and a columns list; its partitions differ in row
# format (a column dropped from the parent before some were created, a
# table created on its own and attached later), one level is partitioned
# again.  Rows written through the parent and through statements naming a
# partition, also an UPDATE that moves a row to another partition, are
# captured exactly once while delivery runs; partitions created with
# CREATE TABLE ... PARTITION OF or ALTER TABLE ... ATTACH PARTITION after
# attach() are captured at once.  DETACH PARTITION stops capturing the
# detached table and leaves the portal as it is until a snapshot no
# longer mentions its rows; DROP of a partition tells the portal its rows
# are gone, and keeps the source attached.  A partitioned appointment
# table enrolls through a statement naming one of its partitions.  At each
# step the portal holds exactly the shareable rows.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('partitions', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{
CREATE SEQUENCE ehr.lab_obs_id;
CREATE TABLE ehr.lab_obs (
	legacy_code	text,
	obs_id		bigint NOT NULL DEFAULT nextval('ehr.lab_obs_id'),
	patient_id	int NOT NULL,
	observed_on	date NOT NULL,
	test_name	text NOT NULL,
	value		text,
	status		text NOT NULL DEFAULT 'final',
	privacy_level int NOT NULL DEFAULT 0,
	lab_comment	text,
	PRIMARY KEY (obs_id, observed_on)
) PARTITION BY RANGE (observed_on);
CREATE INDEX ON ehr.lab_obs (patient_id);
CREATE TABLE ehr.lab_obs_2024 PARTITION OF ehr.lab_obs
	FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
-- the parent's row format changes: partitions created from now on differ
ALTER TABLE ehr.lab_obs DROP COLUMN legacy_code;
CREATE TABLE ehr.lab_obs_2025 PARTITION OF ehr.lab_obs
	FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY RANGE (observed_on);
CREATE TABLE ehr.lab_obs_2025a PARTITION OF ehr.lab_obs_2025
	FOR VALUES FROM ('2025-01-01') TO ('2025-07-01');
CREATE TABLE ehr.lab_obs_2025b PARTITION OF ehr.lab_obs_2025
	FOR VALUES FROM ('2025-07-01') TO ('2026-01-01');

CREATE SEQUENCE ehr.booking_id;
CREATE TABLE ehr.booking (
	booking_id	bigint NOT NULL DEFAULT nextval('ehr.booking_id'),
	patient_id	int,
	starts_on	date NOT NULL,
	status		text NOT NULL DEFAULT 'scheduled',
	PRIMARY KEY (booking_id, starts_on)
) PARTITION BY RANGE (starts_on);
CREATE INDEX ON ehr.booking (patient_id);
CREATE TABLE ehr.booking_2026 PARTITION OF ehr.booking
	FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
});

# A partition cannot be attached: the partitioned table is.
my ($rc, $out, $err) = $node->psql($db,
	q{SELECT portal_sync.attach('ehr.lab_obs_2025a', 'clinical', 'patient_id')});
isnt($rc, 0, 'attaching a partition is refused');
like($err, qr/"lab_obs_2025a" is a partition of "lab_obs".*HINT:  Attach the partitioned table ehr\.lab_obs/s,
	'  with a hint naming the partitioned table');

# A key that is unique only with the partition key: accepted, with a notice.
($rc, $out, $err) = $node->psql($db, q{
SELECT portal_sync.attach('ehr.lab_obs', 'clinical', 'patient_id',
	date_col => 'observed_on', privacy_col => 'privacy_level',
	share_when => 'status = ''final''',
	columns => '{obs_id, observed_on, test_name, value, status}');
SELECT portal_sync.attach('ehr.booking', 'appointment', 'patient_id',
	date_col => 'starts_on', enroll_when => 'status = ''scheduled''');});
is($rc, 0, 'the partitioned tables are attached');
like($err, qr/NOTICE:  key_col "obs_id" of partitioned table "lab_obs" is unique only together with the partition key/,
	'  with a notice that the key must not repeat across partitions');
is(one(q{SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'portal\_sync\_capture\_%'
	AND tgrelid::regclass::text LIKE 'ehr.lab_obs%'}), 4 * 5,
	'the parent and every partition, sub-partitions too, have the capture triggers');

one(q{UPDATE portal_sync.settings SET date_cutoff = '2024-03-01', max_privacy_level = 1});
one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 8) i});
# rows before the patients are enrolled: they arrive with the snapshots
one(q{INSERT INTO ehr.lab_obs (patient_id, observed_on, test_name, value, privacy_level, lab_comment)
	  SELECT i, date '2024-01-15' + (i * 37) % 700, 'glucose', (80 + i)::text, i % 3, 'SECRET staff'
	  FROM generate_series(1, 8) i, generate_series(1, 3) j});
# patients 1..6 enroll: through the parent and through a partition
one(q{INSERT INTO ehr.booking (patient_id, starts_on) SELECT i, date '2026-06-01' FROM generate_series(1, 3) i});
one(q{INSERT INTO ehr.booking_2026 (patient_id, starts_on) SELECT i, date '2026-07-01' FROM generate_series(4, 6) i});
is(one(q{SELECT string_agg(patient_id, ',' ORDER BY patient_id::int) FROM portal_sync.patients}),
	'1,2,3,4,5,6', 'booking through the parent and through a partition enrolls');
one(q{INSERT INTO ehr.booking_2026 (patient_id, starts_on, status) VALUES (7, '2026-08-01', 'cancelled')});
is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id = '7'}), 0,
	'a row naming a partition that does not satisfy enroll_when enrolls nobody');

# Writers keep writing, through the parent and naming partitions, while
# the snapshots and the incremental updates go.
my $writer = $node->background_psql($db);
sub write_some
{
	my ($tag) = @_;
	$writer->query_safe(qq{
INSERT INTO ehr.lab_obs (patient_id, observed_on, test_name, value, lab_comment)
SELECT i, date '2025-07-05' + i * 20, 'ferritin $tag', '30', 'SECRET' FROM generate_series(1, 8) i;
INSERT INTO ehr.lab_obs_2024 (patient_id, observed_on, test_name, value)
SELECT i, date '2024-06-01' + i, 'lead $tag', '1' FROM generate_series(1, 8) i;
INSERT INTO ehr.lab_obs_2025b (patient_id, observed_on, test_name, value, status)
SELECT i, date '2025-08-01' + i, 'iron $tag', 'pending', 'preliminary' FROM generate_series(1, 8) i;
UPDATE ehr.lab_obs_2025 SET value = value || '+' WHERE patient_id % 2 = 0;
UPDATE ehr.lab_obs SET privacy_level = 2 WHERE test_name = 'lead $tag' AND patient_id = 3;
UPDATE ehr.lab_obs_2025b SET status = 'final' WHERE patient_id = 5;
DELETE FROM ehr.lab_obs_2024 WHERE patient_id = 6 AND test_name = 'lead $tag';});
}
write_some('w1');
write_some('w2');
ps_check_settled($node, $db, $portal, 'snapshots with writers on partitions');
write_some('w3');

sub outbox_seq { return one(q{SELECT last_value FROM portal_sync.outbox_seq}) }

# Exactly once: each statement's rows queue one event per row, whichever
# table it names.
ok(ps_wait_drained($node, $db), 'drained before the counted writes');
# (counted in the writing transaction: the worker may send them at once)
sub queued_for_last_obs
{
	my ($sql) = @_;
	return split /\|/, one(qq{BEGIN;
$sql;
SELECT currval('ehr.lab_obs_id'), count(*) FROM portal_sync.outbox
WHERE source_id = (SELECT source_id FROM portal_sync.source WHERE name = 'lab_obs')
  AND currval('ehr.lab_obs_id')::text = ANY (keys);
COMMIT;});
}
my $m1 = ps_nreq($portal);
my ($ka, $na) = queued_for_last_obs(q{INSERT INTO ehr.lab_obs_2025a (patient_id, observed_on, test_name, value) VALUES (1, '2025-03-03', 'once a', '1')});
is($na, 1, 'a write naming a sub-partition queues its row once');
my ($kb, $nb) = queued_for_last_obs(q{INSERT INTO ehr.lab_obs (patient_id, observed_on, test_name, value) VALUES (1, '2025-03-04', 'once b', '1')});
is($nb, 1, 'a write naming the parent queues its row once');
ok(ps_wait_drained($node, $db), 'counted writes: drained');
for my $k ($ka, $kb)
{
	my @e = @{ ps_events($portal->requests(since => $m1, full => 1), source => 'lab_obs', key => $k) };
	is(join(',', map { $_->{op} } @e), 'upsert',
		"row $k (" . ($k == $ka ? 'naming a sub-partition' : 'naming the parent') . ') is sent exactly once');
}

# No-op and unlisted-only updates queue nothing, on any level and format.
ok(ps_wait_drained($node, $db), 'drained');
my $seq0 = outbox_seq();
one(q{UPDATE ehr.lab_obs SET lab_comment = 'SECRET again'});
one(q{UPDATE ehr.lab_obs_2024 SET value = value, status = status});
one(q{UPDATE ehr.lab_obs_2025 SET lab_comment = 'SECRET 2025'});
is(outbox_seq(), $seq0, 'unlisted-only and no-op updates on partitions queue nothing');

# A partition whose capture cannot fire is named by status and explain.
one(q{ALTER TABLE ehr.lab_obs_2024 DISABLE TRIGGER portal_sync_capture_update});
is(one(q{SELECT array_to_string(capture_disabled, ',') FROM portal_sync.status}), 'ehr.lab_obs_2024',
	'status.capture_disabled names a partition whose trigger is disabled');
like(one(q{SELECT detail FROM portal_sync.explain('1') WHERE step = 'capture'}), qr/ehr\.lab_obs_2024/,
	'  and so does explain');
one(q{ALTER TABLE ehr.lab_obs_2024 ENABLE TRIGGER ALL});
is(one(q{SELECT cardinality(capture_disabled) FROM portal_sync.status}), 0, '  enabled again');
like(one(q{SELECT detail FROM portal_sync.explain('3') WHERE step = 'withheld' AND detail LIKE 'lab_obs:%'}),
	qr/^lab_obs: \d+ by date, [1-9]\d* by privacy, [1-9]\d* by share_when$/,
	'explain counts the withheld rows of every partition');

# A partition is detached from portal_sync only with its partitioned
# table, and a table attached on its own cannot become a partition of an
# attached table.
($rc, $out, $err) = $node->psql($db, q{SELECT portal_sync.detach('ehr.lab_obs_2024')});
like($err, qr/"lab_obs_2024" is a partition of the attached table "lab_obs"/,
	'detach() of a partition is refused');
one(q{CREATE TABLE ehr.solo (LIKE ehr.lab_obs INCLUDING DEFAULTS);
ALTER TABLE ehr.solo ADD PRIMARY KEY (obs_id);
CREATE INDEX ON ehr.solo (patient_id);
SELECT portal_sync.attach('ehr.solo', 'clinical', 'patient_id', name => 'solo');});
($rc, $out, $err) = $node->psql($db,
	q{ALTER TABLE ehr.lab_obs ATTACH PARTITION ehr.solo FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')});
like($err, qr/"solo" is attached to portal_sync on its own and cannot become a partition of "lab_obs"/,
	'a table attached on its own cannot become a partition of an attached table');
# Into a partitioned table that is not attached, it stays its own source:
# its rows are not queued again, its writes are captured as before (seen
# in the writing transaction, rolled back).
my $archive = q{CREATE TABLE ehr.archive (LIKE ehr.lab_obs INCLUDING DEFAULTS, UNIQUE (obs_id, observed_on))
	PARTITION BY RANGE (observed_on);
ALTER TABLE ehr.archive ATTACH PARTITION ehr.solo FOR VALUES FROM ('2030-01-01') TO ('2031-01-01');};
is(one(qq{BEGIN;
INSERT INTO ehr.solo (patient_id, observed_on, test_name, value) VALUES (1, '2030-02-02', 'solo 1', '1');
$archive
INSERT INTO ehr.solo (patient_id, observed_on, test_name, value) VALUES (1, '2030-02-03', 'solo 2', '1');
SELECT count(*) FROM portal_sync.outbox
WHERE source_id = (SELECT source_id FROM portal_sync.source WHERE name = 'solo');
ROLLBACK;}), 2,
	'a table attached on its own, attached into a table that is not: its writes queued, its rows not again');
($rc, $out, $err) = $node->psql($db, qq{BEGIN;
$archive
SELECT portal_sync.attach('ehr.archive', 'clinical', 'patient_id', key_col => 'obs_id');
ROLLBACK;});
like($err, qr/partition "solo" of "archive" is attached to portal_sync on its own/,
	'  and its partitioned table cannot be attached while it is');
one(q{SELECT portal_sync.detach('ehr.solo'); DROP TABLE ehr.solo;});

# An UPDATE through the parent that moves a row to another partition is
# one change of that row.
my ($moved) = one(q{SELECT obs_id FROM ehr.lab_obs_2024 WHERE patient_id = 2 AND status = 'final' AND privacy_level <= 1 ORDER BY obs_id LIMIT 1});
my $m2 = ps_nreq($portal);
is(one(qq{BEGIN;
UPDATE ehr.lab_obs SET observed_on = '2025-09-09', value = 'moved' WHERE obs_id = $moved;
SELECT string_agg(op, ',') FROM portal_sync.outbox
WHERE source_id = (SELECT source_id FROM portal_sync.source WHERE name = 'lab_obs')
  AND '$moved' = ANY (keys);
COMMIT;}), 'u', 'an update moving a row across partitions queues one update of it');
is(one(qq{SELECT tableoid::regclass FROM ehr.lab_obs WHERE obs_id = $moved}), 'ehr.lab_obs_2025b',
	'the row moved to another partition');
ok(ps_wait_drained($node, $db), 'cross-partition update: drained');
my @ev = @{ ps_events($portal->requests(since => $m2, full => 1), source => 'lab_obs', key => $moved) };
is(join(',', map { $_->{op} } @ev), 'upsert', 'a cross-partition update is sent once, as an upsert');
is($ev[0] && $ev[0]{data}{observed_on}, '2025-09-09', '  with the new date');

# A partition created after attach() is captured at once, in the same
# transaction.
one(q{BEGIN;
CREATE TABLE ehr.lab_obs_2026 PARTITION OF ehr.lab_obs FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO ehr.lab_obs_2026 (patient_id, observed_on, test_name, value) SELECT i, '2026-02-02', 'new partition', '7' FROM generate_series(1, 8) i;
COMMIT;});

# A table created on its own, in another column order, with rows, and
# then attached as a partition: its rows arrive (for enrolled patients),
# later writes naming it are captured.  The cutoff moves first (and
# resync_all applies it), so that 2023 is shareable.
one(q{UPDATE portal_sync.settings SET date_cutoff = '2023-01-01'});
one(q{SELECT portal_sync.resync_all()});
ps_check_settled($node, $db, $portal, 'cutoff moved');
write_some('w4');
one(q{
CREATE TABLE ehr.lab_obs_2023 (lab_comment text, value text, privacy_level int NOT NULL DEFAULT 0,
	status text NOT NULL DEFAULT 'final', scratch int, test_name text NOT NULL,
	observed_on date NOT NULL, patient_id int NOT NULL,
	obs_id bigint NOT NULL DEFAULT nextval('ehr.lab_obs_id'));
ALTER TABLE ehr.lab_obs_2023 DROP COLUMN scratch;
INSERT INTO ehr.lab_obs_2023 (patient_id, observed_on, test_name, value, lab_comment)
SELECT i, date '2023-05-05', 'archived', '5', 'SECRET old' FROM generate_series(1, 8) i;
ALTER TABLE ehr.lab_obs_2023 ADD PRIMARY KEY (obs_id, observed_on);
ALTER TABLE ehr.lab_obs ATTACH PARTITION ehr.lab_obs_2023 FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
});
write_some('w5');
one(q{INSERT INTO ehr.lab_obs_2023 (patient_id, observed_on, test_name, value) VALUES (2, '2023-06-06', 'named', '9')});
one(q{UPDATE ehr.lab_obs_2023 SET value = '55' WHERE patient_id = 4});
# An enrolling partition in another row format: enroll_when reads the
# partition's own columns.
one(q{CREATE TABLE ehr.booking_2027 (status text NOT NULL DEFAULT 'scheduled', starts_on date NOT NULL,
	patient_id int, booking_id bigint NOT NULL DEFAULT nextval('ehr.booking_id'));
ALTER TABLE ehr.booking ATTACH PARTITION ehr.booking_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
INSERT INTO ehr.booking_2027 (patient_id, starts_on, status) VALUES (8, '2027-02-02', 'cancelled');});
is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id = '8'}), 0,
	'a row of a partition in another row format that does not satisfy enroll_when enrolls nobody');
one(q{INSERT INTO ehr.booking_2027 (patient_id, starts_on) VALUES (7, '2027-03-03')});
is(one(q{SELECT count(*) FROM portal_sync.patients WHERE patient_id = '7'}), 1,
	'  one that satisfies it enrolls its patient');
ps_check_settled($node, $db, $portal, 'partitions created and attached after attach()');
is(one(q{SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'portal\_sync\_capture\_%'
	AND tgrelid IN ('ehr.lab_obs_2023'::regclass, 'ehr.lab_obs_2026'::regclass)}), 8,
	'the new partitions have the capture triggers');
my $p4 = $portal->state->{practices}{postgres}{patients}{4}{items}{lab_obs};
my ($k4) = one(q{SELECT obs_id FROM ehr.lab_obs_2023 WHERE patient_id = 4});
is($p4->{$k4}{value}, '55', 'a row of the attached table, updated by a statement naming it, is on the portal');
is(join(',', sort keys %{ $p4->{$k4} }), 'obs_id,observed_on,status,test_name,value',
	'  with exactly the listed columns, read through the parent');

# Everything sent so far carries the listed columns only.
my @bad;
for my $r (@{ $portal->requests(full => 1) })
{
	for my $e (@{ $r->{events} || [] })
	{
		next unless $e->{source} eq 'lab_obs' && ref $e->{data} eq 'HASH';
		push @bad, "$e->{key}: " . join(',', sort keys %{ $e->{data} })
		  if exists $e->{data}{lab_comment} || grep { defined $_ && /SECRET/ } values %{ $e->{data} };
	}
}
ok(!@bad, 'no event carries an unlisted column') or diag("@bad[0..($#bad > 5 ? 5 : $#bad)]");

# A partitioned insurance table: its rows flow for every patient, enrolled
# or not (7 and 8 are not), also the rows a table brings when it is
# attached as a partition; a dropped partition's rows are sent as deletes,
# as are those a TRUNCATE of the partitioned table removes.
one(q{
CREATE TABLE ehr.coverage (coverage_id bigint NOT NULL, patient_id int NOT NULL,
	valid_from date NOT NULL, payer text, PRIMARY KEY (coverage_id, valid_from))
	PARTITION BY RANGE (valid_from);
CREATE INDEX ON ehr.coverage (patient_id);
CREATE TABLE ehr.coverage_old PARTITION OF ehr.coverage FOR VALUES FROM ('2000-01-01') TO ('2025-01-01');
CREATE TABLE ehr.coverage_new PARTITION OF ehr.coverage FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
SELECT portal_sync.attach('ehr.coverage', 'insurance', 'patient_id', name => 'coverage');
INSERT INTO ehr.coverage SELECT i, i, '2024-01-01', 'Old Payer' FROM generate_series(1, 8) i;
INSERT INTO ehr.coverage_new SELECT 100 + i, i, '2025-01-01', 'New Payer' FROM generate_series(1, 8) i;
CREATE TABLE ehr.coverage_2030 (payer text, valid_from date NOT NULL, patient_id int NOT NULL,
	coverage_id bigint NOT NULL);
INSERT INTO ehr.coverage_2030 SELECT 'Future Payer', '2030-06-01', i, 200 + i FROM generate_series(1, 8) i;
ALTER TABLE ehr.coverage ATTACH PARTITION ehr.coverage_2030 FOR VALUES FROM ('2030-01-01') TO ('2031-01-01');
});
ps_check_settled($node, $db, $portal, 'a partitioned insurance table');
my $p8 = $portal->state->{practices}{postgres}{patients}{8}{items}{coverage} || {};
is(join(',', sort keys %$p8), '108,208,8',
	'a patient not enrolled has the insurance rows of every partition, those of the attached table too');
one(q{DROP TABLE ehr.coverage_old});
ps_check_settled($node, $db, $portal, 'insurance partition dropped');
$p8 = $portal->state->{practices}{postgres}{patients}{8}{items}{coverage} || {};
is(join(',', sort keys %$p8), '108,208', '  its rows were sent as deletes');
one(q{TRUNCATE ehr.coverage});
ps_check_settled($node, $db, $portal, 'insurance partitioned table truncated');
is(scalar(keys %{ $portal->state->{practices}{postgres}{patients}{8}{items}{coverage} || {} }), 0,
	'  every partition\'s rows were sent as deletes');

# DETACH PARTITION: the detached table is no longer captured; the portal
# keeps what it has until a snapshot no longer mentions it.
my ($kd) = one(q{SELECT obs_id FROM ehr.lab_obs_2026 WHERE patient_id = 1});
ok(exists $portal->state->{practices}{postgres}{patients}{1}{items}{lab_obs}{$kd}, 'a row of 2026 is on the portal');
write_some('w6');
one(q{ALTER TABLE ehr.lab_obs DETACH PARTITION ehr.lab_obs_2026});
is(one(q{SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'portal\_sync\_capture\_%'
	AND tgrelid = 'ehr.lab_obs_2026'::regclass}), 0, 'the detached table has no capture triggers');
ok(ps_wait_drained($node, $db), 'detached: drained');
$seq0 = outbox_seq();
($rc, $out, $err) = $node->psql($db, q{UPDATE ehr.lab_obs_2026 SET value = 'after detach'});
is(outbox_seq(), $seq0, 'writes to the detached table queue nothing');
unlike($err, qr/WARNING/, '  and warn of nothing');
ok(exists $portal->state->{practices}{postgres}{patients}{1}{items}{lab_obs}{$kd},
	'the portal keeps the detached rows (as detach() without retract)');
one(q{SELECT portal_sync.resync_all()});
ps_check_settled($node, $db, $portal, 'after DETACH PARTITION and resync_all');
ok(!exists $portal->state->{practices}{postgres}{patients}{1}{items}{lab_obs}{$kd},
	'  the snapshot no longer mentions them');

# DROP of a partition: its rows are gone, the portal is told; the source
# stays attached (the sql_drop event trigger forgets only dropped sources).
my ($kx) = one(q{SELECT obs_id FROM ehr.lab_obs_2025a WHERE patient_id = 1 AND status = 'final' ORDER BY obs_id LIMIT 1});
ok(exists $portal->state->{practices}{postgres}{patients}{1}{items}{lab_obs}{$kx}, 'a row of 2025a is on the portal');
write_some('w7');
one(q{DROP TABLE ehr.lab_obs_2025a});
is(one(q{SELECT count(*) FROM portal_sync.sources WHERE name = 'lab_obs'}), 1, 'dropping a partition keeps the source');
write_some('w8');
ps_check_settled($node, $db, $portal, 'after DROP of a partition');
ok(!exists $portal->state->{practices}{postgres}{patients}{1}{items}{lab_obs}{$kx}, '  its rows left the portal');

# TRUNCATE naming a partition: its rows leave the portal too.  Nothing
# else changes from here on: everything sent since was shareable, as sent.
my $mark = ps_nreq($portal);
one(q{TRUNCATE ehr.lab_obs_2023});
ps_check_settled($node, $db, $portal, 'after TRUNCATE of a partition', since => $mark);

# detach() of the partitioned table removes every partition's triggers.
one(q{SELECT portal_sync.detach('ehr.lab_obs')});
is(one(q{SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'portal\_sync\_capture\_%'
	AND tgrelid::regclass::text LIKE 'ehr.lab_obs%'}), 0, 'detach() drops the triggers of every partition');
# Dropping the partitioned table itself forgets the source, partitions
# and all, like dropping any attached table.
one(q{DROP TABLE ehr.coverage});
is(one(q{SELECT count(*) FROM portal_sync.sources WHERE name = 'coverage'}), 0,
	'dropping the partitioned table forgets its source');
is(one(q{SELECT count(*) FROM portal_sync.sources WHERE name = 'booking'}), 1, '  and no other');
$writer->quit;
$node->stop;
done_testing();
