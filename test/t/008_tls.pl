
# Copyright (c) 2026, portal_sync developers
#
# HTTPS delivery (SPEC 2, 5): peer and host are always verified; ca_file
# names the CA; TLS errors are retried with nothing dead-lettered; plain
# http:// is refused except to loopback unless allow_insecure_http is on.

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $dir = PostgreSQL::Test::Utils::tempdir();

sub run_ok_quiet
{
	my @cmd = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '>', \$out, '2>', \$err)
	  or BAIL_OUT("@cmd failed: $err");
}

# A test CA, a server certificate for 127.0.0.1 and one for another host.
run_ok_quiet('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
	'-keyout', "$dir/ca.key", '-out', "$dir/ca.crt", '-days', '2',
	'-subj', '/CN=portal_sync test CA');
for my $c ([ 'good', 'IP:127.0.0.1,DNS:localhost' ], [ 'wronghost', 'DNS:portal.example.org' ])
{
	my ($name, $san) = @$c;
	run_ok_quiet('openssl', 'req', '-newkey', 'rsa:2048', '-nodes',
		'-keyout', "$dir/$name.key", '-out', "$dir/$name.csr",
		'-subj', "/CN=$name");
	PostgreSQL::Test::Utils::append_to_file("$dir/$name.ext", "subjectAltName=$san\n");
	run_ok_quiet('openssl', 'x509', '-req', '-in', "$dir/$name.csr",
		'-CA', "$dir/ca.crt", '-CAkey', "$dir/ca.key", '-CAcreateserial',
		'-out', "$dir/$name.crt", '-days', '2', '-extfile', "$dir/$name.ext");
}

my $portal = PortalSyncTest::Portal->start(tls_cert => "$dir/good.crt", tls_key => "$dir/good.key");
my $wrong = PortalSyncTest::Portal->start(tls_cert => "$dir/wronghost.crt", tls_key => "$dir/wronghost.key");
my $node = ps_new_node('tls', $portal);    # endpoint https://127.0.0.1:port/events
my $db = 'postgres';

sub one { return $node->safe_psql($db, $_[0]) }

# No ca_file: the portal's certificate is not trusted.
one(q{SELECT pstest.make_patient(i) FROM generate_series(1, 4) i; SELECT pstest.book(1);});
ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 2 }, 'TLS failures', 60),
	'unknown CA: delivery fails and is retried');
my $st = ps_status($node, $db);
like($st->{last_error} // '', qr/certificate|SSL|TLS|verif/i, 'last_error names the TLS failure')
  or diag('last_error: ' . ($st->{last_error} // 'NULL'));
is(scalar @{ $portal->requests }, 0, 'nothing delivered to an unverified peer');
is($st->{dead_letters}, 0, 'nothing dead-lettered on TLS errors');

ps_set_conf($node, 'portal_sync.ca_file' => "$dir/ca.crt");
ok(ps_wait_drained($node, $db), 'ca_file set by reload: drained');
ps_compare_state($node, $db, $portal, 'over TLS');

# Host verification: a certificate from the right CA for another host.
ps_set_conf($node, 'portal_sync.endpoint' => $wrong->url . '/events');
one(q{UPDATE ehr.medication SET dose = 'tls' WHERE patient_id = 1});
ok(ps_wait_until(sub { ps_status($node, $db)->{consecutive_failures} >= 2 }, 'host mismatch failures', 60),
	'certificate for another host: refused and retried');
is(scalar @{ $wrong->requests }, 0, 'nothing delivered to a peer with the wrong host name');
ps_set_conf($node, 'portal_sync.endpoint' => $portal->url . '/events');
ok(ps_wait_drained($node, $db), 'back to the right host: drained');
is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');
ps_compare_state($node, $db, $portal, 'after host mismatch');

# Plain http:// to a non-loopback address.
my ($ip) = grep { $_ !~ /^127\./ && $_ !~ /:/ } split /\s+/, `hostname -I 2>/dev/null` // '';
SKIP:
{
	skip 'no non-loopback IPv4 address', 6 unless $ip;
	my $plain = PortalSyncTest::Portal->start(host => '0.0.0.0');
	my $err_at0 = ps_status($node, $db)->{last_error_at} // '';
	ps_set_conf($node, 'portal_sync.endpoint' => "http://$ip:" . $plain->port . '/events');
	one(q{UPDATE ehr.medication SET dose = 'insecure' WHERE patient_id = 1});
	ok(ps_wait_until(sub {
				my $s = ps_status($node, $db);
				$s->{pending_events} > 0 && ($s->{state} eq 'unconfigured' || ($s->{last_error_at} // '') ne $err_at0)
			}, 'refusal reported', 30),
		'http:// to a non-loopback address: refused');
	like(ps_status($node, $db)->{last_error} // '', qr/http|insecure|allow_insecure_http/i,
		'last_error says why');
	is(scalar @{ $plain->requests }, 0, 'nothing sent over plain http to a non-loopback address');
	ps_set_conf($node, 'portal_sync.allow_insecure_http' => 'on');
	ok(ps_wait_drained($node, $db), 'allow_insecure_http on: drained');
	ok(scalar @{ $plain->requests }, 'sent once allowed');
	is(ps_status($node, $db)->{dead_letters}, 0, 'nothing dead-lettered');
	ps_set_conf($node, 'portal_sync.allow_insecure_http' => undef,
		'portal_sync.endpoint' => $portal->url . '/events');
	$plain->stop;
}

ps_check_portal_invariants($portal, 'tls');
$node->stop;
$portal->stop;
$wrong->stop;
done_testing();
