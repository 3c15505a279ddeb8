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
 * of a CREATE DATABASE the registry of databases learns whether the new
 * database has the extension (its template has it), so that a copy's
 * worker soon says that the copy needs adoption.  The steps run from
 * portal_sync's ProcessUtility hook (utility_hook.c).
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
#include "utils/acl.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"
#include "utility_hook.h"

/*
 * Safety limit of a pause whose end was never recorded (the backend
 * running the command is checked too: a pause of a backend that has gone
 * ends with it).
 */
#define DATABASE_PAUSE_LIMIT_MS	(10 * 60 * 1000)

/* The database this transaction created, and its template, or InvalidOid. */
static Oid	created_database = InvalidOid;
static Oid	created_from = InvalidOid;

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
 * End this backend's pause and have the launcher start the worker again;
 * called by the utility hook once the statement ended, successfully or
 * not.
 */
void
database_pause_end(int index, Oid dboid)
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
 * At commit of a CREATE DATABASE, tell the registry of databases: a copy
 * of a database with portal_sync has it too, and must soon say that it
 * needs adoption (the launcher cannot look into a database it has no
 * worker in).
 */
static void
register_created_database(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && OidIsValid(created_database))
		registry_note_copy(created_from, created_database);
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		created_database = created_from = InvalidOid;
}

/*
 * Remember which database a CREATE DATABASE created, and from which
 * template, for its commit.
 */
static void
note_database_created(CreatedbStmt *statement)
{
	static bool callback_registered = false;
	const char *template_name = "template1";
	ListCell   *lc;

	if (!callback_registered)
	{
		RegisterXactCallback(register_created_database, NULL);
		callback_registered = true;
	}
	foreach(lc, statement->options)
	{
		DefElem    *option = lfirst(lc);

		if (strcmp(option->defname, "template") == 0 && option->arg != NULL)
			template_name = defGetString(option);
	}
	created_database = get_database_oid(statement->dbname, true);
	created_from = get_database_oid(template_name, true);
}

/*
 * Before a utility statement (utility_hook.c): if the statement needs a
 * database without connections and the current role may drop that
 * database, pause the database's worker.  Returns the pause's index, to
 * be ended by database_pause_end() however the statement ends, and sets
 * *dboid; or -1 when there is no pause.
 */
int
database_pause_before_utility(Node *statement, Oid *dboid)
{
	*dboid = InvalidOid;
	if (portal_sync_shared != NULL)
		*dboid = database_needing_exclusivity(statement);
	if (OidIsValid(*dboid) && pg_database_ownercheck(*dboid, GetUserId()))
		return pause_worker_of_database(*dboid);
	return -1;
}

/*
 * After a utility statement succeeded (utility_hook.c): a CREATE DATABASE
 * is remembered for its commit.
 */
void
database_after_utility(Node *statement)
{
	if (portal_sync_shared != NULL && IsA(statement, CreatedbStmt))
		note_database_created((CreatedbStmt *) statement);
}
