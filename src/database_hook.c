/*-------------------------------------------------------------------------
 *
 * database_hook.c
 *		Getting the delivery worker out of the way of commands that need
 *		a database without connections.
 *
 * DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE and CREATE
 * DATABASE ... TEMPLATE refuse to run while another session is connected
 * to the database, and a delivery worker is such a session.  When a role
 * that may drop the database runs one of them, the worker is asked to exit
 * and the launcher keeps it away for as long as the command runs; when the
 * command ends, successfully or not, the worker is started again at once.
 * A role that may not drop the database changes nothing: the command
 * fails on its own permission check, and delivery goes on.  At the commit
 * of any CREATE DATABASE the launcher looks for the new database at once,
 * so that a copy's worker soon says that the copy needs adoption.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/procarray.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"

/*
 * Safety limit of a pause whose end was never recorded (the backend
 * running the command is checked too: a pause of a backend that has gone
 * ends with it).
 */
#define DATABASE_PAUSE_LIMIT_MS	(10 * 60 * 1000)

static ProcessUtility_hook_type prev_process_utility = NULL;

/* This transaction created a database: wake the launcher at commit. */
static bool database_created = false;

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
 * Record that this backend's command needs the database without its
 * worker, and ask the worker to exit.  Returns the pause's index, or -1
 * if there is no room (the command then waits for the worker like for any
 * other session, and may fail on it).
 */
static int
pause_worker_of_database(Oid dboid)
{
	int			index = -1;
	pid_t		pid = 0;
	WorkerSlot *slot;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < MAX_DATABASE_PAUSES; i++)
	{
		DatabasePause *pause = &portal_sync_shared->pauses[i];

		if (!OidIsValid(pause->dboid) ||
			pause->until <= GetCurrentTimestamp() ||
			BackendPidGetProc(pause->commanding_pid) == NULL)
		{
			pause->dboid = dboid;
			pause->commanding_pid = MyProcPid;
			pause->until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   DATABASE_PAUSE_LIMIT_MS);
			index = i;
			break;
		}
	}
	slot = worker_slot_for_database(dboid);
	if (index >= 0 && slot != NULL)
		pid = slot->pid;
	LWLockRelease(portal_sync_shared->lock);

	if (pid != 0)
		kill(pid, SIGTERM);
	return index;
}

/*
 * End this backend's pause and have the launcher start the worker again.
 */
static void
end_pause(int index, Oid dboid)
{
	DatabasePause *pause = &portal_sync_shared->pauses[index];

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	if (pause->dboid == dboid && pause->commanding_pid == MyProcPid)
		pause->dboid = InvalidOid;
	LWLockRelease(portal_sync_shared->lock);
	wake_launcher_for_database(dboid);
}

/*
 * Whether a command running now needs this database without its worker.
 * Called by the launcher before it starts a worker.
 */
bool
database_is_paused(Oid dboid)
{
	bool		paused = false;
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	for (int i = 0; i < MAX_DATABASE_PAUSES && !paused; i++)
	{
		DatabasePause *pause = &portal_sync_shared->pauses[i];

		paused = pause->dboid == dboid && pause->until > now &&
			BackendPidGetProc(pause->commanding_pid) != NULL;
	}
	LWLockRelease(portal_sync_shared->lock);
	return paused;
}

/*
 * At commit of a CREATE DATABASE, have the launcher look for the new
 * database at once: its scan during the command could not see it yet, and
 * a copy of a database with portal_sync must soon say that it needs
 * adoption.
 */
static void
start_worker_of_created_database(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && database_created)
		wake_launcher();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		database_created = false;
}

/*
 * Remember that a CREATE DATABASE ran, for its commit.
 */
static void
note_database_created(void)
{
	static bool callback_registered = false;

	if (!callback_registered)
	{
		RegisterXactCallback(start_worker_of_created_database, NULL);
		callback_registered = true;
	}
	database_created = true;
}

/*
 * Run a utility statement the next hook or the server's own way.
 */
static void
run_utility(PlannedStmt *pstmt, const char *queryString,
			bool readOnlyTree, ProcessUtilityContext context,
			ParamListInfo params, QueryEnvironment *queryEnv,
			DestReceiver *dest, QueryCompletion *qc)
{
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * ProcessUtility hook: pause the worker of the database the statement
 * needs, if the current role may drop that database, for as long as the
 * statement runs.
 */
static void
portal_sync_process_utility(PlannedStmt *pstmt, const char *queryString,
							bool readOnlyTree, ProcessUtilityContext context,
							ParamListInfo params, QueryEnvironment *queryEnv,
							DestReceiver *dest, QueryCompletion *qc)
{
	volatile Oid dboid = InvalidOid;
	volatile int pause_index = -1;

	/* what a database or a role cannot hold is refused before it is stored */
	database_settings_check_utility(pstmt->utilityStmt);

	if (portal_sync_shared != NULL)
		dboid = database_needing_exclusivity(pstmt->utilityStmt);
	if (OidIsValid(dboid) && pg_database_ownercheck(dboid, GetUserId()))
		pause_index = pause_worker_of_database(dboid);

	if (pause_index < 0)
	{
		run_utility(pstmt, queryString, readOnlyTree, context, params,
					queryEnv, dest, qc);
		if (portal_sync_shared != NULL && IsA(pstmt->utilityStmt, CreatedbStmt))
			note_database_created();
		return;
	}

	PG_TRY();
	{
		run_utility(pstmt, queryString, readOnlyTree, context, params,
					queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		end_pause(pause_index, dboid);
	}
	PG_END_TRY();
	if (IsA(pstmt->utilityStmt, CreatedbStmt))
		note_database_created();
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
