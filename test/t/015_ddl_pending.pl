
# Copyright (c) 2026, portal_sync developers
#
# What a DBA does to an attached table while events are pending (delivery
# paused by the portal being down): add a column (with a default), rename
# an unrelated column, rename columns attach() uses (the privacy column,
# the date column, a column share_when reads), drop an unrelated column.
# attach() protects the columns it uses: dropping one without CASCADE
# fails.  Pending events are then delivered with the row as it is at send
# time (new names, no dropped column), the rules still apply through the
# renamed columns, nothing is lost, nothing withheld is received.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('ddl', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 10) i;
	  SELECT pstest.book(i) FROM generate_series(1, 8) i;});
ok(ps_wait_drained($node, $db), 'initial drain');

my $mark = ps_nreq($portal);
$portal->down;
# Pending changes before the DDL.
one(q{UPDATE ehr.medication SET dose = 'before ddl' WHERE patient_id <= 5;
	  INSERT INTO ehr.medication (patient_id, drug_name, rxnorm, start_date, status) VALUES (1, 'pending 1', 'RX1', '2025-01-01', 'active');
	  UPDATE ehr.medication SET privacy_level = 2 WHERE patient_id = 2;});
ok(ps_status($node, $db)->{pending_events} > 0, 'events pending');

my ($ret, $out, $err) = $node->psql($db, 'ALTER TABLE ehr.medication DROP COLUMN privacy_level');
isnt($ret, 0, 'dropping a column attach() uses needs CASCADE');
like($err, qr/depend|CASCADE/i, '  (says what depends on it)');
($ret, $out, $err) = $node->psql($db, 'ALTER TABLE ehr.medication DROP COLUMN status');
isnt($ret, 0, 'dropping the column share_when reads needs CASCADE');

($ret, $out, $err) = $node->psql($db, q{
ALTER TABLE ehr.medication ADD COLUMN pharmacy text NOT NULL DEFAULT 'Main St';
ALTER TABLE ehr.medication RENAME COLUMN frequency TO sig;
ALTER TABLE ehr.medication RENAME COLUMN privacy_level TO confidentiality;
ALTER TABLE ehr.medication RENAME COLUMN start_date TO started_on;
ALTER TABLE ehr.medication RENAME COLUMN status TO med_status;
ALTER TABLE ehr.medication DROP COLUMN rxnorm;
ALTER TABLE ehr.medication ALTER COLUMN dose TYPE varchar(200);
});
is($ret, 0, 'add, rename (unrelated and used), drop unrelated, retype: accepted') or diag($err);
my $src = ps_sql_row($node, $db, q{SELECT * FROM portal_sync.sources WHERE name = 'medication'});
is($src->{privacy_col}, 'confidentiality', 'sources shows the renamed privacy column');
is($src->{date_col}, 'started_on', 'sources shows the renamed date column');
like($src->{share_when} // '', qr/med_status/, 'share_when shows the renamed column');

# More changes after the DDL, through the renamed columns: a row made
# private, one moved before the cutoff, one entered in error, one new.
one(q{UPDATE portal_sync.settings SET date_cutoff = '2023-01-01';
	  SELECT portal_sync.resync_all();});
one(q{BEGIN;
	UPDATE ehr.medication SET confidentiality = 3 WHERE patient_id = 3;
	UPDATE ehr.medication SET started_on = '2020-01-01' WHERE patient_id = 4;
	UPDATE ehr.medication SET med_status = 'entered_in_error' WHERE patient_id = 5;
	UPDATE ehr.medication SET confidentiality = 0 WHERE patient_id = 2;
	INSERT INTO ehr.medication (patient_id, drug_name, sig, pharmacy, started_on) VALUES (6, 'after ddl', 'QD', 'Elm St', '2025-02-02');
	COMMIT;});
$portal->up;
ps_check_settled($node, $db, $portal, 'after DDL with pending events', since => $mark);
my $reqs = $portal->requests(since => $mark, full => 1);
my @meds = grep { ($_->{source} // '') eq 'medication' && $_->{op} eq 'upsert' } map { @{ $_->{events} } } @$reqs;
ok(@meds, 'medication upserts sent after the DDL');
ok(!grep({ exists $_->{data}{rxnorm} || exists $_->{data}{frequency} || exists $_->{data}{privacy_level} } @meds),
	'no dropped or old column names in the data sent');
ok(!grep({ !exists $_->{data}{pharmacy} || !exists $_->{data}{sig} || !exists $_->{data}{confidentiality} } @meds),
	'new and renamed columns in the data sent');

# Detach/re-attach by the DBA after the renames keeps working too.
$mark = ps_nreq($portal);
one(q{SELECT portal_sync.attach('ehr.medication', 'clinical', 'patient_id', date_col => 'started_on',
		privacy_col => 'confidentiality', share_when => 'med_status <> ''entered_in_error''');
	  UPDATE ehr.medication SET dose = 'after re-attach' WHERE patient_id IN (1, 2, 3);});
ps_check_settled($node, $db, $portal, 're-attached after the renames', since => $mark);

$node->stop;
$portal->stop;
done_testing();
