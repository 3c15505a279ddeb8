
# Copyright (c) 2026, portal_sync developers
#
# One cluster, practices with different portals (SPEC 2): portal_sync.endpoint,
# auth_token_file, ca_file and compression set per database with ALTER
# DATABASE … SET.  Two databases, each with its own portal (which checks
# the token and the encoding), token file and compression; a third uses the
# cluster's settings.  Each portal receives exactly its own database's
# events with its own token, nothing of the others'.  While writers keep
# writing, ALTER DATABASE … SET moves one database to another portal at
# once (same worker, no reload), with no event lost, duplicated or out of
# order; RESET falls back to the cluster's values; an empty endpoint in one
# database is "unconfigured" there only.  auth_token cannot be stored in
# pg_db_role_setting (SQLSTATE 55P02, hint to auth_token_file), the
# per-database settings cannot be set for a role, a non-superuser cannot
# set them, and no token reaches the server log.  Last, ca_file: one
# database trusts an HTTPS portal through a CA of its own.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# What two portals hold for one practice, the later one's items over the
# earlier one's (a practice moved from one portal to the other, with no
# deletes meanwhile), for ps_compare_state.
package MovedPractice;

sub new
{
	my ($class, $practice, @portals) = @_;
	my %patients;
	for my $portal (@portals)
	{
		my $pts = $portal->state->{practices}{$practice}{patients} || {};
		for my $pid (keys %$pts)
		{
			my $items = $pts->{$pid}{items} || {};
			for my $src (keys %$items)
			{
				$patients{$pid}{items}{$src}{$_} = $items->{$src}{$_}
				  for keys %{ $items->{$src} };
			}
		}
	}
	return bless { state => { practices => { $practice => { patients => \%patients } } } }, $class;
}

sub state { return $_[0]->{state} }

package main;

my %token = (a => 'tok-a-' . int(rand(1e9)), b => 'tok-b-' . int(rand(1e9)),
	c => 'tok-c-' . int(rand(1e9)));
my $refused_token = 'refused-' . int(rand(1e9));
my $dir = PostgreSQL::Test::Utils::tempdir;
my %token_file;
for my $k (qw(a b))
{
	$token_file{$k} = "$dir/token_$k";
	open(my $fh, '>', $token_file{$k}) or die $!;
	print $fh "$token{$k}\n";
	close $fh;
	chmod 0600, $token_file{$k};
}

# portal C is the cluster's (postgresql.conf), A and B the practices' own
my %portal = map { $_ => PortalSyncTest::Portal->start } qw(a b c);
$portal{$_}->modes({ mode => 'require_token', token => $token{$_} }) for qw(a b c);
# B takes plain JSON only: a compressed body would be answered 415
$portal{b}->modes({ mode => 'require_token', token => $token{b} }, { mode => 'refuse_gzip' });
my %url = map { $_ => $portal{$_}->url . '/events' } qw(a b c);

my $node = ps_new_node('per_database_settings', $portal{c}, conf => qq{
portal_sync.auth_token = '$token{c}'
portal_sync.compression = 'off'
});

# The settings of each practice, given before its extension is created.
$node->safe_psql('postgres', qq{
	CREATE DATABASE clinic_a;
	ALTER DATABASE clinic_a SET portal_sync.endpoint = '$url{a}';
	ALTER DATABASE clinic_a SET portal_sync.auth_token_file = '$token_file{a}';
	ALTER DATABASE clinic_a SET portal_sync.compression = 'gzip';
	CREATE DATABASE clinic_b;
	ALTER DATABASE clinic_b SET portal_sync.endpoint = '$url{b}';
	ALTER DATABASE clinic_b SET portal_sync.auth_token_file = '$token_file{b}';
	ALTER DATABASE clinic_b SET portal_sync.compression = 'off';});
ps_setup_db($node, $_) for qw(clinic_a clinic_b);

sub sql { my ($db, $q) = @_; return $node->safe_psql($db, $q) }

# Requests of one practice, in order, each with its portal's letter.
sub requests_of
{
	my ($practice, @letters) = @_;
	my @out;
	my $n = 0;
	for my $l (@letters)
	{
		for my $r (sort { $a->{n} <=> $b->{n} } @{ $portal{$l}->requests })
		{
			next unless ($r->{practice_id} // '') eq $practice;
			# numbered across portals, in the order they were sent
			push @out, { %$r, n => $n++, portal => $l };
		}
	}
	return \@out;
}

# Every request a portal saw came from one practice with one token.
sub check_portal_requests
{
	my ($l, $name, %want) = @_;
	my $reqs = $portal{$l}->requests;
	ok(@$reqs > 0, "$name: portal $l received requests");
	my @foreign = grep { !$want{practices}{ $_->{practice_id} // '' } } @$reqs;
	is(scalar @foreign, 0, "$name: portal $l received nothing of another practice")
	  or diag(join(' ', map { $_->{practice_id} // '?' } @foreign[ 0 .. ($#foreign > 5 ? 5 : $#foreign) ]));
	is(scalar(grep { ($_->{headers}{Authorization} // '') ne "Bearer $token{$l}" } @$reqs), 0,
		"$name: portal $l: every request carries its own token");
	is(scalar(grep { $_->{status} eq '401' || $_->{status} eq '415' } @$reqs), 0,
		"$name: portal $l refused nothing");
	my @practices = sort keys %{ $portal{$l}->state->{practices} };
	is_deeply(\@practices, [ sort keys %{ $want{practices} } ],
		"$name: portal $l holds only its practices");
}

# ---------------------------------------------------------------- each its own
for my $db (qw(clinic_a clinic_b postgres))
{
	my $n = $db eq 'clinic_a' ? 12 : $db eq 'clinic_b' ? 9 : 5;
	sql($db, qq{SELECT pstest.make_patient(i, 2) FROM generate_series(1, $n) i;
		SELECT pstest.book(i) FROM generate_series(1, $n - 2) i;});
}
# writers in both practices while the first deliveries run
my %writer = map { $_ => $node->background_psql($_) } qw(clinic_a clinic_b);
for my $i (1 .. 10)
{
	for my $db (qw(clinic_a clinic_b))
	{
		$writer{$db}->query_safe(qq{UPDATE ehr.medication SET dose = 'first $i' WHERE patient_id = $i});
	}
}
ps_check_settled($node, 'clinic_a', $portal{a}, 'clinic_a on its portal');
ps_check_settled($node, 'clinic_b', $portal{b}, 'clinic_b on its portal');
ps_check_settled($node, 'postgres', $portal{c}, 'the cluster\'s portal');
check_portal_requests('a', 'own portals', practices => { clinic_a => 1 });
check_portal_requests('b', 'own portals', practices => { clinic_b => 1 });
check_portal_requests('c', 'own portals', practices => { postgres => 1 });
is(scalar(grep { ($_->{encoding} // '') ne 'gzip' } @{ $portal{a}->requests }), 0,
	'clinic_a (compression = gzip for the database): every body compressed');
is(scalar(grep { $_->{encoding} } @{ $portal{b}->requests }), 0,
	'clinic_b (compression = off): no body compressed');
is(scalar(grep { $_->{encoding} } @{ $portal{c}->requests }), 0,
	'the cluster (compression = off in postgresql.conf): no body compressed');
is(sql('clinic_a', 'SHOW portal_sync.endpoint'), $url{a}, 'SHOW in clinic_a gives its endpoint');

# ---------------------------------------------------------------- moved at once
# clinic_a moves to portal B (and its token), in one transaction, while
# both practices keep writing; the worker reads its settings at the commit.
my $pid_a = ps_worker_pid($node, 'clinic_a');
for my $i (1 .. 30)
{
	my $p = 1 + $i % 12;
	$writer{clinic_a}->query_safe(qq{UPDATE ehr.medication SET dose = 'move $i' WHERE patient_id = $p});
	$writer{clinic_b}->query_safe(qq{UPDATE ehr.allergy SET reaction = 'move $i' WHERE patient_id = 1 + $i % 9});
	$writer{clinic_a}->query_safe(q{SELECT pstest.book(11)}) if $i == 20;
	if ($i == 10)
	{
		sql('postgres', qq{BEGIN;
			ALTER DATABASE clinic_a SET portal_sync.endpoint = '$url{b}';
			ALTER DATABASE clinic_a SET portal_sync.auth_token_file = '$token_file{b}';
			ALTER DATABASE clinic_a SET portal_sync.compression = 'off';
			COMMIT;});
	}
	usleep(30_000);
}
ok(ps_wait_drained($node, 'clinic_a'), 'moved: clinic_a drained');
ok(ps_wait_drained($node, 'clinic_b'), 'moved: clinic_b drained');
is(ps_worker_pid($node, 'clinic_a'), $pid_a, 'moved: by the same worker, not restarted');
my $items_b = ps_portal_items($portal{b}, 'clinic_a');
my @doses = map { $_->{dose} } map { values %{ $items_b->{$_}{medication} || {} } } keys %$items_b;
ok((grep { $_ eq 'move 30' } @doses), 'moved: a change written after the move is on portal B');
ok(!grep({ $_->{practice_id} eq 'clinic_a' && $_->{events} && grep { ($_->{data}{dose} // '') eq 'move 30' } @{ $_->{events} } }
		@{ $portal{a}->requests(full => 1) }),
	'moved: and not on portal A');
# the two portals together hold exactly what clinic_a shares
ps_compare_state($node, 'clinic_a', MovedPractice->new('clinic_a', $portal{a}, $portal{b}),
	'moved: portals A and B together');
my $reqs = requests_of('clinic_a', 'a', 'b');
diag(sprintf('moved: clinic_a sent %d requests to portal A, %d to portal B',
		scalar(grep { $_->{portal} eq 'a' } @$reqs), scalar(grep { $_->{portal} eq 'b' } @$reqs)));
ps_check_send_order($reqs, 'moved: across both portals');
ps_check_event_ids_stable($reqs, 'moved: across both portals');
my %seen;
my @twice = grep { $seen{ $_->{event_id} }++ } @{ ps_accepted_events($reqs) };
is(scalar @twice, 0, 'moved: no event accepted by both portals, or twice');
is(scalar(@{ ps_dead_letters($node, 'clinic_a') }), 0, 'moved: nothing dead-lettered');
ps_check_portal_invariants($portal{b}, 'moved: portal B');
check_portal_requests('b', 'moved', practices => { clinic_a => 1, clinic_b => 1 });
check_portal_requests('a', 'moved', practices => { clinic_a => 1 });
is(scalar(grep { $_->{encoding} && $_->{practice_id} eq 'clinic_a' } @{ $portal{b}->requests }), 0,
	'moved: clinic_a sends plain bodies to portal B');
ps_check_settled($node, 'clinic_b', $portal{b}, 'moved: clinic_b unaffected');

# ---------------------------------------------------------------- RESET
# RESET at database level: the cluster's endpoint, token and compression
my $mark_c = ps_nreq($portal{c});
sql('postgres', q{ALTER DATABASE clinic_a RESET portal_sync.endpoint;
	ALTER DATABASE clinic_a RESET portal_sync.auth_token_file;
	ALTER DATABASE clinic_a RESET portal_sync.compression;});
$writer{clinic_a}->query_safe(q{UPDATE ehr.medication SET dose = 'after reset' WHERE patient_id = 3});
ok(ps_wait_drained($node, 'clinic_a'), 'RESET: clinic_a drained');
ok(ps_wait_until(sub {
			my $meds = ps_portal_items($portal{c}, 'clinic_a')->{3}{medication} || {};
			grep { $_->{dose} eq 'after reset' } values %$meds;
		}, 'on the cluster\'s portal', 30),
	'RESET: the change goes to the cluster\'s portal');
my @c_a = grep { $_->{practice_id} eq 'clinic_a' } @{ $portal{c}->requests(since => $mark_c) };
ok(@c_a > 0, 'RESET: clinic_a sent to portal C');
is(scalar(grep { $_->{status} ne '200' } @c_a), 0, 'RESET: with the cluster\'s token, accepted');
is(scalar(grep { $_->{encoding} } @c_a), 0, 'RESET: with the cluster\'s compression (off)');
is(ps_worker_pid($node, 'clinic_a'), $pid_a, 'RESET: still the same worker');

# ---------------------------------------------------------------- unconfigured
sql('postgres', q{ALTER DATABASE clinic_b SET portal_sync.endpoint = ''});
ok(ps_wait_until(sub { ps_status($node, 'clinic_b')->{state} eq 'unconfigured' }, 'unconfigured', 30),
	'an empty endpoint for clinic_b: unconfigured');
$writer{clinic_b}->query_safe(q{UPDATE ehr.allergy SET reaction = 'queued' WHERE patient_id = 2});
$writer{clinic_a}->query_safe(q{UPDATE ehr.allergy SET reaction = 'not queued' WHERE patient_id = 2});
ok(ps_wait_drained($node, 'clinic_a'), 'unconfigured: clinic_a keeps delivering');
isnt(ps_status($node, 'clinic_a')->{state}, 'unconfigured', 'unconfigured: clinic_a is not');
isnt(ps_status($node, 'postgres')->{state}, 'unconfigured', 'unconfigured: postgres is not');
cmp_ok(ps_status($node, 'clinic_b')->{pending_events}, '>', 0, 'unconfigured: clinic_b events queue');
like(ps_status($node, 'clinic_b')->{last_error} // '', qr/endpoint/, 'unconfigured: last_error says why');
like(sql('clinic_b', q{SELECT ok || ' ' || detail FROM portal_sync.explain('2') WHERE step = 'worker'}),
	qr/unconfigured/, 'unconfigured: explain says so');
sql('postgres', qq{ALTER DATABASE clinic_b SET portal_sync.endpoint = '$url{b}'});
ps_check_settled($node, 'clinic_b', $portal{b}, 'endpoint given again');

# ---------------------------------------------------------------- refused
sub refused
{
	my ($db, $q) = @_;
	my ($ret, $out, $err) = $node->psql($db,
		"SET log_statement = 'none';\n\\set VERBOSITY verbose\n$q");
	return ($ret, $err);
}
my $settings_before = sql('postgres',
	q{SELECT string_agg(setconfig::text, ';' ORDER BY setdatabase, setrole) FROM pg_db_role_setting});
for my $case (
	[ 'ALTER DATABASE', "ALTER DATABASE clinic_a SET portal_sync.auth_token = '$refused_token'" ],
	[ 'ALTER DATABASE', "ALTER DATABASE clinic_a SET portal_sync.auth_token TO '$refused_token'" ],
	[ 'ALTER ROLE', "ALTER ROLE postgres SET portal_sync.auth_token = '$refused_token'" ],
	[ 'ALTER ROLE', "ALTER ROLE ALL IN DATABASE clinic_a SET portal_sync.auth_token = '$refused_token'" ])
{
	my ($cmd, $q) = @$case;
	my ($ret, $err) = refused('postgres', $q);
	isnt($ret, 0, "auth_token: refused ($cmd)");
	like($err, qr/ERROR:  55P02: parameter "portal_sync.auth_token" cannot be set with $cmd/,
		"auth_token: $cmd: SQLSTATE 55P02 and a message");
	like($err, qr/HINT:  .*portal_sync.auth_token_file/, "auth_token: $cmd: the hint points to auth_token_file");
	unlike($err, qr/\Q$refused_token\E/, "auth_token: $cmd: the token is not in the error");
}
for my $q ("ALTER ROLE postgres SET portal_sync.endpoint = '$url{a}'",
	"ALTER ROLE postgres IN DATABASE clinic_b SET portal_sync.auth_token_file = '$token_file{a}'",
	"ALTER ROLE ALL SET portal_sync.compression = 'gzip'")
{
	my ($ret, $err) = refused('postgres', $q);
	isnt($ret, 0, "refused for a role: $q");
	like($err, qr/ERROR:  55P02: parameter "portal_sync\.\w+" cannot be set for a role.*HINT:  Use ALTER DATABASE/s,
		"refused for a role, with SQLSTATE and hint: $q");
}

# a non-superuser, even the database's owner, cannot set them
sql('postgres', q{CREATE ROLE practice_owner LOGIN;
	ALTER DATABASE clinic_b OWNER TO practice_owner;});
for my $q ("ALTER DATABASE clinic_b SET portal_sync.endpoint = '$url{a}'",
	"ALTER DATABASE clinic_b SET portal_sync.auth_token_file = '$token_file{a}'",
	"ALTER DATABASE clinic_b SET portal_sync.ca_file = '/tmp/ca.pem'",
	"ALTER DATABASE clinic_b SET portal_sync.compression = 'gzip'",
	"ALTER DATABASE clinic_b RESET portal_sync.endpoint",
	"SET portal_sync.endpoint = '$url{a}'")
{
	my ($ret, $out, $err) = $node->psql('clinic_b', "\\set VERBOSITY verbose\n$q",
		extra_params => [ '-U', 'practice_owner' ]);
	isnt($ret, 0, "non-superuser refused: $q");
	like($err, qr/ERROR:  42501:/, "non-superuser: SQLSTATE 42501: $q");
}
is(sql('postgres',
		q{SELECT string_agg(setconfig::text, ';' ORDER BY setdatabase, setrole) FROM pg_db_role_setting}),
	$settings_before, 'nothing refused was stored');

# ---------------------------------------------------------------- 415
# clinic_b asks for gzip, which portal B refuses: plain bodies from then on,
# until the database's compression changes (as until a reload)
my $mark_b = ps_nreq($portal{b});
sql('postgres', q{ALTER DATABASE clinic_b SET portal_sync.compression = 'gzip'});
$writer{clinic_b}->query_safe(q{UPDATE ehr.medication SET dose = 'gzip refused' WHERE patient_id = 4});
ok(ps_wait_drained($node, 'clinic_b'), '415: drained');
my @since = @{ $portal{b}->requests(since => $mark_b) };
ok((grep { $_->{status} eq '415' && $_->{encoding} } @since), '415: portal B refused a gzip body of clinic_b');
like(ps_status($node, 'clinic_b')->{last_error} // '', qr/415.*uncompressed/, '415: status.last_error says why');
$mark_b = ps_nreq($portal{b});
$writer{clinic_b}->query_safe(q{UPDATE ehr.medication SET dose = 'plain after 415' WHERE patient_id = 4});
ok(ps_wait_drained($node, 'clinic_b'), '415: drained again');
@since = grep { $_->{practice_id} eq 'clinic_b' } @{ $portal{b}->requests(since => $mark_b) };
ok(@since && !grep({ $_->{encoding} } @since), '415: clinic_b keeps sending plain bodies');
# portal B takes gzip now; a change of the database's compression ends the fallback
$portal{b}->modes({ mode => 'require_token', token => $token{b} });
sql('postgres', q{ALTER DATABASE clinic_b SET portal_sync.compression = 'off'});
sql('postgres', q{ALTER DATABASE clinic_b SET portal_sync.compression = 'gzip'});
$mark_b = ps_nreq($portal{b});
$writer{clinic_b}->query_safe(q{UPDATE ehr.medication SET dose = 'gzip again' WHERE patient_id = 4});
ok(ps_wait_drained($node, 'clinic_b'), 'gzip again: drained');
@since = grep { $_->{practice_id} eq 'clinic_b' } @{ $portal{b}->requests(since => $mark_b) };
ok(@since && !grep({ ($_->{encoding} // '') ne 'gzip' || $_->{status} ne '200' } @since),
	'gzip again: clinic_b\'s bodies are compressed and accepted, without a reload');

# still delivering after all of it, with the settings of each database
$writer{clinic_b}->query_safe(q{UPDATE ehr.medication SET dose = 'last' WHERE patient_id = 4});
ps_check_settled($node, 'clinic_b', $portal{b}, 'at the end');
is(ps_worker_pid($node, 'clinic_a'), $pid_a, 'at the end: clinic_a\'s worker was never restarted');

# ---------------------------------------------------------------- ca_file
# clinic_b moves to an HTTPS portal whose CA only its own ca_file names
sub run_quiet
{
	my ($out, $err) = ('', '');
	IPC::Run::run(\@_, '>', \$out, '2>', \$err) or BAIL_OUT("@_ failed: $err");
}
run_quiet('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', "$dir/ca.key",
	'-out', "$dir/ca.crt", '-days', '2', '-subj', '/CN=portal_sync test CA');
run_quiet('openssl', 'req', '-newkey', 'rsa:2048', '-nodes', '-keyout', "$dir/tls.key",
	'-out', "$dir/tls.csr", '-subj', '/CN=127.0.0.1');
PostgreSQL::Test::Utils::append_to_file("$dir/tls.ext", "subjectAltName=IP:127.0.0.1\n");
run_quiet('openssl', 'x509', '-req', '-in', "$dir/tls.csr", '-CA', "$dir/ca.crt", '-CAkey',
	"$dir/ca.key", '-CAcreateserial', '-out', "$dir/tls.crt", '-days', '2', '-extfile', "$dir/tls.ext");
$portal{d} = PortalSyncTest::Portal->start(tls_cert => "$dir/tls.crt", tls_key => "$dir/tls.key");
$portal{d}->modes({ mode => 'require_token', token => $token{b} });
sql('postgres', "ALTER DATABASE clinic_b SET portal_sync.endpoint = '" . $portal{d}->url . "/events'");
$writer{clinic_b}->query_safe(q{UPDATE ehr.medication SET dose = 'over TLS' WHERE patient_id = 6});
ok(ps_wait_until(sub { ps_status($node, 'clinic_b')->{consecutive_failures} >= 1 }, 'TLS failure', 60),
	'ca_file: without it, the HTTPS portal is not trusted');
like(ps_status($node, 'clinic_b')->{last_error} // '', qr/certificate|SSL|TLS|verif/i,
	'ca_file: last_error names the TLS failure');
is(scalar @{ $portal{d}->requests }, 0, 'ca_file: nothing delivered to an unverified peer');
sql('postgres', "ALTER DATABASE clinic_b SET portal_sync.ca_file = '$dir/ca.crt'");
ok(ps_wait_drained($node, 'clinic_b'), 'ca_file: the database\'s own CA: drained');
ok(ps_wait_until(sub {
			my $meds = ps_portal_items($portal{d}, 'clinic_b')->{6}{medication} || {};
			grep { $_->{dose} eq 'over TLS' } values %$meds;
		}, 'over TLS', 30),
	'ca_file: the change is on the HTTPS portal');
is(scalar(grep { $_->{practice_id} ne 'clinic_b' || $_->{status} ne '200' } @{ $portal{d}->requests }), 0,
	'ca_file: the HTTPS portal received clinic_b only, all accepted');
is(ps_worker_pid($node, 'clinic_a'), $pid_a, 'ca_file: clinic_a\'s worker untouched');

$writer{$_}->quit for keys %writer;
$node->stop;
my $log = slurp_file($node->logfile);
for my $k (sort keys %token)
{
	unlike($log, qr/\Q$token{$k}\E/, "token $k never in the server log");
}
unlike($log, qr/\Q$refused_token\E/, 'the refused token never in the server log');
$portal{$_}->stop for keys %portal;
done_testing();
