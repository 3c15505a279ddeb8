
# Copyright (c) 2026, portal_sync developers
#
# The worker keeps its list of attached tables and their prepared
# statements between units (worker_sources.c), until an invalidation says
# it may be stale.  Every change a DBA makes while delivery runs must be
# seen by the next unit: a table attached, a rule changed by attaching
# again, a table detached, the schema renamed, a column added.  A writer
# keeps writing throughout.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('sources_change', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 10) i;
	  SELECT pstest.book(i) FROM generate_series(1, 10) i;});
ps_check_settled($node, $db, $portal, 'before');

my $writer = $node->background_psql($db);
sub write_some
{
	my ($tag) = @_;
	$writer->query_safe(qq{UPDATE ehr.medication SET dose = '$tag ' || med_id WHERE patient_id <= 5});
}

# 1. a table attached while the worker runs
one(q{CREATE TABLE ehr.growth_note (note_id int PRIMARY KEY, patient_id int REFERENCES ehr.patient, body text);
	  SELECT portal_sync.attach('ehr.growth_note', 'clinical', 'patient_id');});
write_some('attached');
one(q{INSERT INTO ehr.growth_note SELECT i, i, 'growth ' || i FROM generate_series(1, 10) i});
ps_check_settled($node, $db, $portal, 'a table attached');
is(scalar keys %{ $portal->state->{practices}{postgres}{patients}{3}{items}{growth_note} || {} }, 1,
	'attached: its rows are on the portal');

# 2. its rule changed by attaching it again (and resync_all to apply it)
one(q{SELECT portal_sync.attach('ehr.growth_note', 'clinical', 'patient_id', share_when => 'note_id % 2 = 0');
	  SELECT portal_sync.resync_all();});
write_some('rule');
one(q{UPDATE ehr.growth_note SET body = body || ' again'});
ps_check_settled($node, $db, $portal, 'a rule changed');
is(scalar keys %{ $portal->state->{practices}{postgres}{patients}{3}{items}{growth_note} || {} }, 0,
	'rule changed: a row it withholds is off the portal');

# 3. a column added: the data sent carries it
one(q{ALTER TABLE ehr.growth_note ADD COLUMN percentile int DEFAULT 50});
one(q{UPDATE ehr.growth_note SET body = body || ' with a column'});
write_some('column');
ps_check_settled($node, $db, $portal, 'a column added');
my $item = $portal->state->{practices}{postgres}{patients}{4}{items}{growth_note}{4};
is($item && $item->{percentile}, 50, 'column added: the data carries it');

# 4. the schema renamed: the statements name it again
one(q{ALTER SCHEMA ehr RENAME TO ehr_renamed});
$writer->query_safe(q{UPDATE ehr_renamed.medication SET dose = 'renamed ' || med_id WHERE patient_id <= 5});
ok(ps_wait_drained($node, $db), 'schema renamed: drained');
my $dose = one(q{SELECT dose FROM ehr_renamed.medication WHERE patient_id = 2 ORDER BY med_id LIMIT 1});
my $key = one(q{SELECT med_id FROM ehr_renamed.medication WHERE patient_id = 2 ORDER BY med_id LIMIT 1});
is($portal->state->{practices}{postgres}{patients}{2}{items}{medication}{$key}{dose}, $dose,
	'schema renamed: the change is delivered');
one(q{ALTER SCHEMA ehr_renamed RENAME TO ehr});
is(ps_status($node, $db)->{dead_letters}, 0, 'schema renamed: nothing dead-lettered');

# 5. detached: its changes stop flowing, the rest flows
my $mark = ps_nreq($portal);
one(q{SELECT portal_sync.detach('ehr.growth_note')});
one(q{UPDATE ehr.growth_note SET body = 'after detach'});
write_some('detached');
ok(ps_wait_drained($node, $db), 'detached: drained');
my $reqs = $portal->requests(since => $mark);
ok(!grep({ ($_->{source} // '') eq 'growth_note' } map { @{ $_->{events} } } @$reqs),
	'detached: nothing of it is sent');
ok(scalar(grep { ($_->{source} // '') eq 'medication' } map { @{ $_->{events} } } @$reqs),
	'detached: the other tables flow');

$writer->quit;
$node->stop;
$portal->stop;
done_testing();
