# Sourced by the scripts under test/: copy the source tree somewhere the
# postgres user can build and read it (initdb, the test servers and the
# fuzzers run as postgres; the checkout may sit in root's home, and
# chowning it would make git refuse to work in it).
#
#   copy_source_tree SRC DEST OWNER
#
# Copies SRC into DEST (created if missing; files already there are
# overwritten, others kept), leaving out git metadata and earlier build and
# test output, and gives DEST to OWNER.

copy_source_tree() {
	local src=$1 dest=$2 owner=$3
	mkdir -p "$dest"
	tar -C "$src" -cf - \
		--exclude=./.git --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
		--exclude=./results --exclude=./tmp_check --exclude=./tmp_check_log \
		--exclude=./log --exclude=./regression.diffs --exclude=./regression.out . |
		tar -C "$dest" -xf -
	chown -R "$owner" "$dest"
}
