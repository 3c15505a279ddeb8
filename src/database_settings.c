/*-------------------------------------------------------------------------
 *
 * database_settings.c
 *		Settings of one database: ALTER DATABASE … SET portal_sync.…
 *
 * One cluster may serve practices with different portals: a superuser may
 * set portal_sync.endpoint, auth_token_file, ca_file and compression for
 * one database with ALTER DATABASE … SET.  Their value in that database's
 * worker is the database's value if it has one, else the cluster's
 * (postgresql.conf, postgresql.auto.conf), else the built-in default.
 *
 * The worker works this out itself, when it starts and at every SIGHUP,
 * between two steps of work (no request in flight, no transaction open):
 * the database's values come from pg_db_role_setting, the cluster's from
 * the postmaster's command line or pg_file_settings, and the result is
 * applied with the highest source, so
 * that a RESET at database level falls back to the cluster's value.  The
 * GUC machinery alone cannot do this: a value applied at connection from
 * pg_db_role_setting also becomes the reset value, and shadows every later
 * value of postgresql.conf.  At the commit of an ALTER DATABASE … SET or
 * RESET, the committing backend sends SIGHUP to that database's worker, so
 * the change applies at once, without pg_reload_conf().
 *
 * What cannot be set this way is refused before it is stored, with a hint:
 *
 * - portal_sync.auth_token, for a database or a role: pg_db_role_setting is
 *   readable by every role.  A per-database token is given as a file.  The
 *   refusal does not log the statement, which holds the token.
 * - The per-database settings for a role (ALTER ROLE … SET, … IN DATABASE,
 *   ALTER ROLE ALL): a worker is not a session of any role, and settings of
 *   a role would apply to sessions only.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "portal_sync.h"
#include "shared_state.h"

/* A setting that a database may have a value of its own for. */
typedef struct DatabaseSetting
{
	const char *name;
	const char *boot_value;		/* as defined in portal_sync.c */
} DatabaseSetting;

static const DatabaseSetting database_settings[] = {
	{"portal_sync.endpoint", ""},
	{"portal_sync.auth_token_file", ""},
	{"portal_sync.ca_file", ""},
	{"portal_sync.compression", "gzip"},
};

#define NUM_DATABASE_SETTINGS lengthof(database_settings)

#define AUTH_TOKEN_SETTING "portal_sync.auth_token"

/*
 * Values the postmaster was given on its command line (-c), which win over
 * the configuration files and cannot change until it restarts; NULL where
 * none was given.  Known to the worker only (database_settings_inherit).
 */
static char *command_line_values[NUM_DATABASE_SETTINGS];

/* Databases whose settings this transaction changed: their workers re-read. */
static List *changed_databases = NIL;

static void database_settings_xact_callback(XactEvent event, void *arg);

/*
 * The index of a per-database setting in database_settings, or -1.
 */
static int
database_setting_index(const char *name)
{
	if (name == NULL)
		return -1;
	for (int i = 0; i < NUM_DATABASE_SETTINGS; i++)
		if (pg_strcasecmp(name, database_settings[i].name) == 0)
			return i;
	return -1;
}

/*
 * Whether a SET clause of ALTER DATABASE / ALTER ROLE stores a value (as
 * opposed to removing one: RESET, SET … TO DEFAULT, RESET ALL).
 */
static bool
stores_a_value(VariableSetStmt *setstmt)
{
	return setstmt->kind == VAR_SET_VALUE || setstmt->kind == VAR_SET_CURRENT;
}

/*
 * Refuse portal_sync.auth_token in pg_db_role_setting.  The statement is
 * kept out of the log (errhidestmt): it holds the token.
 */
static void
refuse_stored_token(const char *command)
{
	ereport(ERROR,
			(errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM),
			 errmsg("parameter \"%s\" cannot be set with %s", AUTH_TOKEN_SETTING, command),
			 errdetail("Values set with ALTER DATABASE or ALTER ROLE are readable by every role in pg_db_role_setting."),
			 errhint("Put the token in a file only the server can read and set portal_sync.auth_token_file"
					 " for the database (ALTER DATABASE … SET portal_sync.auth_token_file = '…'),"
					 " or set portal_sync.auth_token for the whole cluster in postgresql.conf."),
			 errhidestmt(true)));
}

/*
 * Refuse, before it is stored, what a database or a role cannot hold; and
 * remember which database's settings the statement changes, for its
 * commit.  Called by the ProcessUtility hook (utility_hook.c) before the
 * statement runs.
 */
void
database_settings_check_utility(Node *statement)
{
	static bool callback_registered = false;

	if (IsA(statement, AlterDatabaseSetStmt))
	{
		AlterDatabaseSetStmt *stmt = (AlterDatabaseSetStmt *) statement;
		VariableSetStmt *setstmt = stmt->setstmt;
		Oid			dboid;
		MemoryContext old;

		if (setstmt->name != NULL &&
			pg_strcasecmp(setstmt->name, AUTH_TOKEN_SETTING) == 0 &&
			stores_a_value(setstmt))
			refuse_stored_token("ALTER DATABASE");

		/* any change may be one of ours (RESET ALL, say): the worker looks */
		dboid = get_database_oid(stmt->dbname, true);
		if (!OidIsValid(dboid) || portal_sync_shared == NULL)
			return;
		if (!callback_registered)
		{
			RegisterXactCallback(database_settings_xact_callback, NULL);
			callback_registered = true;
		}
		old = MemoryContextSwitchTo(TopMemoryContext);
		changed_databases = list_append_unique_oid(changed_databases, dboid);
		MemoryContextSwitchTo(old);
	}
	else if (IsA(statement, AlterRoleSetStmt))
	{
		VariableSetStmt *setstmt = ((AlterRoleSetStmt *) statement)->setstmt;
		int			index;

		if (!stores_a_value(setstmt) || setstmt->name == NULL)
			return;
		if (pg_strcasecmp(setstmt->name, AUTH_TOKEN_SETTING) == 0)
			refuse_stored_token("ALTER ROLE");
		index = database_setting_index(setstmt->name);
		if (index >= 0)
			ereport(ERROR,
					(errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM),
					 errmsg("parameter \"%s\" cannot be set for a role",
							database_settings[index].name),
					 errdetail("The delivery worker of a database is not a session of any role: a role's settings would not apply to it."),
					 errhint("Use ALTER DATABASE … SET %s for one database, or postgresql.conf for the whole cluster.",
							 database_settings[index].name)));
	}
}

/*
 * At the end of a transaction that ran ALTER DATABASE … SET / RESET: at
 * commit, have the workers of those databases re-read their settings now
 * (SIGHUP: they do it between two steps of work).  A prepared transaction
 * wakes nobody: after its COMMIT PREPARED, pg_reload_conf() applies it.
 */
static void
database_settings_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (changed_databases == NIL ||
		(event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT &&
		 event != XACT_EVENT_PREPARE))
		return;
	if (event == XACT_EVENT_COMMIT)
	{
		foreach(lc, changed_databases)
		{
			Oid			dboid = lfirst_oid(lc);
			WorkerSlot *slot;
			pid_t		pid = 0;

			LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
			slot = worker_slot_for_database(dboid);
			if (slot != NULL)
				pid = slot->pid;
			LWLockRelease(portal_sync_shared->lock);
			if (pid != 0)
				kill(pid, SIGHUP);
		}
	}
	list_free(changed_databases);
	changed_databases = NIL;
}

/*
 * The values of per-database settings in a pg_db_role_setting.setconfig
 * array of "name=value" items, into values[] (palloc'd in the current
 * context).
 */
static void
collect_setconfig(Datum setconfig, char **values)
{
	ArrayType  *array = DatumGetArrayTypeP(setconfig);
	Datum	   *items;
	bool	   *nulls;
	int			nitems;

	deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT,
					  &items, &nulls, &nitems);
	for (int i = 0; i < nitems; i++)
	{
		char	   *item;
		char	   *name;
		char	   *value;
		int			index;

		if (nulls[i])
			continue;
		item = TextDatumGetCString(items[i]);
		ParseLongOption(item, &name, &value);
		index = database_setting_index(name);
		if (index >= 0 && value != NULL)
			values[index] = value;
	}
}

/*
 * Remember which per-database settings the postmaster was given on its
 * command line.  Called by the worker before it connects to its database:
 * until then its settings are the postmaster's, with their sources.
 */
void
database_settings_inherit(void)
{
	struct config_generic **variables = get_guc_variables();
	int			count = GetNumConfigOptions();

	for (int v = 0; v < count; v++)
	{
		int			index = database_setting_index(variables[v]->name);

		if (index >= 0 && variables[v]->source == PGC_S_ARGV)
			command_line_values[index] =
				MemoryContextStrdup(TopMemoryContext,
									GetConfigOption(variables[v]->name, false, false));
	}
}

/*
 * Work out the per-database settings of this worker's database and apply
 * them: the database's value, else the postmaster's command line's, else
 * the configuration files', else the default.
 * Called by the worker when it starts and after each configuration reload,
 * with no transaction open.  Returns whether any value changed.
 */
bool
database_settings_apply(void)
{
	MemoryContext context = AllocSetContextCreate(TopMemoryContext,
												  "portal_sync database settings",
												  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(context);
	char	   *cluster[NUM_DATABASE_SETTINGS] = {0};
	char	   *database[NUM_DATABASE_SETTINGS] = {0};
	bool		changed = false;
	Datum		arg = ObjectIdGetDatum(MyDatabaseId);
	Oid			argtype = OIDOID;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());

	/* the cluster's: the last line of the configuration files that counts */
	if (SPI_execute("SELECT name, setting FROM pg_catalog.pg_file_settings"
					" WHERE applied AND error IS NULL AND setting IS NOT NULL"
					" ORDER BY seqno", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read pg_file_settings");
	for (uint64 row = 0; row < SPI_processed; row++)
	{
		char	   *name = SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, 1);
		int			index = database_setting_index(name);

		if (index >= 0)
			cluster[index] = MemoryContextStrdup(context,
												 SPI_getvalue(SPI_tuptable->vals[row],
															  SPI_tuptable->tupdesc, 2));
	}

	/* the database's own (setrole 0: ALTER DATABASE, not ALTER ROLE) */
	if (SPI_execute_with_args("SELECT setconfig FROM pg_catalog.pg_db_role_setting"
							  " WHERE setdatabase OPERATOR(pg_catalog.=) $1"
							  " AND setrole OPERATOR(pg_catalog.=) 0",
							  1, &argtype, &arg, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read pg_db_role_setting");
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
		{
			MemoryContext spi = MemoryContextSwitchTo(context);

			collect_setconfig(d, database);
			MemoryContextSwitchTo(spi);
		}
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(context);

	for (int i = 0; i < NUM_DATABASE_SETTINGS; i++)
	{
		const char *name = database_settings[i].name;
		const char *value = database[i] ? database[i]
			: command_line_values[i] ? command_line_values[i]
			: cluster[i] ? cluster[i] : database_settings[i].boot_value;
		char	   *before = pstrdup(GetConfigOption(name, false, false));

		/*
		 * A value that does not pass (a cluster's value never reloaded, say)
		 * leaves the one before, with a warning in the log.
		 */
		if (set_config_option(name, value, PGC_SUSET, PGC_S_OVERRIDE,
							  GUC_ACTION_SET, true, WARNING, false) > 0 &&
			strcmp(before, GetConfigOption(name, false, false)) != 0)
			changed = true;
	}

	MemoryContextSwitchTo(old);
	MemoryContextDelete(context);
	return changed;
}
