
# Copyright (c) 2026, portal_sync developers
#
# Minimum-necessary columns (attach(..., columns => ...)) and no-op
# updates.  The chart and the medication list hold an SSN, staff comments
# and a confidential flag the portal must never receive: attached with a
# columns list, no event of any request (snapshots and incremental upserts
# alike) carries a column the list leaves out, while the listed ones arrive
# with the row's values.  An UPDATE that changes only unlisted columns
# (last_viewed_at on every chart open), or no value at all (SET x = x,
# also with every column sent), queues nothing; an UPDATE of a listed
# column, or of a column only a rule reads, sends as before.  The list may
# be replaced and a listed column renamed while the worker runs.  Writers
# keep writing while delivery runs.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('columns', $portal);
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# The secrets, and how they are spelled in the database: every value of
# them starts with a marker no listed column ever holds.
one(q{
ALTER TABLE ehr.patient ADD COLUMN ssn text, ADD COLUMN last_viewed_at timestamptz;
ALTER TABLE ehr.medication ADD COLUMN staff_comment text,
	ADD COLUMN confidential boolean NOT NULL DEFAULT false;
SELECT portal_sync.attach('ehr.patient', 'patient', 'patient_id',
	privacy_col => 'privacy_level',
	columns => '{patient_id, first_name, last_name, preferred_name, dob, sex, primary_provider}');
SELECT portal_sync.attach('ehr.medication', 'clinical', 'patient_id',
	date_col => 'start_date', privacy_col => 'privacy_level',
	share_when => 'status <> ''entered_in_error'' AND NOT confidential',
	columns => '{med_id, drug_name, dose, route, frequency, start_date, status}');
-- enroll_when reads finalized, which is not sent
SELECT portal_sync.attach('ehr.visit_note', 'note', 'patient_id',
	date_col => 'visit_date', privacy_col => 'privacy_level',
	share_when => 'finalized',
	enroll_when => 'finalized AND note_type IN (''encounter'', ''well_visit'')',
	columns => '{note_id, provider, note_type, visit_date, body}');
});
is(one(q{SELECT columns FROM portal_sync.sources WHERE name = 'medication'}),
	'{med_id,drug_name,dose,route,frequency,start_date,status}', 'sources shows the list');

my %listed = (
	patient => [qw(patient_id first_name last_name preferred_name dob sex primary_provider)],
	medication => [qw(med_id drug_name dose route frequency start_date status)],
	visit_note => [qw(note_id provider note_type visit_date body)]);

one(q{SELECT pstest.make_patient(i, 3) FROM generate_series(1, 12) i;
	  UPDATE ehr.patient SET ssn = 'SECRET-SSN-' || patient_id, guardian_phone = 'SECRET-PHONE';
	  UPDATE ehr.medication SET staff_comment = 'SECRET-COMMENT ' || med_id;
	  SELECT pstest.book(i) FROM generate_series(1, 10) i;});

# Writers change listed and unlisted columns while the snapshots go.
my $writer = $node->background_psql($db);
sub write_some
{
	my ($tag) = @_;
	$writer->query_safe(qq{
UPDATE ehr.medication SET dose = '$tag ' || med_id, staff_comment = 'SECRET-$tag'
WHERE patient_id <= 6;
UPDATE ehr.patient SET ssn = 'SECRET-SSN-$tag', last_viewed_at = clock_timestamp(),
	preferred_name = '$tag'
WHERE patient_id % 2 = 0;
INSERT INTO ehr.medication (patient_id, drug_name, dose, start_date, staff_comment)
SELECT i, 'cetirizine $tag', '5 mg', date '2025-01-01', 'SECRET-new' FROM generate_series(1, 12) i;});
}
write_some('w1');
write_some('w2');
ps_check_settled($node, $db, $portal, 'snapshots with writers');
write_some('w3');
ps_check_settled($node, $db, $portal, 'incremental with writers');

# Every event of every request so far: listed columns only.
sub check_requests
{
	my ($name, $since, $lists) = @_;
	my (@bad, $n);
	for my $r (@{ $portal->requests(since => $since, full => 1) })
	{
		for my $ev (@{ $r->{events} || [] })
		{
			next unless ref $ev->{data} eq 'HASH';
			my $list = $lists->{ $ev->{source} } or next;
			my %ok = map { $_ => 1 } @$list;
			$n++;
			my @extra = grep { !$ok{$_} } sort keys %{ $ev->{data} };
			push @bad, "request $r->{n}: $ev->{source}/$ev->{key} carries @extra" if @extra;
			push @bad, "request $r->{n}: $ev->{source}/$ev->{key} carries a secret value"
			  if grep { defined $_ && !ref $_ && /SECRET/ } values %{ $ev->{data} };
		}
	}
	ok(!@bad, "$name: no event carries a column the list leaves out (" . ($n // 0) . ' checked)')
	  or diag(join('; ', @bad[ 0 .. ($#bad > 10 ? 10 : $#bad) ]));
	return;
}
check_requests('snapshots and upserts', 0, \%listed);

# Both kinds of event were seen: snapshot items and incremental upserts.
my $reqs = $portal->requests(full => 1);
my @snap = grep { $_->{op} eq 'snapshot_begin' } map { @{ $_->{events} } } @$reqs;
ok(scalar @snap >= 10, 'snapshots were sent (' . scalar(@snap) . ')');
my $p2 = $portal->state->{practices}{postgres}{patients}{2}{items};
is($p2->{patient}{2}{preferred_name}, 'w3', 'a listed column arrives with its value (chart)');
ok(!exists $p2->{patient}{2}{ssn}, 'the SSN is not on the portal');
my ($k2) = one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 2 ORDER BY med_id LIMIT 1});
is($p2->{medication}{$k2}{dose}, "w3 $k2", 'a listed column arrives with its value (medication)');
is(join(',', sort keys %{ $p2->{medication}{$k2} }), join(',', sort @{ $listed{medication} }),
	'the portal holds exactly the listed columns');

# No-op and unlisted-only updates queue nothing.  The outbox sequence
# counts every event queued; the requests after a marker change, once it
# is delivered, show what was sent.
sub outbox_seq { return one(q{SELECT last_value FROM portal_sync.outbox_seq}) }
my $seq0 = outbox_seq();
my $mark = ps_nreq($portal);
one(q{UPDATE ehr.patient SET last_viewed_at = clock_timestamp()});
one(q{UPDATE ehr.patient SET ssn = ssn || '-x', guardian_phone = 'SECRET-2'});
one(q{UPDATE ehr.medication SET staff_comment = 'SECRET-noop'});
one(q{UPDATE ehr.medication SET dose = dose, status = status});
one(q{UPDATE ehr.visit_note SET body = body});
# every column sent (allergy has no list): SET x = x is no change either
one(q{UPDATE ehr.allergy SET reaction = reaction, severity = severity});
one(q{UPDATE ehr.insurance SET payer = payer});
is(outbox_seq(), $seq0, 'unlisted-only and no-op updates queue nothing');
is(ps_status($node, $db)->{pending_events}, 0, '  (nothing pending)');
one(q{UPDATE ehr.allergy SET reaction = 'marker' WHERE patient_id = 3});
ok(ps_wait_drained($node, $db), 'marker delivered');
my @sent = grep { $_->{op} ne 'snapshot_begin' && $_->{op} ne 'snapshot_end' }
  map { @{ $_->{events} } } @{ $portal->requests(since => $mark) };
is(join(' ', sort map { "$_->{source}/$_->{patient_id}" } @sent),
	join(' ', ('allergy/3') x 3), 'only the marker was sent');

# What must send: a listed column; a column only share_when reads (the
# privacy-like flag: a delete, then the row again); a column only
# enroll_when reads (enrollment of patient 11 by finalizing a note).
$mark = ps_nreq($portal);
my ($k4) = one(q{SELECT med_id FROM ehr.medication WHERE patient_id = 4 ORDER BY med_id LIMIT 1});
one(qq{UPDATE ehr.medication SET route = 'nasal' WHERE med_id = $k4});
ok(ps_wait_drained($node, $db), 'listed column: drained');
my @ev = @{ ps_events($portal->requests(since => $mark, full => 1), source => 'medication', key => $k4) };
is(join(',', map { $_->{op} } @ev), 'upsert', 'a listed column change is sent');
is($ev[0] && $ev[0]{data}{route}, 'nasal', '  with its value');

$mark = ps_nreq($portal);
one(qq{UPDATE ehr.medication SET confidential = true WHERE med_id = $k4});
ok(ps_wait_drained($node, $db), 'rule column: drained');
@ev = @{ ps_events($portal->requests(since => $mark, full => 1), source => 'medication', key => $k4) };
is(join(',', map { $_->{op} } @ev), 'delete', 'an unlisted column share_when reads: withheld row deleted');
ok(!exists $portal->state->{practices}{postgres}{patients}{4}{items}{medication}{$k4},
	'  and off the portal');
$mark = ps_nreq($portal);
one(qq{UPDATE ehr.medication SET confidential = false WHERE med_id = $k4});
ok(ps_wait_drained($node, $db), 'rule column back: drained');
@ev = @{ ps_events($portal->requests(since => $mark, full => 1), source => 'medication', key => $k4) };
is(join(',', map { $_->{op} } @ev), 'upsert', '  shareable again: sent again');
ok($ev[0] && !exists $ev[0]{data}{confidential}, '  without the flag');

is(one(q{SELECT portal_sync.is_ready('11')}), 'f', 'patient 11 not enrolled yet');
one(q{UPDATE ehr.visit_note SET finalized = true, finalized_at = now() WHERE patient_id = 11});
is(one(q{SELECT portal_sync.wait_ready('11', '60s')}), 't',
	'finalizing a note (a column only enroll_when reads) enrolls the patient');
ps_check_settled($node, $db, $portal, 'after the rules', since => $mark);

# Re-attach with another list while the worker runs and the writer
# writes; resync_all re-sends what the portal holds under the new list.
my $reattach = ps_nreq($portal);
write_some('w4');
one(q{SELECT portal_sync.attach('ehr.medication', 'clinical', 'patient_id',
	date_col => 'start_date', privacy_col => 'privacy_level',
	share_when => 'status <> ''entered_in_error'' AND NOT confidential',
	columns => '{med_id, drug_name, dose}')});
write_some('w5');
one(q{SELECT portal_sync.resync_all()});
write_some('w6');
ps_check_settled($node, $db, $portal, 'list replaced');
$listed{medication} = [qw(med_id drug_name dose)];
my %before = (%listed, medication => [qw(med_id drug_name dose route frequency start_date status)]);
check_requests('list replaced', 0, \%before);
is(join(',', sort keys %{ $portal->state->{practices}{postgres}{patients}{2}{items}{medication}{$k2} }),
	'dose,drug_name,med_id', 'list replaced: the portal holds the new list');
# the old list's columns now count as unlisted: an update of one of them
# alone queues nothing
$seq0 = outbox_seq();
one(q{UPDATE ehr.medication SET route = 'oral', frequency = 'TID'});
is(outbox_seq(), $seq0, 'list replaced: a column taken off the list no longer sends');

# Rename a listed column: the list follows it, the data names it anew.
one(q{ALTER TABLE ehr.medication RENAME COLUMN dose TO dosage});
is(one(q{SELECT columns FROM portal_sync.sources WHERE name = 'medication'}),
	'{med_id,drug_name,dosage}', 'renamed: sources shows the new name');
my ($ret, $out, $err) = $node->psql($db, q{ALTER TABLE ehr.medication DROP COLUMN drug_name});
isnt($ret, 0, 'a listed column cannot be dropped while attached');
like($err, qr/depends on column/, '  (says what depends on it)');
$mark = ps_nreq($portal);
$writer->query_safe(q{UPDATE ehr.medication SET dosage = 'renamed ' || med_id WHERE patient_id <= 6});
one(q{SELECT portal_sync.resync_all()});
$listed{medication} = [qw(med_id drug_name dosage)];
ps_check_settled($node, $db, $portal, 'renamed', since => $mark);
check_requests('renamed', $mark, \%listed);
is($portal->state->{practices}{postgres}{patients}{2}{items}{medication}{$k2}{dosage}, "renamed $k2",
	'renamed: the value arrives under the new name');

check_requests('whole run', 0, { %before, medication => [ @{ $before{medication} }, 'dosage' ] });

$writer->quit;
$node->stop;
$portal->stop;
done_testing();
