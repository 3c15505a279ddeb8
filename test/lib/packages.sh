# Sourced by the scripts under test/: install the Debian packages they need.
#
#   install_packages LOG PACKAGE...
#
# Installs the packages that are missing (apt-get update first), with the
# output in LOG.  Package scripts are kept from starting services (the
# Debian cluster 15/main, nginx on port 80): the scripts start their own
# servers.  Only a policy-rc.d created here is removed afterwards.  Needs
# root; calls die() (defined by the caller) on failure.

install_packages() {
	local log=$1 missing=() p
	shift
	for p in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$p")
		fi
	done
	if [ "${#missing[@]}" -eq 0 ]; then
		echo "   all packages present"
		return
	fi
	echo "   installing: ${missing[*]}"
	local made_policy=0
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	local rc=0
	{ DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 &&
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
		>>"$log" 2>&1; } || rc=$?
	[ "$made_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
	if [ "$rc" -ne 0 ]; then
		tail -n 20 "$log" >&2
		die "apt-get failed ($rc)"
	fi
}
