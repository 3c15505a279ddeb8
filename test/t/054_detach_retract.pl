
# Copyright (c) 2026, portal_sync developers
#
# detach(source, retract => true) (SPEC v2 section 3): a delete for every
# item of that source the portal may hold, then the table is forgotten.
# Without retract the portal keeps what it has.
#
# A writer keeps changing the attached tables while delivery runs and the
# tables are detached.  The first request after a retraction is applied by
# the portal but its answer is lost (held past http_timeout).  Cases:
# a clinical table retracted (enrolled patients' items go), insurance
# retracted (also the patients who are not enrolled), a table dropped right
# after its retraction (the deletes still go), a table re-attached right
# after its retraction (its rows come back), and a plain detach (the portal
# keeps what it had).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('detach_retract', $portal, conf => q{
portal_sync.http_timeout = '1s'
portal_sync.retry_max_delay = '1s'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# Items of one source on the portal, over all patients.
sub portal_count
{
	my ($source) = @_;
	my $pts = $portal->state->{practices}{$db}{patients} || {};
	my $n = 0;
	$n += scalar keys %{ $_->{items}{$source} || {} } for values %$pts;
	return $n;
}

one(q{SELECT pstest.make_patient(i, 2) FROM generate_series(1, 12) i;
	  SELECT pstest.book(i) FROM generate_series(1, 8) i;});
ps_check_settled($node, $db, $portal, 'before');
ok(portal_count('medication') > 0, 'premise: medications are on the portal (' . portal_count('medication') . ')');
ok(portal_count('insurance') > 0, 'premise: insurance is on the portal');
ok(scalar(grep { $_ > 8 } map { $_ + 0 } keys %{ $portal->state->{practices}{$db}{patients} }) > 0,
	'premise: the portal holds insurance of patients who are not enrolled');

# Writers changing attached tables while delivery runs, until told to stop.
sub start_writer
{
	my ($updates) = @_;
	one(q{DROP TABLE IF EXISTS public.writer_stop});
	my $writer = $node->background_psql($db);
	$writer->query_until(qr/writing/, qq{\\echo writing
DO \$\$
BEGIN
	FOR i IN 1 .. 3000 LOOP
		EXIT WHEN pg_catalog.to_regclass('public.writer_stop') IS NOT NULL;
		$updates
		COMMIT;
		PERFORM pg_sleep(0.01);
	END LOOP;
END
\$\$;
});
	return $writer;
}

sub stop_writer
{
	my ($writer) = @_;
	one(q{CREATE TABLE public.writer_stop ()});
	$writer->quit;
}

my $all_tables = q{
		UPDATE ehr.medication SET dose = 'w' || i WHERE patient_id = 1 + i % 8;
		UPDATE ehr.allergy SET reaction = 'w' || i WHERE patient_id = 1 + (i + 3) % 8;
		UPDATE ehr.problem SET description = 'w' || i WHERE patient_id = 1 + (i + 5) % 8;
		UPDATE ehr.insurance SET plan_name = 'w' || i WHERE patient_id = 1 + i % 12;};

# 1. a clinical table retracted while the writer writes; the answer of the
# first request after that is lost (the portal applies it after the
# worker gave up on it)
my $writer = start_writer($all_tables);
sleep 1;
$portal->modes({ mode => 'hang', seconds => 3, apply => JSON::PP::true, count => 1 },
	{ mode => 'ok' });
one(q{SELECT portal_sync.detach('ehr.medication', retract => true)});
sleep 2;
stop_writer($writer);
ps_check_settled($node, $db, $portal, 'medication retracted', resends => 1);
is(portal_count('medication'), 0, 'medication retracted: none of its items is left on the portal');
is(one(q{SELECT count(*) FROM portal_sync.sources WHERE name = 'medication'}), 0,
	'medication retracted: the table is forgotten');

# 2. insurance retracted: every patient's, enrolled or not
$writer = start_writer($all_tables =~ s/UPDATE ehr.medication[^\n]*//r);
sleep 1;
one(q{SELECT portal_sync.detach('ehr.insurance', retract => true)});
sleep 1;
stop_writer($writer);
ps_check_settled($node, $db, $portal, 'insurance retracted', resends => 1);
is(portal_count('insurance'), 0, 'insurance retracted: no insurance left on the portal');

# 3. retracted, then dropped at once: the deletes still go
my $allergies = portal_count('allergy');
ok($allergies > 0, "premise: allergies on the portal ($allergies)");
$writer = start_writer(q{
		UPDATE ehr.problem SET description = 'v' || i WHERE patient_id = 1 + (i + 5) % 8;
		UPDATE ehr.visit_note SET body = 'v' || i WHERE patient_id = 1 + i % 8;});
one(q{SELECT portal_sync.detach('ehr.allergy', retract => true);
	  DROP TABLE ehr.allergy;});
sleep 1;

# 4. retracted, then attached again: refused under the same name while
# its deletes are not all delivered (they would take the new attachment's
# items off the portal); once they are, its rows come back
my $attach_problem = q{SELECT portal_sync.attach('ehr.problem', 'clinical', 'patient_id',
						  date_col => 'noted_on', privacy_col => 'privacy_level',
						  share_when => 'status <> ''entered_in_error''')};
$portal->modes({ mode => 'status', status => 503 });
one(q{SELECT portal_sync.detach('ehr.problem', retract => true)});
my ($ret, $out, $err) = $node->psql($db, "\\set VERBOSITY verbose\n$attach_problem");
like($err, qr/55006.*still being retracted/s, 'attached again while its retraction is delivered: refused (55006)');
$portal->mode({ mode => 'ok' });
ok(ps_wait_until(sub { one(q{SELECT count(*) FROM portal_sync.retraction}) == 0 }, 'retraction over', 60),
	'the retraction of problem is over');
one($attach_problem . q{; SELECT portal_sync.resync_all();});
sleep 1;
stop_writer($writer);
ps_check_settled($node, $db, $portal, 'allergy dropped, problem attached again', resends => 1);
is(portal_count('allergy'), 0, 'allergy retracted and dropped: none of its items is left');
ok(portal_count('problem') > 0, 'problem attached again: its items are back (' . portal_count('problem') . ')');

# 5. a plain detach: the portal keeps what it has
my $notes = portal_count('visit_note');
one(q{SELECT portal_sync.detach('ehr.visit_note')});
one(q{UPDATE ehr.visit_note SET body = 'after detach'});
ok(ps_wait_drained($node, $db), 'plain detach: drained');
is(portal_count('visit_note'), $notes, "plain detach: the portal keeps the items it had ($notes)");

# 6. the chart cannot be retracted while other tables are attached
($ret, $out, $err) = $node->psql($db, "\\set VERBOSITY verbose\nSELECT portal_sync.detach('ehr.patient', retract => true)");
like($err, qr/55000.*cannot be retracted while other tables are attached/s,
	'the chart source is not retracted while other tables are attached (55000)');

is(one(q{SELECT count(*) FROM portal_sync.outbox}), 0, 'nothing is left in the outbox');
is(one(q{SELECT count(*) FROM portal_sync.retraction}), 0, 'every retraction is over and forgotten');
ps_check_portal_invariants($portal, 'after the retractions');

$node->stop;
$portal->stop;
done_testing();
