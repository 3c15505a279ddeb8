
# Copyright (c) 2026, portal_sync developers
#
# The alerting rules shipped in docs/monitoring/alerts.yml are a valid
# Prometheus rule file (promtool check rules), and their unit tests
# (docs/monitoring/alerts_test.yml, promtool test rules) pass: each alert
# fires on a synthetic series of a failing practice database and stays
# quiet on a healthy one.  The alerts must also use only metric names the
# queries file for postgres_exporter defines.
#
# Skipped only when promtool (Debian package prometheus) is absent
# (PS_PROMTOOL names another one).

use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use PortalSyncTest;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

my $promtool = $ENV{PS_PROMTOOL} // '/usr/bin/promtool';
plan skip_all => "$promtool is not installed (Debian package prometheus)"
  unless -x $promtool;

my $dir = PortalSyncTest::ps_root() . '/docs/monitoring';

# promtool's exit code and output, run in docs/monitoring (the unit-test
# file names alerts.yml relative to itself).
sub promtool
{
	my @args = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $promtool, @args ], '<', \undef, '>', \$out, '2>', \$err,
		init => sub { chdir($dir) or die "chdir $dir: $!" });
	return ($? >> 8, "$out$err");
}

my ($rc, $out) = promtool('check', 'rules', 'alerts.yml');
is($rc, 0, 'promtool check rules alerts.yml') or diag($out);
like($out, qr/SUCCESS: (\d+) rules found/, 'the rules are found');

($rc, $out) = promtool('test', 'rules', 'alerts_test.yml');
is($rc, 0, 'promtool test rules alerts_test.yml') or diag($out);
like($out, qr/SUCCESS/, 'every alert unit test passes');

# Every alert of alerts.yml has a unit test that expects it to fire.
my $rules = slurp_file("$dir/alerts.yml");
my $tests = slurp_file("$dir/alerts_test.yml");
my @alerts = $rules =~ /^\s*- alert: (\w+)$/mg;
cmp_ok(scalar @alerts, '>=', 5, 'alerts.yml defines the alerts (' . join(', ', @alerts) . ')');
for my $alert (@alerts)
{
	like($tests, qr/alertname: \Q$alert\E\n\s+exp_alerts:\n\s+- exp_labels/,
		"$alert: a unit test expects it to fire");
}

# The portal_sync series the rules use are the ones the exporter makes of
# the queries file (namespace_column).
my $queries = slurp_file("$dir/postgres_exporter-queries.yaml");
my %defined;
my $namespace;
for my $line (split /\n/, $queries)
{
	$namespace = $1 if $line =~ /^(\w+):\s*$/;
	$defined{"${namespace}_$1"} = 1 if $line =~ /^    - (\w+):\s*$/ && $namespace;
}
my %used = map { $_ => 1 } $rules =~ /\b(portal_sync_\w+)/g;
for my $metric (sort keys %used)
{
	ok($defined{$metric}, "alerts.yml uses $metric, which the queries file defines");
}

done_testing();
