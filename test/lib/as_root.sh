# Sourced by the scripts under test/ that need root (installing packages,
# installing the extension): the same command then works pasted into a root
# shell on a fresh Debian machine, which has no sudo, and in a user's shell
# with sudo.
#
#   run_as_root SCRIPT ARG...
#
# Returns at once when already root.  Otherwise re-runs SCRIPT with its
# arguments under `sudo -E bash` (the environment, e.g.
# PORTAL_SYNC_MEMORY_CHECKS=0, is kept), or exits 1 with a clear message
# when there is no sudo.  Call it first, before the script changes anything.

run_as_root() {
	local script=$1
	shift
	[ "$(id -u)" -eq 0 ] && return 0
	if command -v sudo >/dev/null 2>&1; then
		printf '%s: not root: re-running under sudo\n' "$(basename "$script")" >&2
		exec sudo -E bash "$script" "$@"
	fi
	printf '%s: needs root (it installs Debian packages), and sudo is not installed:\n' \
		"$(basename "$script")" >&2
	printf '    run it from a root shell (su -), from the top of the repository: bash %s\n' \
		"$script" >&2
	exit 1
}
