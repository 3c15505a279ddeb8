/*-------------------------------------------------------------------------
 *
 * database_hook.c
 *		Getting the delivery worker out of the way of commands that need
 *		a database without connections.
 *
 * DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE and CREATE
 * DATABASE ... TEMPLATE refuse to run while another session is connected
 * to the database, and a delivery worker is such a session.  Before those
 * commands run, the worker of the database is asked to exit and the
 * launcher is told not to start it again for a while; the command itself
 * then waits the few milliseconds the worker needs to leave.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"

/* How long the launcher leaves such a database alone. */
#define DATABASE_PAUSE_MS	(60 * 1000)

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * The database a utility statement needs without connections, or
 * InvalidOid.
 */
static Oid
database_needing_exclusivity(Node *statement)
{
	const char *name = NULL;

	if (IsA(statement, DropdbStmt))
		name = ((DropdbStmt *) statement)->dbname;
	else if (IsA(statement, RenameStmt) &&
			 ((RenameStmt *) statement)->renameType == OBJECT_DATABASE)
		name = ((RenameStmt *) statement)->subname;
	else if (IsA(statement, AlterDatabaseStmt))
	{
		ListCell   *lc;

		foreach(lc, ((AlterDatabaseStmt *) statement)->options)
		{
			DefElem    *option = lfirst(lc);

			if (strcmp(option->defname, "tablespace") == 0)
				name = ((AlterDatabaseStmt *) statement)->dbname;
		}
	}
	else if (IsA(statement, CreatedbStmt))
	{
		ListCell   *lc;

		foreach(lc, ((CreatedbStmt *) statement)->options)
		{
			DefElem    *option = lfirst(lc);

			if (strcmp(option->defname, "template") == 0 && option->arg != NULL)
				name = defGetString(option);
		}
	}

	if (name == NULL)
		return InvalidOid;
	return get_database_oid(name, true);
}

/*
 * Ask the worker of a database to exit and keep it from restarting.
 */
static void
stop_worker_of_database(Oid dboid)
{
	WorkerSlot *slot;
	pid_t		pid = 0;

	if (portal_sync_shared == NULL)
		return;
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	slot = worker_slot_for_database(dboid);
	if (slot != NULL)
	{
		slot->paused_until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														 DATABASE_PAUSE_MS);
		pid = slot->pid;
	}
	LWLockRelease(portal_sync_shared->lock);

	if (pid != 0)
		kill(pid, SIGTERM);
}

/*
 * ProcessUtility hook.
 */
static void
portal_sync_process_utility(PlannedStmt *pstmt, const char *queryString,
							bool readOnlyTree, ProcessUtilityContext context,
							ParamListInfo params, QueryEnvironment *queryEnv,
							DestReceiver *dest, QueryCompletion *qc)
{
	Oid			dboid = database_needing_exclusivity(pstmt->utilityStmt);

	if (OidIsValid(dboid))
		stop_worker_of_database(dboid);

	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * Install the hook; called from _PG_init.
 */
void
database_hook_install(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = portal_sync_process_utility;
}
