/*-------------------------------------------------------------------------
 *
 * copies.c
 *		Which database a portal_sync stream belongs to, and adopt().
 *
 * A copy of a database (CREATE DATABASE ... TEMPLATE, a restore of a dump
 * into another database or cluster) carries the original's installation
 * id: delivering from it would send the copy's data under the original's
 * event ids, to the original's portal.  So the installation records the
 * database it belongs to: its cluster's system identifier and its oid.  A
 * restart, a crash or a standby's promotion keeps both; a copy has another
 * oid or another cluster.  A copy keeps capturing, and its worker delivers
 * nothing until a superuser calls portal_sync.adopt(), which gives the
 * copy an installation id of its own and resends, as resync_all() does,
 * every enrolled patient's record and every patient's insurance under it.
 * A cluster upgraded with pg_upgrade is a copy too; adopt() records again
 * the capture triggers' column dependencies, which pg_upgrade does not
 * carry.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "portal_sync.h"

PG_FUNCTION_INFO_V1(portal_sync_database_identity);
PG_FUNCTION_INFO_V1(portal_sync_adopt);

/*
 * This database, as an installation records it: "<system identifier>:<oid>".
 */
const char *
database_identity(void)
{
	static char identity[64];

	if (identity[0] == '\0')
		snprintf(identity, sizeof(identity), UINT64_FORMAT ":%u",
				 GetSystemIdentifier(), MyDatabaseId);
	return identity;
}

/*
 * portal_sync.database_identity() RETURNS text
 *
 * The default of portal_sync.installation.database_identity.
 */
Datum
portal_sync_database_identity(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(database_identity()));
}

/*
 * portal_sync.adopt() RETURNS void
 *
 * Make this copy a stream of its own: a new installation id (its event ids
 * can never collide with the original's), this database as its owner, seqs
 * above any the original may have sent after the copy was made, and
 * resync_all(), so that whichever portal it delivers to gets the copy's
 * whole record.  Superuser only; refused in a
 * database that is not a copy.
 */
Datum
portal_sync_adopt(PG_FUNCTION_ARGS)
{
	ExtensionOwnerContext owner;
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(database_identity())};

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only a superuser may call portal_sync.adopt()")));

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_with_args("UPDATE portal_sync.installation"
							  " SET install_id = pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text, '-', ''),"
							  "     database_identity = $1"
							  " WHERE database_identity IS DISTINCT FROM $1",
							  1, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "adopting the installation failed");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this database is not a copy: its portal_sync stream is its own"),
				 errhint("portal_sync.adopt() is for a database copied with CREATE DATABASE ... TEMPLATE or restored from a dump, whose status says needs_adoption.")));
	/* the original may have sent on after the dump: seqs go on above it */
	if (SPI_execute("SELECT portal_sync.advance_seq_to_clock()", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "moving the copy's seqs up failed");
	repair_capture_dependencies();
	/* as resync_all(): every enrolled patient's record, everyone's insurance */
	if (SPI_execute("SELECT portal_sync.resync_all()", false, 0) != SPI_OK_SELECT)
		elog(ERROR, "queueing the copy's snapshots failed");
	SPI_finish();
	restore_user(&owner);
	/* wake the worker at commit, whatever it is doing */
	outbox_note_settings_changed();
	PG_RETURN_VOID();
}
