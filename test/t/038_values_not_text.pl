
# Copyright (c) 2026, portal_sync developers
#
# Defect (issue 11, #9): ids and keys were compared as the text one
# session printed.  Here the EHR's sessions write with DateStyle German
# and TimeZone America/New_York, while the database's defaults (which the
# delivery worker runs with) are DateStyle 'SQL, DMY', TimeZone
# Asia/Kolkata, IntervalStyle sql_standard and extra_float_digits -3.  A
# table keyed by a timestamptz, one keyed by a float and one keyed by an
# interval must each hold on the portal exactly their shareable rows, once,
# with a key that does not depend on who wrote: after inserts, after
# updates, after a snapshot.  Patient columns whose ids cannot be compared
# exactly with the chart's are refused by attach.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('values_not_text', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

my $ehr_session = '-c DateStyle=German -c TimeZone=America/New_York -c IntervalStyle=postgres_verbose'
  . ' -c extra_float_digits=0';
sub as_ehr
{
	local $ENV{PGOPTIONS} = $ehr_session;
	return $node->safe_psql($db, $_[0]);
}

one(q{
	CREATE TABLE ehr.growth_reading (
		measured_at timestamptz PRIMARY KEY,
		patient_id int NOT NULL,
		reading text NOT NULL);
	CREATE INDEX ON ehr.growth_reading (patient_id);
	CREATE TABLE ehr.percentile (
		pct float8 PRIMARY KEY,
		patient_id int NOT NULL,
		label text NOT NULL);
	CREATE INDEX ON ehr.percentile (patient_id);
	CREATE TABLE ehr.dosing_interval (
		every interval PRIMARY KEY,
		patient_id int NOT NULL,
		drug text NOT NULL);
	CREATE INDEX ON ehr.dosing_interval (patient_id);
	SELECT portal_sync.attach('ehr.growth_reading', 'clinical', 'patient_id');
	SELECT portal_sync.attach('ehr.percentile', 'clinical', 'patient_id');
	SELECT portal_sync.attach('ehr.dosing_interval', 'clinical', 'patient_id');
	ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';
	ALTER DATABASE postgres SET TimeZone = 'Asia/Kolkata';
	ALTER DATABASE postgres SET IntervalStyle = 'sql_standard';
	ALTER DATABASE postgres SET extra_float_digits = -3;
});
# the worker runs with the database's new defaults from its next start
$node->restart;

one(q{SELECT pstest.make_patient(i, 1) FROM generate_series(1, 3) i;
	  SELECT pstest.book(i) FROM generate_series(1, 2) i;});
ok(ps_wait_drained($node, $db, 60), 'initial drain');

# Day and month both below 13: a DMY reading of an MDY text is another day.
as_ehr(q{INSERT INTO ehr.growth_reading VALUES
		('2026-03-04 10:00:00+00', 1, 'first'),
		('2026-04-03 23:30:00+00', 1, 'second'),
		('2026-05-06 02:15:30.25+00', 2, 'third');
	INSERT INTO ehr.percentile VALUES (0.1, 1, 'a tenth'), (1.0 / 3, 1, 'a third'), (97.123456789012, 2, 'high');
	INSERT INTO ehr.dosing_interval VALUES ('1 day 2 hours', 1, 'q26h'), ('-3 hours 20 minutes', 2, 'odd');});

sub keys_of
{
	my ($src, $patient) = @_;
	return join(',', sort keys %{ ps_portal_items($portal, $db)->{$patient}{$src} || {} });
}

sub expected_keys
{
	my ($table, $col, $patient) = @_;
	return one(qq{SELECT string_agg(portal_sync.value_text($col), ',' ORDER BY portal_sync.value_text($col) COLLATE "C")
				  FROM ehr.$table WHERE patient_id = $patient});
}

sub check_all
{
	my ($when) = @_;
	ok(ps_wait_drained($node, $db, 60), "$when: drained") or ps_diag_stuck($node, $db);
	for my $case ([ 'growth_reading', 'measured_at' ], [ 'percentile', 'pct' ], [ 'dosing_interval', 'every' ])
	{
		my ($table, $col) = @$case;
		for my $patient (1, 2)
		{
			is(keys_of($table, $patient), expected_keys($table, $col, $patient),
				"$when: $table of patient $patient on the portal, each row once");
		}
	}
	ps_compare_state($node, $db, $portal, $when);
}

check_all('after inserts by an EHR session with other settings');

# The texts are those of fixed settings, whoever prints them.
is(one(q{SELECT portal_sync.value_text(timestamptz '2026-03-04 10:00:00+00')}), '2026-03-04 10:00:00+00',
	'a timestamptz key is written in ISO, in UTC');
is(one(q{SELECT portal_sync.value_text(1.0::float8 / 3)}), '0.3333333333333333',
	'a float key is written exactly (shortest text that reads back the same)');
is(one(q{SELECT portal_sync.value_text(interval '1 day 2 hours')}), 'P1DT2H', 'an interval key is written in ISO 8601');
is(one(q{SELECT portal_sync.value_text(61.00::numeric)}), '61', 'a numeric id is written without trailing zeros');
is(one(q{SELECT portal_sync.value_text('P61'::char(6))}), 'P61', 'a char(n) id is written without its padding');

as_ehr(q{UPDATE ehr.growth_reading SET reading = reading || ' (revised)';
	UPDATE ehr.percentile SET label = label || ' (revised)';
	UPDATE ehr.dosing_interval SET drug = drug || ' (revised)';
	DELETE FROM ehr.growth_reading WHERE reading LIKE 'second%';});
check_all('after updates and a delete by an EHR session with other settings');

my $mark = ps_nreq($portal);
one(q{SELECT portal_sync.resync_patient('1'); SELECT portal_sync.resync_patient('2')});
ok(ps_wait_until(sub { ps_portal_items($portal, $db) && (ps_status($node, $db)->{pending_events} // 1) == 0
			&& ps_nreq($portal) > $mark }, 'resyncs sent', 60), 'resyncs sent');
check_all('after snapshots read by the worker');

# A key moved by an EHR session: the old key goes, the new one comes.
as_ehr(q{UPDATE ehr.growth_reading SET measured_at = measured_at + interval '1 hour' WHERE patient_id = 2});
check_all('after a key changed');

# Patient columns that cannot be compared exactly with the chart's int ids.
for my $case ([ 'numeric(12,2)', 'numeric' ], [ 'text', 'text' ], [ 'uuid', 'uuid' ], [ 'date', 'date' ],
	[ 'bigint', 'bigint' ])
{
	my ($type, $shown) = @$case;
	one(qq{CREATE TABLE ehr.other_ids_$shown (item_id int PRIMARY KEY, patient_id $type)});
	my ($ret, $out, $err) = $node->psql($db,
		qq{SELECT portal_sync.attach('ehr.other_ids_$shown', 'clinical', 'patient_id')});
	isnt($ret, 0, "attach refuses a patient column of type $type against an integer chart");
	like($err, $shown eq 'date' ? qr/cannot identify a patient exactly/ : qr/cannot be compared exactly with the chart/,
		"and says why ($type)");
}
{
	one(q{CREATE TABLE ehr.small_ids (item_id int PRIMARY KEY, patient_id smallint)});
	my ($ret, $out, $err) = $node->psql($db, q{SELECT portal_sync.attach('ehr.small_ids', 'clinical', 'patient_id')});
	is($ret, 0, 'a smallint patient column is accepted against an integer chart') or diag($err);
	one(q{CREATE TABLE ehr.money_keys (price money PRIMARY KEY, patient_id int)});
	($ret, $out, $err) = $node->psql($db, q{SELECT portal_sync.attach('ehr.money_keys', 'clinical', 'patient_id')});
	like($err, qr/money/, 'a money key is refused');
}

$node->stop;
done_testing();
