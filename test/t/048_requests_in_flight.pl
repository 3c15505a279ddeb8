
# Copyright (c) 2026, portal_sync developers
#
# Requests in flight (SPEC 5, Concurrency; portal_sync.max_inflight),
# attacked on a real server and the real test portal while writers keep
# writing.  The portal records, per request, its arrival (time), when it
# answered (answered_at) or dropped the connection (closed_at), its status
# and its events; everything below is computed from that log.
#
# A request is in flight, for the worker, from its arrival until its
# answer, but never longer than http_timeout: a request the worker gave up
# on (a hang past the timeout, applied late by the portal: the late copy)
# or abandoned (SIGTERM) is no longer its business, though the portal may
# still hold it.
#
# 1. Requests really are in flight together: with a slow portal the
#    largest overlap is at least 2 and at most max_inflight; after
#    max_inflight = 1 and a reload, at most 1.
# 2. Every two requests in flight at once carry disjoint sets of patients,
#    over the whole run.
# 3. Faults at the worst moment, in rounds where some requests are
#    accepted and others fail: 500s at random, dropped connections, a hang
#    past http_timeout that the portal applies after the worker gave up
#    (the late copy), 429 with Retry-After, a gate holding one request
#    while the others are answered.  After each: nothing lost, the portal
#    holds the shareable state, no order violation, a batch_id never names
#    two bodies, an event_id never two contents.  And a batch whose
#    outcome the worker cannot know (dropped connection, late copy) goes
#    again as it was (same body, same batch_id) before anything else of
#    its patients (test 055).
# 4. Probing: while the portal fails everything, after the first failed
#    round at most one request is in flight at a time.
# 5. SIGTERM with requests in flight: the worker exits at once (not after
#    http_timeout), a new one delivers everything.
# 6. A property-style random phase: the portal's rules change at random
#    every few seconds (PS_RANDOM_SEED, printed; PS_RANDOM_SECONDS, default
#    20), writers enroll, resync and change rows; then every invariant.
#
# Each writer session owns its patients, so a patient's changes commit in
# the order they are made, one after the other.

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
my $seconds = $ENV{PS_RANDOM_SECONDS} || 20;
diag("PS_RANDOM_SEED=$seed PS_RANDOM_SECONDS=$seconds");
srand($seed);

my $T = 2;              # http_timeout, seconds
my $MAX_INFLIGHT = 4;
my $t_start = time();
my $portal = PortalSyncTest::Portal->start;
my $node = ps_new_node('requests_in_flight', $portal, conf => qq{
portal_sync.batch_size = 5
portal_sync.max_inflight = $MAX_INFLIGHT
portal_sync.http_timeout = '${T}s'
portal_sync.retry_max_delay = '1s'
});
my $db = 'postgres';
sub one { return $node->safe_psql($db, $_[0]) }

my $NW = 3;     # writers
my $NPW = 8;    # patients of each
one(qq{SELECT pstest.make_patient(i, 2) FROM generate_series(1, @{[ $NW * $NPW ]}) i;
	   SELECT pstest.book(i) FROM generate_series(1, @{[ $NW * $NPW ]}) i;});
ok(ps_wait_drained($node, $db), 'initial drain');

# ---------------------------------------------------------------- writers
sub pick { return $_[ int(rand(@_)) ] }

my @writers;
for my $n (1 .. $NW)
{
	my $s = $node->background_psql($db, on_error_stop => 0);
	push @writers, { n => $n, s => $s,
		patients => [ ($n - 1) * $NPW + 1 .. $n * $NPW ], next_new => 1000 * $n };
}
my %count;

sub wq
{
	my ($w, $sql) = @_;
	my ($out, $failed) = $w->{s}->query($sql);
	my $err = $w->{s}->{stderr};
	$w->{s}->{stderr} = '';
	if ($failed)
	{
		$count{errors}++;
		diag("writer $w->{n}: $err");
	}
	return !$failed;
}
wq($_, q{SET statement_timeout = '30s'; SET client_min_messages = error}) for @writers;

# One change of patient $p.  insert: only new rows (a row sent once is
# never changed again); mixed: updates, inserts, deletes; full: mixed,
# new enrollments (snapshots) and resyncs too.
sub change
{
	my ($w, $kind) = @_;
	my $p = pick(@{ $w->{patients} });
	my $x = int(rand(1e6));
	my $r = rand();
	if ($kind eq 'insert' || $r < 0.35)
	{
		return pick(
			qq{INSERT INTO ehr.medication (patient_id, drug_name, dose, start_date) VALUES ($p, 'drug $x', '5 mg', date '2024-06-01')},
			qq{INSERT INTO ehr.vital_sign (patient_id, measured_at, pulse) VALUES ($p, timestamp '2024-06-01 10:00' + interval '1 minute' * $x, 90)},
			qq{INSERT INTO ehr.problem (patient_id, description, noted_on) VALUES ($p, 'problem $x', date '2024-06-01')});
	}
	if ($kind eq 'full' && $r < 0.38)
	{
		my $new = $w->{next_new}++;
		push @{ $w->{patients} }, $new;
		$count{enrolled}++;
		return "SELECT pstest.make_patient($new, 1); SELECT pstest.book($new) IS NOT NULL";
	}
	if ($kind eq 'full' && $r < 0.40)
	{
		$count{resync}++;
		return "SELECT portal_sync.resync_patient('$p') IS NOT NULL";
	}
	return qq{UPDATE ehr.medication SET dose = '$x mg' WHERE med_id = (SELECT med_id FROM ehr.medication WHERE patient_id = $p ORDER BY random() LIMIT 1)}
	  if $r < 0.6;
	return qq{UPDATE ehr.allergy SET reaction = 'reaction $x' WHERE patient_id = $p} if $r < 0.75;
	return qq{UPDATE ehr.vital_sign SET pulse = 60 + $x % 80 WHERE vital_id = (SELECT vital_id FROM ehr.vital_sign WHERE patient_id = $p ORDER BY random() LIMIT 1)}
	  if $r < 0.85;
	return qq{DELETE FROM ehr.problem WHERE problem_id = (SELECT problem_id FROM ehr.problem WHERE patient_id = $p ORDER BY random() LIMIT 1)}
	  if $r < 0.93;
	return qq{UPDATE ehr.patient SET guardian_phone = '555-$x' WHERE patient_id = $p};
}

# One step of every writer: a change, or a transaction of a few (several
# patients in one transaction).
sub write_step
{
	my ($kind) = @_;
	for my $w (@writers)
	{
		if (rand() < 0.7)
		{
			wq($w, change($w, $kind));
			$count{autocommit}++;
		}
		else
		{
			wq($w, join(";\n", 'BEGIN', (map { change($w, $kind) } 1 .. 2 + int(rand(3))), 'COMMIT'));
			$count{transactions}++;
		}
	}
}

# Writers write for $secs seconds (or until $until returns true).
sub pump
{
	my ($secs, $kind, $until) = @_;
	my $end = time() + $secs;
	while (time() < $end)
	{
		write_step($kind);
		return 1 if $until && $until->();
		# slower in the random phase: its faults slow delivery down
		usleep($kind eq 'full' ? 200_000 + int(rand(150_000)) : 40_000 + int(rand(60_000)));
	}
	return $until ? 0 : 1;
}

# ---------------------------------------------------------------- the log
# Requests the worker abandoned (SIGTERM): n => when it exited.
my %abandoned_at;

# The end of a request's time in flight, for the worker.  The portal notes
# a request when it arrives, some time after the worker started it and
# its http_timeout: a request not answered within about http_timeout may
# have been given up by the worker up to that delay (0.3 s here) earlier.
sub wend
{
	my ($r) = @_;
	my $end = $r->{answered_at} // $r->{closed_at} // 1e12;
	$end = $r->{time} + $T - 0.3 if $r->{time} + $T - 0.3 < $end;
	$end = $abandoned_at{ $r->{n} } if defined $abandoned_at{ $r->{n} } && $abandoned_at{ $r->{n} } < $end;
	return $end;
}

sub patients_of
{
	my ($r) = @_;
	my %p = map { ($_->{patient_id} // '') => 1 } @{ $r->{events} || [] };
	return \%p;
}

# The most requests in flight at once.
sub max_overlap
{
	my ($reqs) = @_;
	my @edges;
	for my $r (@$reqs)
	{
		push @edges, [ $r->{time}, 1 ], [ wend($r), -1 ];
	}
	my ($cur, $max) = (0, 0);
	for my $e (sort { $a->[0] <=> $b->[0] || $a->[1] <=> $b->[1] } @edges)
	{
		$cur += $e->[1];
		$max = $cur if $cur > $max;
	}
	return $max;
}

# Pairs of requests in flight at once: [a, b] with a arriving first.
sub overlapping_pairs
{
	my ($reqs) = @_;
	my @s = sort { $a->{time} <=> $b->{time} } @$reqs;
	my @pairs;
	for my $i (0 .. $#s)
	{
		my $end = wend($s[$i]);
		for my $j ($i + 1 .. $#s)
		{
			last if $s[$j]->{time} >= $end;
			push @pairs, [ $s[$i], $s[$j] ];
		}
	}
	return \@pairs;
}

sub check_disjoint
{
	my ($reqs, $name) = @_;
	my $pairs = overlapping_pairs($reqs);
	my @bad;
	for my $pr (@$pairs)
	{
		my ($a, $b) = @$pr;
		my $pa = patients_of($a);
		my @shared = grep { $pa->{$_} } sort keys %{ patients_of($b) };
		push @bad, sprintf('requests %d [%.3f, %.3f] (%s) and %d [%.3f, %.3f] (%s) share patients %s',
			$a->{n}, $a->{time}, wend($a), $a->{status} // 'in flight',
			$b->{n}, $b->{time}, wend($b), $b->{status} // 'in flight', join(',', @shared))
		  if @shared;
	}
	ok(!@bad, "$name: requests in flight at once carry disjoint patients ("
		  . scalar(@$pairs) . ' overlapping pairs of ' . scalar(@$reqs) . ' requests)')
	  or diag(join("\n", @bad[ 0 .. ($#bad > 10 ? 10 : $#bad) ]));
	return !@bad;
}

sub accepted { return ($_[0]->{status} // '') =~ /^2\d\d$/ && ($_[0]->{answered_at} // 1e12) - $_[0]->{time} < $T - 0.3 }

# Failed, for the worker: not a 2xx, or answered well after it gave up.
sub failed_for_worker
{
	my ($r) = @_;
	return 0 unless defined $r->{status};
	return 1 if $r->{status} !~ /^2\d\d$/;
	return defined $r->{answered_at} && $r->{answered_at} - $r->{time} > $T + 0.3;
}

# A round in which some requests were accepted while others failed.
sub mixed_rounds
{
	my ($reqs) = @_;
	return scalar grep {
		my ($a, $b) = @$_;
		(accepted($a) && failed_for_worker($b)) || (accepted($b) && failed_for_worker($a))
	} @{ overlapping_pairs($reqs) };
}

# A batch whose outcome the worker cannot know (the connection dropped
# after it was sent, or the portal applied it after the worker gave up):
# the portal may apply it late, so it goes again exactly as it was (same
# body, same batch_id) before anything else of its patients, whether or
# not its rows changed meanwhile.  Batches the portal refused with an
# answer are built again and not looked at here.
sub outcome_unknown
{
	my ($r) = @_;
	return 1 if defined $r->{closed_at};
	return ($r->{status} // '') =~ /^2\d\d$/ && defined $r->{answered_at}
	  && $r->{answered_at} - $r->{time} > $T + 0.3;
}

sub check_resent_as_they_were
{
	my ($all, $from, $to, $name) = @_;
	my @sorted = sort { $a->{n} <=> $b->{n} } @$all;
	my $same = 0;
	my @bad;
	for my $r (@sorted)
	{
		next unless $r->{n} >= $from && $r->{n} < $to && outcome_unknown($r);
		my %patients = map { $_->{patient_id} => 1 } @{ $r->{events} };
		my ($again) = grep { $_->{n} > $r->{n} && grep { $patients{ $_->{patient_id} } } @{ $_->{events} } } @sorted;
		next unless $again;
		$same++;
		push @bad, "request $r->{n} (batch $r->{batch_id}, seqs "
		  . join(',', map { $_->{seq} } @{ $r->{events} })
		  . ") followed by request $again->{n} (batch $again->{batch_id}, seqs "
		  . join(',', map { $_->{seq} } @{ $again->{events} }) . ')'
		  unless $again->{body_sha} eq $r->{body_sha} && $again->{batch_id} eq $r->{batch_id};
	}
	ok(!@bad, "$name: a batch of unknown outcome goes again as it was, before anything else of its patients ($same such)")
	  or diag(join("\n", @bad[ 0 .. ($#bad > 10 ? 10 : $#bad) ]));
	return $same;
}

my $resends = 0;    # late copies were applied: event_ids accepted twice

sub settle
{
	my ($name) = @_;
	my $t0 = time();
	note(sprintf('[%.1fs] settling: %s', $t0 - $t_start, $name));
	ps_check_settled($node, $db, $portal, $name, resends => $resends, timeout => 60)
	  or ps_diag_stuck($node, $db);
	note(sprintf('[%.1fs] settled in %.1fs', time() - $t_start, time() - $t0));
}

# ---------------------------------------------------------------- 1. in flight together
$portal->mode({ mode => 'delay', seconds => 0.3 });
my $m0 = ps_nreq($portal);
pump(3, 'mixed');
my $reqs = $portal->requests(since => $m0);
my $max = max_overlap($reqs);
cmp_ok($max, '>=', 2, "slow portal: requests in flight together (at most $max at once, " . scalar(@$reqs) . ' requests)');
cmp_ok($max, '<=', $MAX_INFLIGHT, "slow portal: never more than max_inflight = $MAX_INFLIGHT in flight");
check_disjoint($reqs, 'slow portal, max_inflight 4');

one(q{ALTER SYSTEM SET portal_sync.max_inflight = 1});
one(q{SELECT pg_reload_conf()});
# the unit in hand when the reload arrived may still have its lanes
my $t_reload = time();
pump(2.5, 'mixed');
my $m1 = ps_nreq($portal);
pump(2.5, 'mixed');
$reqs = [ grep { $_->{time} > $t_reload + 2.5 } @{ $portal->requests(since => $m1) } ];
$max = max_overlap($reqs);
cmp_ok(scalar @$reqs, '>=', 5, 'max_inflight = 1: requests sent (' . scalar(@$reqs) . ')');
cmp_ok($max, '<=', 1, "max_inflight = 1: one request in flight at a time (at most $max)");
one(q{ALTER SYSTEM RESET portal_sync.max_inflight});
one(q{SELECT pg_reload_conf()});
$portal->mode({ mode => 'ok' });

# ---------------------------------------------------------------- 3. faults at the worst moment
my $m_faults = ps_nreq($portal);
my $total_mixed = 0;

# The requests a gate held (answered a second or more after they came),
# each with the others of its round (arrived with it).
sub held_rounds
{
	my ($reqs) = @_;
	my @out;
	for my $held (grep { defined $_->{answered_at} && $_->{answered_at} - $_->{time} >= 1.1 } @$reqs)
	{
		push @out, [ $held, [ grep { $_ != $held && abs($_->{time} - $held->{time}) < 0.05 } @$reqs ] ];
	}
	return @out;
}

# One fault scenario: the portal is slow for a moment (so that rounds are
# full), then answers by the rules while the writers write; the rules are
# armed again (at most 3 times) until the scenario really happened
# ($o{happened}: by default some request failed in a round in which
# another was accepted); then the portal accepts and everything settles.
sub fault
{
	my ($name, $rules, %o) = @_;
	my $writers = $o{writers} // 'mixed';
	my $happened = $o{happened} // sub { mixed_rounds($_[0]) };
	my $mark = ps_nreq($portal);
	my ($arms, $ok) = (0, 0);
	while (!$ok && $arms < 3)
	{
		$arms++;
		$portal->mode({ mode => 'delay', seconds => 0.3 });
		pump(0.6, $writers);
		my $armed = ps_nreq($portal);
		$portal->modes(@$rules);
		pump($o{seconds} // 2, $writers, $o{until} ? sub { $o{until}->($armed) } : undef);
		$ok = $happened->($portal->requests(since => $mark));
	}
	$portal->mode({ mode => 'ok' });
	$resends = 1 if $o{resends};
	settle($name);
	# with what was sent until everything was accepted
	my $r = $portal->requests(since => $mark);
	my $mixed = mixed_rounds($r);
	$total_mixed += $mixed;
	ok($ok, "$name: the scenario happened (rules armed $arms times, " . scalar(@$r)
		  . " requests, $mixed pairs in flight together with one accepted and one failed)");
	return $r;
}

# The first request of a round is accepted, the next ones fail: some
# round holds both.
my $first_ok = { mode => 'ok', count => 1 };

my $r = fault('500 at random',
	[ { mode => 'delay', seconds => 0.2 }, { mode => 'random_fail', rate => 0.4, status => 500, seed => $seed } ]);

$r = fault('dropped connections',
	[ { mode => 'delay', seconds => 0.2 }, $first_ok, { mode => 'close', count => 2 } ]);
cmp_ok(scalar(grep { ($_->{status} // '') eq 'closed' } @$r), '>=', 2, 'dropped connections: connections dropped');

# The late copy: the portal holds one request past http_timeout and then
# applies it, after the worker has sent it again.  Writers only add rows
# here, so that batch's events are unchanged when it is sent again.
my $LATE = 5;
my $dups = $portal->state->{duplicates};
my $hung = sub { [ grep { ($_->{rule} // '') eq 'hang' } @{ $_[0] } ] };
$r = fault('late copy',
	[ $first_ok, { mode => 'hang', seconds => $LATE, apply => JSON::PP::true, count => 1 }, { mode => 'delay', seconds => 0.2 } ],
	writers => 'insert', seconds => $LATE + 10, resends => 1,
	until => sub {
		my $h = $hung->($portal->requests(since => $_[0]));
		return @$h && defined $h->[0]{answered_at};
	},
	happened => sub {
		my ($q) = @_;
		my %late = map { $_->{n} => 1 } @{ $hung->($q) };
		return grep {
			my ($a, $b) = @$_;
			($late{ $a->{n} } && accepted($b)) || ($late{ $b->{n} } && accepted($a))
		} @{ overlapping_pairs($q) };
	});
{
	my $h = $hung->($r);
	my $n = 0;
	ok(@$h >= 1, 'late copy: requests held past http_timeout (' . scalar(@$h) . ')');
	for my $x (@$h)
	{
		$n += @{ $x->{events} };
		ok(failed_for_worker($x), "late copy: request $x->{n} answered after the worker gave up");
		my $again = ps_resent_after($r, $x);
		ok($again && $again->{body_sha} eq $x->{body_sha} && $again->{batch_id} eq $x->{batch_id},
			"late copy: request $x->{n} sent again with the very same body and batch_id")
		  or diag($again ? "hung request $x->{n} (batch $x->{batch_id}, seqs " . join(',', map { $_->{seq} } @{ $x->{events} })
			  . "), next with its events $again->{n} (batch $again->{batch_id}, seqs " . join(',', map { $_->{seq} } @{ $again->{events} }) . ')'
			  : 'not sent again');
		ok($again && accepted($again) && $again->{answered_at} < $x->{answered_at},
			"late copy: request $x->{n} applied after the batch sent again had been accepted");
	}
	is($portal->state->{duplicates} - $dups, $n, 'late copy: its events were applied as duplicates');
}

$r = fault('429 with Retry-After',
	[ { mode => 'delay', seconds => 0.2 }, $first_ok, { mode => 'status', status => 429, retry_after => '1', count => 2 } ]);
for my $x (grep { ($_->{status} // '') eq '429' } @$r)
{
	# its patients' events go again (built again: their content may have
	# changed, and so their event_ids) only after the Retry-After
	my $mine = patients_of($x);
	my ($again) = sort { $a->{time} <=> $b->{time} }
	  grep { $_->{n} > $x->{n} && grep { $mine->{$_} } keys %{ patients_of($_) } } @$r;
	my $gap = $again ? $again->{time} - $x->{answered_at} : -1;
	cmp_ok($gap, '>=', 0.9, "429: Retry-After 1 honoured for request $x->{n} (its patients sent again after ${gap}s)");
}

# A gate holds one request of a round (1.2 s, less than http_timeout)
# while the others are answered at once: nothing is sent before it too is
# answered (the worker acts on a round's answers when all are in).
$r = fault('one request held',
	[ $first_ok, { mode => 'gate', name => 'g3', seconds => 1.2, count => 1 }, { mode => 'delay', seconds => 0.05 } ],
	happened => sub {
		return grep {
			my ($held, $round) = @$_;
			grep { $_->{answered_at} < $held->{answered_at} - 0.5 } @$round
		} held_rounds($_[0]);
	});
{
	my @held = held_rounds($r);
	ok(@held >= 1, 'one request held: held by the gate (' . scalar(@held) . ' times)');
	my @meanwhile;
	for my $h (@held)
	{
		my $held = $h->[0];
		push @meanwhile, map { "request $_->{n} at +" . sprintf('%.3f', $_->{time} - $held->{time}) . " while $held->{n} was held" }
		  grep { $_->{time} > $held->{time} + 0.05 && $_->{time} < $held->{answered_at} } @$r;
	}
	ok(!@meanwhile, 'one request held: nothing sent until it was answered') or diag(join("\n", @meanwhile));
}
cmp_ok($total_mixed, '>=', 5, "faults: $total_mixed pairs of requests in flight together, one accepted and one failed");

# ---------------------------------------------------------------- 4. probing
$portal->mode({ mode => 'delay', seconds => 0.3 });
pump(0.6, 'mixed');
my $m_probe = ps_nreq($portal);
$portal->modes({ mode => 'delay', seconds => 0.2 }, { mode => 'status', status => 503 });
pump(4, 'mixed');
$portal->mode({ mode => 'ok' });
{
	my @f = sort { $a->{time} <=> $b->{time} } grep { ($_->{status} // '') eq '503' } @{ $portal->requests(since => $m_probe) };
	my $first_answer = (sort { $a <=> $b } map { $_->{answered_at} } @f)[0] // 0;
	my @later = grep { $_->{time} > $first_answer } @f;
	cmp_ok(scalar @later, '>=', 2, 'probing: the worker kept trying (' . scalar(@later) . ' requests after the first failed round)');
	is(max_overlap(\@later), 1, 'probing: after the first failed round, one request in flight at a time');
	cmp_ok(max_overlap(\@f), '<=', $MAX_INFLIGHT, 'probing: the first failed round within max_inflight');
}
settle('probing');
my $m_faults_end = ps_nreq($portal);
my $n_same = check_resent_as_they_were($portal->requests, $m_faults, $m_faults_end, 'faults');
cmp_ok($n_same, '>=', 1, 'faults: batches of unknown outcome were sent again');

# ---------------------------------------------------------------- 5. SIGTERM with requests in flight
ps_set_conf($node, 'portal_sync.http_timeout' => '10s');
$T = 10;
pump(0.5, 'mixed');
$portal->modes({ mode => 'gate', name => 'g5', seconds => 30 }, { mode => 'status', status => 503 });
my $m_term = ps_nreq($portal);
my $held = pump(10, 'mixed', sub { grep { !defined $_->{status} } @{ $portal->requests(since => $m_term) } });
ok($held, 'SIGTERM: requests held in flight');
$portal->mode({ mode => 'ok' });
my $pid = ps_worker_pid($node, $db);
my $t_kill = time();
one("SELECT pg_terminate_backend($pid)");
ok(ps_wait_until(sub { one("SELECT count(*) FROM pg_stat_activity WHERE pid = $pid") eq '0' }, 'worker exits', 15),
	'SIGTERM: the worker exits');
my $t_exit = time();
cmp_ok($t_exit - $t_kill, '<', 3, sprintf('SIGTERM: it exits within %.2fs, not after http_timeout (10 s)', $t_exit - $t_kill));
for my $x (@{ $portal->requests(since => $m_term) })
{
	$abandoned_at{ $x->{n} } = $t_exit unless defined $x->{status};
}
note('SIGTERM: ' . scalar(keys %abandoned_at) . ' requests abandoned');
$portal->open_gate('g5');
ok(ps_wait_until(sub { my $p = ps_worker_pid($node, $db); $p && $p != $pid }, 'a new worker', 30), 'SIGTERM: a new worker starts');
pump(1, 'mixed');
ps_set_conf($node, 'portal_sync.http_timeout' => "2s");
$T = 2;
settle('SIGTERM');

# ---------------------------------------------------------------- 6. random
my $mode_n = 0;
sub random_rules
{
	$mode_n++;
	my $d = rand() < 0.6 ? 0.05 + rand(0.25) : 0;
	my @rules;
	push @rules, { mode => 'delay', seconds => $d } if $d;
	# past http_timeout by 0.1 s (with the delay): applied before any retry
	# could reach the portal, so that a row changed meanwhile cannot make
	# the late copy older than what was accepted after it
	my @faults = (
		{ mode => 'random_fail', rate => 0.1 + rand(0.4), status => pick(500, 502, 503, 408), seed => $seed + $mode_n },
		{ mode => 'close', count => 1 + int(rand(2)) },
		{ mode => 'hang', seconds => $T + 0.1 - $d, apply => JSON::PP::true, count => 1 },
		{ mode => 'hang', seconds => $T + 0.5, apply => JSON::PP::false, count => 1 },
		{ mode => 'status', status => 429, retry_after => '1', count => 1 + int(rand(2)) },
		{ mode => 'gate', name => "r$mode_n", seconds => rand(1.5), count => 1 });
	for my $f (@faults)
	{
		push @rules, $f if rand() < 0.35;
	}
	# a gate before that hang would make its late copy later
	@rules = grep { $_->{mode} ne 'gate' } @rules
	  if grep { $_->{mode} eq 'hang' && $_->{apply} } @rules;
	# the order of the rules decides which fires first
	for my $i (reverse 1 .. $#rules)
	{
		my $j = int(rand($i + 1));
		@rules[ $i, $j ] = @rules[ $j, $i ] unless $rules[$i]{mode} eq 'delay' || $rules[$j]{mode} eq 'delay';
	}
	return @rules;
}
my $m_random = ps_nreq($portal);
my $t_end = time() + $seconds;
my %used;
while (time() < $t_end)
{
	my @rules = random_rules();
	$used{ join('+', map { $_->{mode} } @rules) || 'ok' }++;
	$portal->modes(@rules, { mode => 'ok' });
	pump(2 + rand(2), 'full');
}
$portal->mode({ mode => 'ok' });
note('random rules: ' . join(', ', map { "$_ x$used{$_}" } sort keys %used));
note('writers: ' . join(', ', map { "$_ $count{$_}" } sort keys %count));
$_->{s}->quit for @writers;
settle('random');

# ---------------------------------------------------------------- 2. over the whole run
my $all = $portal->requests;
check_disjoint($all, 'whole run');
my $state = $portal->state;
is($count{errors} // 0, 0, 'no writer statement failed');
cmp_ok($state->{applied_event_ids}, '>', 1000,
	"a real workload ($state->{applied_event_ids} events applied, $state->{requests} requests, answers "
	  . join(' ', map { "$_:$state->{answers}{$_}" } sort keys %{ $state->{answers} }) . ')');
note(sprintf('run time %.1fs', time() - $t_start));

$node->stop;
$portal->stop;
done_testing();
