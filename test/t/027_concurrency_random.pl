
# Copyright (c) 2026, portal_sync developers
#
# Randomized concurrency property test (SPEC 4, 5).  Delivery is never
# paused: while the worker sends, several writer sessions change rows,
# privacy levels, dates, share_when columns and charts of shared patients,
# enroll new ones (appointments, notes, C-CDA documents), ask for resyncs,
# keep transactions open (writing or read-only) for a while, and use
# PREPARE TRANSACTION with a later COMMIT PREPARED or ROLLBACK PREPARED.
# Meanwhile the portal's answer rules change every few seconds: accept,
# fail at random (500), or hang past http_timeout and then apply the batch
# (portal.py applies after its sleep, so the sleep is only 0.1 s longer
# than http_timeout: the batch is applied about when the worker gives up,
# before any retry could reach the portal).
#
# During the run, some rows can never be shareable (sentinels: medications
# and lab results named SENTINEL with privacy 4, whose privacy, dates and
# status never change but whose content does; and enrolled patients whose
# chart stays restricted, whose rows change): the portal must never
# receive an upsert of any of them, whatever it answered.
#
# At the end (everything committed or rolled back, portal accepting,
# drained): the portal holds exactly the shareable state with every row as
# it is (nothing lost, no older content kept by a dedupe), its per-patient
# invariants hold (seq order, C-CDA after the snapshot, nothing after a
# purge, well-formed snapshots, protocol), no later event of a patient was
# sent while an earlier one was unaccepted, and each event_id was applied
# once.  Then one quiet resync_all(): everything it sent was shareable.
#
# ps_check_event_ids_stable is used in its SPEC v2 form (an event_id always
# carries the same content, a batch_id the same body); its v1 form (one
# event_id per (seq, op, source, key)) must not be.  ps_check_sent_shareable
# is used only for the quiet resync_all at the end: it assumes the database
# did not change while the requests were sent.
#
# PS_RANDOM_SEED reproduces the random choices (not the timing; printed);
# PS_RANDOM_SECONDS sets the duration of the writing phase (default 60).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $seed = ($ENV{PS_RANDOM_SEED} // '') =~ /^\d+$/ ? $ENV{PS_RANDOM_SEED} : (int(time() * 1000) % 1000000);
my $seconds = $ENV{PS_RANDOM_SECONDS} || 60;
my $NWRITERS = 4;
diag("PS_RANDOM_SEED=$seed PS_RANDOM_SECONDS=$seconds");
srand($seed);

my $HTTP_TIMEOUT = 2;    # seconds (ps_new_node)
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('concurrency_random', $portal, conf => qq{
max_prepared_transactions = 40
portal_sync.batch_size = 40
portal_sync.http_timeout = '${HTTP_TIMEOUT}s'
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

# Patients 1..NP are shared (charts change); RESTRICTED ones are enrolled
# with a chart that stays at privacy 4.
my $NP = 40;
my @RESTRICTED = (41 .. 45);
one(qq{SELECT pstest.make_patient(i, 2, CASE WHEN i % 9 = 0 THEN 2 ELSE 0 END) FROM generate_series(1, $NP) i;
	   SELECT pstest.make_patient(i, 2, 4) FROM generate_series($RESTRICTED[0], $RESTRICTED[-1]) i;
	   SELECT pstest.book(i) FROM generate_series(1, 12) i;
	   SELECT pstest.book(i) FROM generate_series($RESTRICTED[0], $RESTRICTED[-1]) i;
	   INSERT INTO ehr.medication (patient_id, drug_name, dose, start_date, privacy_level)
	     SELECT i, 'SENTINEL', '1 mg', date '2024-04-04', 4 FROM generate_series(1, $NP) i;
	   INSERT INTO ehr.lab_result (patient_id, test_name, value, status, result_date, privacy_level)
	     SELECT i, 'SENTINEL', '1', 'final', date '2024-04-04', 4 FROM generate_series(1, $NP) i;});
ok(ps_wait_drained($node, $db, 120), 'initial drain');
ps_compare_state($node, $db, $portal, 'initial');

# ---------------------------------------------------------------- random statements
sub rdate { return sprintf("(date '2022-01-01' + %d)", int(rand(1600))) }
sub rpriv { my $r = rand(); return $r < 0.5 ? 0 : $r < 0.7 ? 1 : $r < 0.85 ? 2 : int(rand(5)) }
sub pick  { return $_[ int(rand(@_)) ] }
sub rpat  { return 1 + int(rand($NP)) }
my $next_new_patient = 100;

my %src = (
	medication => { key => 'med_id', date => 'start_date', excl => q{drug_name <> 'SENTINEL'},
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
	vital_sign => { key => 'vital_id', date => 'measured_at', ts => 1,
		content => sub { "pulse = " . (60 + int(rand(80))) . ", weight_kg = " . sprintf('%.3f', 10 + rand(40)) },
		insert => sub { sprintf(q{INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse, privacy_level) VALUES (%d, %s + time '12:00', %d, %d)},
			rpat(), rdate(), 60 + int(rand(80)), rpriv()) } },
	lab_result => { key => 'result_id', date => 'result_date', excl => q{test_name <> 'SENTINEL'},
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
	insurance => { key => 'ins_id',
		content => sub { "plan_name = 'plan " . int(rand(1000)) . "'" },
		insert => sub { sprintf(q{INSERT INTO ehr.insurance (patient_id, payer, member_id) VALUES (%d, 'Payer', 'M%d')}, rpat(), int(rand(1e6))) } },
);
my @tables = sort keys %src;

sub some
{
	my ($t, $n) = @_;
	my $k = $src{$t}{key};
	my $w = $src{$t}{excl} ? "WHERE $src{$t}{excl} " : '';
	return "$k IN (SELECT $k FROM ehr.$t ${w}ORDER BY random() LIMIT $n)";
}

sub random_change
{
	my $t = pick(@tables);
	my $s = $src{$t};
	my $r = rand();
	my $n = 1 + int(rand(3));
	return "UPDATE ehr.$t SET privacy_level = " . rpriv() . ' WHERE ' . some($t, $n)
	  if $r < 0.2 && $t ne 'insurance';
	if ($r < 0.35 && $s->{date})
	{
		my $d = rdate() . ($s->{ts} ? " + time '12:00'" : '');
		return "UPDATE ehr.$t SET $s->{date} = $d WHERE " . some($t, $n);
	}
	return "UPDATE ehr.$t SET " . $s->{share}->() . ' WHERE ' . some($t, $n)
	  if $r < 0.5 && $s->{share};
	return "UPDATE ehr.$t SET " . $s->{content}->() . ' WHERE ' . some($t, $n)
	  if $r < 0.72;
	return $s->{insert}->() if $r < 0.9;
	return "DELETE FROM ehr.$t WHERE " . some($t, 1);
}

sub chart_change
{
	my $r = rand();
	my $p = rpat();
	if ($r < 0.55)
	{
		my $lvl = rand() < 0.6 ? 0 : int(rand(5));
		return "UPDATE ehr.patient SET privacy_level = $lvl WHERE patient_id = $p";
	}
	return "DELETE FROM ehr.patient WHERE patient_id = $p" if $r < 0.7;
	return qq{INSERT INTO ehr.patient (patient_id, mrn, first_name, last_name, dob, privacy_level)
		SELECT i, 'MRN' || i, 'First' || i, 'Again', date '2015-05-05', 0
		FROM generate_series(1, $NP) i WHERE NOT EXISTS (SELECT 1 FROM ehr.patient p WHERE p.patient_id = i)
		ORDER BY random() LIMIT 1} if $r < 0.85;
	return "UPDATE ehr.patient SET guardian_phone = '555-" . int(rand(10000)) . "' WHERE patient_id = $p";
}

# Changes that never make anything shareable: content of sentinel rows,
# rows and content of the restricted patients.
sub withheld_change
{
	my $r = rand();
	my $rp = pick(@RESTRICTED);
	return "UPDATE ehr.medication SET dose = 'sentinel " . int(rand(1e6)) . "' WHERE drug_name = 'SENTINEL' AND patient_id = " . rpat()
	  if $r < 0.3;
	return "UPDATE ehr.lab_result SET value = '" . int(rand(1e6)) . "' WHERE test_name = 'SENTINEL' AND patient_id = " . rpat()
	  if $r < 0.5;
	return "UPDATE ehr.allergy SET reaction = 'r " . int(rand(1e6)) . "' WHERE patient_id = $rp"
	  if $r < 0.7;
	return "UPDATE ehr.insurance SET plan_name = 'p " . int(rand(1e6)) . "' WHERE patient_id = $rp"
	  if $r < 0.8;
	return "UPDATE ehr.patient SET guardian_phone = '555-" . int(rand(1e4)) . "' WHERE patient_id = $rp"
	  if $r < 0.9;
	return sprintf(q{INSERT INTO ehr.problem (patient_id, description, noted_on) VALUES (%d, 'restricted %d', %s)}, $rp, int(rand(1e6)), rdate());
}

sub any_change
{
	my $r = rand();
	return random_change() if $r < 0.62;
	return chart_change() if $r < 0.72;
	return withheld_change() if $r < 0.84;
	return 'SELECT pstest.book(' . rpat() . ') IS NOT NULL' if $r < 0.92;
	if ($r < 0.95)
	{
		my $p = $next_new_patient++;
		return "SELECT pstest.make_patient($p, 1, 0)" . (rand() < 0.7 ? "; SELECT pstest.book($p) IS NOT NULL" : '');
	}
	return q{SELECT count(portal_sync.resync_patient(patient_id)) FROM (SELECT patient_id FROM portal_sync.patients ORDER BY random() LIMIT 1) x};
}

# ---------------------------------------------------------------- writers
my %count;
sub wq
{
	my ($w, $sql) = @_;
	my ($out, $failed) = $w->{s}->query($sql);
	my $err = $w->{s}->{stderr};
	$w->{s}->{stderr} = '';    # BackgroundPsql keeps stderr across queries
	if ($failed)
	{
		$count{errors}++;
		$err =~ s/\s+$//;
		note("writer $w->{n}: $err") if $err !~ /lock timeout|deadlock|could not serialize/;
	}
	return !$failed;
}

my @writers;
for my $n (1 .. $NWRITERS)
{
	my $s = $node->background_psql($db, on_error_stop => 0);
	my $w = { n => $n, s => $s, state => 'idle' };
	wq($w, q{SET lock_timeout = '300ms'; SET statement_timeout = '30s'; SET client_min_messages = error});
	push @writers, $w;
}

my (@prepared, $gid_n);    # [gid, due time]

sub end_open
{
	my ($w, $how) = @_;
	if ($how eq 'prepare')
	{
		my $gid = 'ps027_' . (++$gid_n);
		if (wq($w, "PREPARE TRANSACTION '$gid'"))
		{
			push @prepared, [ $gid, time() + 0.3 + rand(6), rand() < 0.85 ? 'COMMIT' : 'ROLLBACK' ];
			$count{prepared}++;
		}
		else
		{
			wq($w, 'ROLLBACK');
		}
	}
	else
	{
		wq($w, $how);
		$count{ lc $how }++;
	}
	$w->{state} = 'idle';
}

sub step
{
	my ($w) = @_;
	if ($w->{state} eq 'open')
	{
		if ($w->{aborted})
		{
			wq($w, 'ROLLBACK');
			$w->{state} = 'idle';
			return;
		}
		if (time() >= $w->{until})
		{
			my $r = rand();
			end_open($w, $w->{prepare} ? 'prepare' : $r < 0.9 ? 'COMMIT' : 'ROLLBACK');
			return;
		}
		if ($w->{writes} && rand() < 0.15)
		{
			$w->{aborted} = 1 unless wq($w, any_change());
		}
		return;
	}
	my $r = rand();
	if ($r < 0.55)
	{
		# autocommit
		wq($w, any_change());
		$count{autocommit}++;
	}
	elsif ($r < 0.75)
	{
		# a short transaction of several changes
		wq($w, 'BEGIN');
		my $ok = 1;
		for (1 .. 1 + int(rand(5)))
		{
			$ok &&= wq($w, any_change());
		}
		wq($w, $ok ? 'COMMIT' : 'ROLLBACK');
		$count{$ok ? 'commit' : 'rollback'}++;
	}
	elsif ($r < 0.9)
	{
		# a writing transaction left open for a while, maybe prepared
		wq($w, 'BEGIN');
		$w->{state} = 'open';
		$w->{writes} = 1;
		$w->{aborted} = !wq($w, any_change());
		$w->{until} = time() + 0.3 + rand(5);
		$w->{prepare} = rand() < 0.4;
		$count{open_writing}++;
	}
	else
	{
		# read-only, idle in transaction for a while
		wq($w, 'BEGIN');
		wq($w, 'SELECT count(*) FROM ehr.patient');
		$w->{state} = 'open';
		$w->{writes} = 0;
		$w->{aborted} = 0;
		$w->{prepare} = 0;
		$w->{until} = time() + 0.5 + rand(6);
		$count{open_idle}++;
	}
}

sub resolve_prepared
{
	my ($all) = @_;
	my @keep;
	for my $p (@prepared)
	{
		my ($gid, $due, $how) = @$p;
		if ($all || time() >= $due)
		{
			my ($ret, $out, $err) = $node->psql($db, "$how PREPARED '$gid'");
			diag("$how PREPARED '$gid' failed: $err") if $ret != 0;
			$count{ lc($how) . '_prepared' }++;
		}
		else
		{
			push @keep, $p;
		}
	}
	@prepared = @keep;
}

# ---------------------------------------------------------------- portal modes
my $mode_n = 0;
sub random_modes
{
	my $r = rand();
	$mode_n++;
	my $hang = { mode => 'hang', seconds => $HTTP_TIMEOUT + 0.1, apply => JSON::PP::true, count => 1 + int(rand(2)) };
	my $fail = { mode => 'random_fail', rate => 0.2 + rand(0.3), status => 500, seed => $seed + $mode_n };
	return ['ok', { mode => 'ok' }] if $r < 0.35;
	return ['random_fail', $fail, { mode => 'ok' }] if $r < 0.65;
	return ['hang', $hang, { mode => 'ok' }] if $r < 0.85;
	return ['random_fail+hang', $fail, $hang, { mode => 'ok' }];
}

my $mark0 = ps_nreq($portal);
my $t_end = time() + $seconds;
my $next_mode = 0;
my %modes_used;
while (time() < $t_end)
{
	if (time() >= $next_mode)
	{
		my ($name, @rules) = @{ random_modes() };
		$portal->modes(@rules);
		$modes_used{$name}++;
		$next_mode = time() + 2 + rand(4);
	}
	step($_) for @writers;
	resolve_prepared(0);
	usleep(int(rand(60_000)));
}

# The end: every transaction ends, the portal accepts everything.
for my $w (@writers)
{
	end_open($w, $w->{aborted} ? 'ROLLBACK' : $w->{prepare} ? 'prepare' : 'COMMIT')
	  if $w->{state} eq 'open';
}
resolve_prepared(1);
$_->{s}->quit for @writers;
$portal->modes({ mode => 'ok' });
note('portal modes used: ' . join(', ', map { "$_ x$modes_used{$_}" } sort keys %modes_used));
note('writers: ' . join(', ', map { "$_ $count{$_}" } sort keys %count));
is(one(q{SELECT count(*) FROM pg_prepared_xacts}), '0', 'no prepared transaction left');

my $drained = ok(ps_wait_drained($node, $db, 180), 'drained after the writing phase');
ps_diag_stuck($node, $db) unless $drained;

my $reqs = $portal->requests(since => 0, full => 1);
my $state = $portal->state;

# Nothing withheld ever received, whatever the portal answered.
{
	my %restricted = map { $_ => 1 } @RESTRICTED;
	my %sentinel;
	for my $t (qw(medication lab_result))
	{
		my $k = $src{$t}{key};
		my $col = $t eq 'medication' ? 'drug_name' : 'test_name';
		$sentinel{$t}{$_} = 1
		  for split /\n/, one(qq{SELECT $k FROM ehr.$t WHERE $col = 'SENTINEL'});
	}
	my (@bad, $n);
	for my $r (@$reqs)
	{
		for my $ev (@{ $r->{events} || [] })
		{
			next unless ($ev->{op} // '') eq 'upsert';
			$n++;
			my ($p, $s, $k) = ($ev->{patient_id}, $ev->{source}, $ev->{key} // '');
			push @bad, "request $r->{n} ($r->{status}): $p/$s/$k"
			  if $restricted{$p} || ($sentinel{$s} && $sentinel{$s}{$k});
		}
	}
	ok(!@bad, 'no upsert of a row that was never shareable (sentinels, restricted charts) ever sent (' . ($n // 0) . ' upserts)')
	  or diag(join('; ', @bad[ 0 .. ($#bad > 20 ? 20 : $#bad) ]));
}

ps_compare_state($node, $db, $portal, 'after the writing phase');
ps_check_portal_invariants($portal, 'after the writing phase', $state);
ps_check_send_order($reqs, 'after the writing phase');
ps_check_ccda_after_snapshot($reqs, 'after the writing phase');
ps_check_event_ids_stable($reqs, 'after the writing phase');
ps_check_accepted_once($portal, 'after the writing phase', resends => 1, requests => $reqs, state => $state);
is(scalar @{ ps_dead_letters($node, $db) }, 0, 'nothing dead-lettered (the portal never rejected an event)');
cmp_ok($state->{applied_event_ids}, '>', 300,
	"a real workload ($state->{applied_event_ids} events applied, $state->{requests} requests, answers "
	  . join(' ', map { "$_:$state->{answers}{$_}" } sort keys %{ $state->{answers} }) . ')');

# One quiet resync_all: everything it sends is shareable and current.
my $mark = ps_nreq($portal);
one('SELECT portal_sync.resync_all()');
ok(ps_wait_drained($node, $db, 120), 'drained after a quiet resync_all');
ps_check_sent_shareable($node, $db, $portal, $mark, 'quiet resync_all');
ps_compare_state($node, $db, $portal, 'after a quiet resync_all');
ps_check_portal_invariants($portal, 'at the end');

$node->stop;
$portal->stop;
done_testing();
