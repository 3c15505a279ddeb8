#!/usr/bin/perl
#
# Samples the memory of one process from /proc/PID/status at a fixed
# interval, tagging each sample with the phase named in a file, until it is
# sent SIGTERM or the process is gone.  Used by test/leakcheck.sh.
#
#   perl test/lib/sample_memory.pl PID PHASE_FILE OUT_FILE [INTERVAL_MS]
#
# PHASE_FILE holds one line, the current phase (the caller replaces it
# atomically with rename); OUT_FILE gets one line per sample:
#
#   <ms since start> <phase> <RssAnon kB> <RssFile kB> <RssShmem kB>
#
# and "<ms> <phase> gone" as its last line when the process exits.  Lines
# are flushed as written, so the file can be read while sampling goes on.
#
# Copyright (c) 2026, portal_sync developers

use strict;
use warnings;
use IO::Handle;
use Time::HiRes qw(time sleep);

my ($pid, $phase_file, $out_file, $interval_ms) = @ARGV;
die "usage: $0 PID PHASE_FILE OUT_FILE [INTERVAL_MS]\n"
  unless defined $out_file && $pid =~ /^\d+$/;
$interval_ms ||= 100;

open(my $out, '>', $out_file) or die "$out_file: $!\n";
$out->autoflush(1);
my $stop = 0;
$SIG{TERM} = $SIG{INT} = sub { $stop = 1 };

my $t0 = time();
my $next = $t0;
my $phase = 'start';
while (!$stop)
{
	if (open(my $ph, '<', $phase_file))
	{
		my $line = <$ph>;
		close $ph;
		if (defined $line)
		{
			chomp $line;
			$phase = $line if $line ne '';
		}
	}
	my %kb;
	my $ms = int((time() - $t0) * 1000);
	if (open(my $st, '<', "/proc/$pid/status"))
	{
		while (<$st>)
		{
			$kb{$1} = $2 if /^(RssAnon|RssFile|RssShmem):\s+(\d+)/;
		}
		close $st;
	}
	if (!defined $kb{RssAnon})
	{
		print $out "$ms $phase gone\n";
		last;
	}
	print $out "$ms $phase $kb{RssAnon} $kb{RssFile} $kb{RssShmem}\n";

	# a fixed rate, whatever the time the sample took
	$next += $interval_ms / 1000;
	my $now = time();
	$next = $now if $next < $now - 1;
	sleep($next - $now) if $next > $now;
}
close $out;
exit 0;
