/*-------------------------------------------------------------------------
 *
 * utility_hook.c
 *		The one ProcessUtility hook of portal_sync.
 *
 * Three concerns act around utility statements: the stored settings of
 * attached tables across renames and restores (attachment_ddl.c), the
 * capture triggers of partition trees (partitions.c), and the commands
 * that need a database without its delivery worker, with the settings a
 * database or a role cannot hold (database_hook.c, database_settings.c).
 * One hook runs them all, in a fixed order that does not depend on the
 * order of calls in _PG_init:
 *
 *	before the statement: attached tables' settings resolved, then the
 *	partition tree checked, then database and role settings checked, then
 *	the database's worker paused;
 *	the statement, by the hook installed before ours or the server;
 *	then the pause ended, whether the statement succeeded or not;
 *	after the statement succeeded: a created database noted, then the
 *	partition tree's triggers kept, then attached tables' settings
 *	rewritten.
 *
 * A concern's "before" step may refuse the statement (an ERROR): the
 * steps after it and the statement do not run.  An error in the statement
 * or in an "after" step skips the "after" steps that follow it.  Nested
 * utility statements (a CREATE TABLE's sub-commands, the CREATE TRIGGER
 * a concern runs through SPI) go through this hook again, like any other.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "tcop/utility.h"

#include "portal_sync.h"
#include "utility_hook.h"

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * Run a utility statement the next hook's or the server's own way: the
 * one place that calls them, so that another extension's hook loaded
 * before portal_sync still runs.
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
 * Run a utility statement while the worker of a database is paused, and
 * end the pause however the statement ends.  A function of its own, so
 * that nothing else of the hook lives across the longjmp of an error
 * (PG_CATCH and a rethrow rather than PG_FINALLY, which gcc's -Wclobbered
 * rejects here).
 */
static void
run_utility_paused(int pause_index, Oid dboid,
				   PlannedStmt *pstmt, const char *queryString,
				   bool readOnlyTree, ProcessUtilityContext context,
				   ParamListInfo params, QueryEnvironment *queryEnv,
				   DestReceiver *dest, QueryCompletion *qc)
{
	PG_TRY();
	{
		run_utility(pstmt, queryString, readOnlyTree, context, params,
					queryEnv, dest, qc);
	}
	PG_CATCH();
	{
		database_pause_end(pause_index, dboid);
		PG_RE_THROW();
	}
	PG_END_TRY();
	database_pause_end(pause_index, dboid);
}

/*
 * ProcessUtility hook: each concern's work before and after the
 * statement, in the order given at the top of this file.
 */
static void
portal_sync_process_utility(PlannedStmt *pstmt, const char *queryString,
							bool readOnlyTree, ProcessUtilityContext context,
							ParamListInfo params, QueryEnvironment *queryEnv,
							DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *statement = pstmt->utilityStmt;
	List	   *resolved;
	PartitionChange partition_change;
	Oid			dboid;
	int			pause_index;

	resolved = attachment_ddl_before_utility(statement);
	partitions_before_utility(statement, &partition_change);
	/* what a database or a role cannot hold is refused before it is stored */
	database_settings_check_utility(statement);
	pause_index = database_pause_before_utility(statement, &dboid);

	if (pause_index < 0)
		run_utility(pstmt, queryString, readOnlyTree, context, params,
					queryEnv, dest, qc);
	else
		run_utility_paused(pause_index, dboid, pstmt, queryString,
						   readOnlyTree, context, params, queryEnv, dest, qc);

	database_after_utility(statement);
	partitions_after_utility(statement, &partition_change);
	attachment_ddl_after_utility(statement, resolved);
}

/*
 * Install the hook; called once from _PG_init.
 */
void
utility_hook_install(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = portal_sync_process_utility;
}
