
# Copyright (c) 2026, portal_sync developers
#
# Randomized privacy property test (SPEC 4, 5).  Many patients; between
# sends, rows change at random: privacy levels, clinical dates, the columns
# share_when reads (status, finalized), content, inserts and deletes, chart
# privacy, charts deleted and re-created, new initiating events; the
# practice's settings (max_privacy_level, date_cutoff) change and
# resync_all() runs; the portal fails at random in some rounds.
#
# The test controls time: delivery is paused (settings.enabled = false),
# the round's EHR transaction and the administrator's (settings,
# resync_all) commit, delivery resumes, and the test waits until the outbox
# is drained.  Nothing changes while the worker
# sends, so the database as it is after the round is the state at send
# time: every upsert the portal received in the round (whatever it
# answered) must be of an item shareable in it and carry that row
# (ps_check_sent_shareable), and the portal must then hold exactly the
# shareable state (unless settings changed without a resync_all yet:
# SPEC 4 "Changing settings affects what is sent from then on").
#
# PS_RANDOM_SEED reproduces a run (printed); PS_RANDOM_ROUNDS sets the
# number of rounds (default 16).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $seed = ($ENV{PS_RANDOM_SEED} // '') =~ /^\d+$/ ? $ENV{PS_RANDOM_SEED} : (time() % 100000);
my $rounds = $ENV{PS_RANDOM_ROUNDS} || 16;
diag("PS_RANDOM_SEED=$seed PS_RANDOM_ROUNDS=$rounds");
srand($seed);

my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('privacy_random', $portal, conf => q{
portal_sync.batch_size = 40
portal_sync.resync_rate = 200
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

# Charts may be deleted while their rows remain (SPEC 4: a patient without
# a chart row counts as restricted).
one(q{
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

my $NP = 40;
one(qq{SELECT pstest.make_patient(i, 2, CASE WHEN i % 7 = 0 THEN 2 ELSE 0 END) FROM generate_series(1, $NP) i;
	   SELECT pstest.book(i) FROM generate_series(1, 15) i;});
ok(ps_wait_drained($node, $db), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');

# A random date expression between 2022 and 2026 (noon: no time zone edge).
sub rdate { return sprintf("(date '2022-01-01' + %d)", int(rand(1600))) }
sub rpriv { my $r = rand(); return $r < 0.5 ? 0 : $r < 0.7 ? 1 : $r < 0.85 ? 2 : int(rand(5)) }
sub pick  { return $_[ int(rand(@_)) ] }
sub rpat  { return 1 + int(rand($NP)) }
sub some  { my ($t, $k, $n) = @_; return "$k IN (SELECT $k FROM ehr.$t ORDER BY random() LIMIT $n)" }

# Per source: key, date column (and whether a timestamp), a share_when
# change, a content change and an insert.
my %src = (
	medication => { key => 'med_id', date => 'start_date',
		share => sub { "status = " . pick(q{'active'}, q{'completed'}, q{'entered_in_error'}) },
		content => sub { "dose = '" . int(rand(1000)) . " mg'" },
		insert => sub { sprintf(q{INSERT INTO ehr.medication (patient_id, drug_name, dose, start_date, status, privacy_level) VALUES (%d, 'drug %d', '5 mg', %s, %s, %d)},
			rpat(), int(rand(1e6)), rdate(), pick(q{'active'}, q{'entered_in_error'}), rpriv()) } },
	allergy => { key => 'allergy_id', date => 'recorded_at',
		share => sub { "status = " . pick(q{'active'}, q{'resolved'}, q{'entered_in_error'}) },
		content => sub { "reaction = 'reaction " . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.allergy (patient_id, allergen, recorded_at, status, privacy_level) VALUES (%d, 'allergen %d', %s, %s, %d)},
			rpat(), int(rand(1e6)), rdate(), pick(q{'active'}, q{'entered_in_error'}), rpriv()) } },
	problem => { key => 'problem_id', date => 'noted_on',
		share => sub { "status = " . pick(q{'active'}, q{'resolved'}, q{'entered_in_error'}) },
		content => sub { "description = 'problem " . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.problem (patient_id, description, noted_on, status, privacy_level) VALUES (%d, 'problem %d', %s, %s, %d)},
			rpat(), int(rand(1e6)), rdate(), pick(q{'active'}, q{'entered_in_error'}), rpriv()) } },
	immunization => { key => 'imm_id', date => 'administered_on',
		content => sub { "lot_number = 'LOT" . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.immunization (patient_id, vaccine, administered_on, privacy_level) VALUES (%d, 'MMR', %s, %d)},
			rpat(), rdate(), rpriv()) } },
	vital_sign => { key => 'vital_id', date => 'measured_at', ts => 1,
		content => sub { "pulse = " . (60 + int(rand(80))) . ", weight_kg = " . sprintf('%.3f', 10 + rand(40)) },
		insert => sub { sprintf(q{INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse, privacy_level) VALUES (%d, %s + time '12:00', %d, %d)},
			rpat(), rdate(), 60 + int(rand(80)), rpriv()) } },
	lab_result => { key => 'result_id', date => 'result_date',
		share => sub { "status = " . pick(q{'preliminary'}, q{'final'}, q{'corrected'}, q{'cancelled'}) },
		content => sub { "value = '" . int(rand(100)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.lab_result (patient_id, test_name, value, status, result_date, privacy_level) VALUES (%d, 'CBC', '%d', %s, %s, %d)},
			rpat(), int(rand(100)), pick(q{'preliminary'}, q{'final'}), rdate(), rpriv()) } },
	visit_note => { key => 'note_id', date => 'visit_date',
		share => sub { "finalized = " . pick('true', 'false') },
		content => sub { "body = 'note body " . int(rand(1e6)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.visit_note (patient_id, provider, note_type, visit_date, finalized, privacy_level) VALUES (%d, 'Dr. R', %s, %s, %s, %d)},
			rpat(), pick(q{'encounter'}, q{'phone'}, q{'well_visit'}), rdate(), pick('true', 'false'), rpriv()) } },
	appointment => { key => 'appt_id', date => 'starts_at', ts => 1,
		content => sub { "reason = 'reason " . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.appointment (patient_id, provider, starts_at, privacy_level) VALUES (%d, 'Dr. R', %s + time '12:00', %d)},
			rpat(), rdate(), rpriv()) } },
	ccda_document => { key => 'doc_id', date => 'created_at', ts => 1,
		content => sub { "document = '<ClinicalDocument n=\"" . int(rand(1e6)) . "\"/>'" },
		insert => sub { sprintf(q{INSERT INTO ehr.ccda_document (patient_id, created_at, privacy_level, document) VALUES (%d, %s + time '12:00', %d, '<ClinicalDocument/>')},
			rpat(), rdate(), rpriv()) } },
	insurance => {
		key => 'ins_id',
		content => sub { "plan_name = 'plan " . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (%d, 'Payer', 'M%d')}, rpat(), int(rand(1e6))) } },
);
my @tables = sort keys %src;

sub random_change
{
	my $t = pick(@tables);
	my $s = $src{$t};
	my $k = $s->{key};
	my $r = rand();
	my $n = 1 + int(rand(4));
	if ($r < 0.25 && $t ne 'insurance')
	{
		return "UPDATE ehr.$t SET privacy_level = " . rpriv() . ' WHERE ' . some($t, $k, $n);
	}
	if ($r < 0.4 && $s->{date})
	{
		my $d = rdate() . ($s->{ts} ? " + time '12:00'" : '');
		return "UPDATE ehr.$t SET $s->{date} = $d WHERE " . some($t, $k, $n);
	}
	if ($r < 0.55 && $s->{share})
	{
		return "UPDATE ehr.$t SET " . $s->{share}->() . ' WHERE ' . some($t, $k, $n);
	}
	if ($r < 0.7)
	{
		return "UPDATE ehr.$t SET " . $s->{content}->() . ' WHERE ' . some($t, $k, $n);
	}
	if ($r < 0.88)
	{
		return $s->{insert}->();
	}
	return "DELETE FROM ehr.$t WHERE " . some($t, $k, 1);
}

sub chart_change
{
	my $r = rand();
	my $p = rpat();
	if ($r < 0.6)
	{
		my $lvl = rand() < 0.6 ? 0 : int(rand(5));
		return "UPDATE ehr.patient SET privacy_level = $lvl WHERE patient_id = $p";
	}
	if ($r < 0.75)
	{
		return "DELETE FROM ehr.patient WHERE patient_id = $p";
	}
	if ($r < 0.9)
	{
		return qq{INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, privacy_level)
			SELECT i, 'MRN' || i, 'First' || i, 'Again', date '2015-05-05', 0
			FROM generate_series(1, $NP) i WHERE NOT EXISTS (SELECT 1 FROM ehr.patient p WHERE p.patient_id = i)
			ORDER BY random() LIMIT 1};
	}
	return "UPDATE ehr.patient SET guardian_phone = '555-" . int(rand(10000)) . "' WHERE patient_id = $p";
}

# Every round's statements and portal mode are drawn first, so that the
# seed alone reproduces them (the checks call rand() too).
my @plans;
{
	my $stale = 0;
	for my $round (1 .. $rounds)
	{
		my @sql = ('BEGIN', 'SELECT setseed(' . sprintf('%.6f', rand() * 2 - 1) . ')');
		push @sql, random_change() for 1 .. 5 + int(rand(20));
		push @sql, chart_change() for 1 .. int(rand(3));
		push @sql, 'SELECT pstest.book(' . rpat() . ')' if rand() < 0.3;
		push @sql, 'COMMIT';
		# The administrator's changes: their own transaction (019 covers
		# resync_all() in the EHR's transaction).
		my @admin;
		if (rand() < 0.3)
		{
			my $cut = rand() < 0.4 ? 'NULL' : rdate();
			push @admin, 'UPDATE portal_sync.settings SET max_privacy_level = ' . int(rand(4))
			  . ", date_cutoff = $cut";
			$stale = 1;
		}
		if ($stale && rand() < 0.6 || rand() < 0.1)
		{
			push @admin, 'SELECT portal_sync.resync_all()';
			$stale = 0;
		}
		push @sql, @admin;
		my $m = rand();
		my $mode = $m < 0.55 ? { mode => 'ok' }
		  : $m < 0.85 ? { mode => 'random_fail', rate => 0.3, status => 500, seed => $seed + $round }
		  : { mode => 'status', status => 429, retry_after => '1', count => 1 };
		push @plans, { sql => \@sql, mode => $mode, stale => $stale };
	}
}

my %modes_used;
for my $round (1 .. $rounds)
{
	my ($sqlr, $mode, $stale) = @{ $plans[ $round - 1 ] }{qw(sql mode stale)};
	my @sql = @$sqlr;
	$modes_used{ $mode->{mode} }++;
	$portal->mode($mode);

	my $mark = ps_nreq($portal);
	# Delivery paused while the round's transactions commit, so that nothing
	# is sent from an intermediate state.
	one('UPDATE portal_sync.settings SET enabled = false');
	my ($ret, $out, $err) = $node->psql($db, join(";\n", @sql, 'UPDATE portal_sync.settings SET enabled = true') . ";\n", on_error_stop => 1);
	if ($ret != 0)
	{
		fail("round $round: the EHR's transaction failed");
		diag("$err\n" . join(";\n", @sql));
		next;
	}
	note("round $round statements:\n" . join(";\n", @sql));
	my $name = "round $round" . ($stale ? ' (settings changed, no resync yet)' : '');
	unless (ok(ps_wait_drained($node, $db, 120), "$name: drained"))
	{
		ps_diag_stuck($node, $db);
		last;
	}
	ps_check_sent_shareable($node, $db, $portal, $mark, $name);
	ps_compare_state($node, $db, $portal, $name) unless $stale;
}
note('portal modes used: ' . join(', ', map { "$_ x$modes_used{$_}" } sort keys %modes_used));

# The end: settings re-applied to everything.
$portal->mode({ mode => 'ok' });
my $mark = ps_nreq($portal);
one('SELECT portal_sync.resync_all()');
ps_check_settled($node, $db, $portal, 'after the last resync_all', since => $mark);
my $st = $portal->state;
ok($st->{applied_event_ids} > 500, "a real workload ($st->{applied_event_ids} events applied, $st->{requests} requests)");

$node->stop;
$portal->stop;
done_testing();
