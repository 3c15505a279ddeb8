/*-------------------------------------------------------------------------
 *
 * attachment_ddl.c
 *		Keeping the stored settings of attached tables true across DDL.
 *
 * portal_sync.source names the columns of an attached table and keeps its
 * rules as SQL text, so that pg_dump / pg_restore carry them.  Two utility
 * statements need portal_sync to act in the same transaction (steps run
 * by the ProcessUtility hook, utility_hook.c):
 *
 * ALTER TABLE ... RENAME COLUMN of an attached table (or of a parent of
 * one): before the rename the stored settings are resolved (columns to
 * attribute numbers, rules analyzed); after it the names are read back
 * and the rules deparsed again, and the row of portal_sync.source is
 * rewritten.  A rule may name a type (a cast to an enum), so renaming a
 * type or a schema, or moving a type to another schema, deparses every
 * attached table's rules again the same way.  Renaming the table itself
 * changes nothing stored (a regclass).
 *
 * CREATE TRIGGER of a capture insert trigger on a table whose settings
 * are there already, which is what pg_restore does after it restored the
 * settings: the trigger's dependencies on the columns portal_sync reads
 * (which keep them from being dropped) are not dumped, so they are
 * recorded again here.  attach() records them itself.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "portal_sync.h"
#include "utility_hook.h"

#define CAPTURE_INSERT_TRIGGER "portal_sync_capture_insert"

/* An attached table's settings as resolved before a rename. */
typedef struct RenamedSource
{
	Oid			relid;
	StoredSource stored;
} RenamedSource;

/*
 * Resolve the settings of these attached tables (others are skipped).
 */
static List *
resolve_attached(List *relids, LOCKMODE lockmode)
{
	List	   *result = NIL;
	ListCell   *lc;

	foreach(lc, relids)
	{
		Oid			relid = lfirst_oid(lc);
		RenamedSource *renamed;

		if (!source_is_attached(relid))
			continue;
		if (lockmode != NoLock)
			LockRelationOid(relid, lockmode);
		renamed = palloc0(sizeof(RenamedSource));
		renamed->relid = relid;
		if (source_settings_read(relid, &renamed->stored))
			result = lappend(result, renamed);
	}
	return result;
}

/*
 * The attached tables a RENAME COLUMN may rename a column of, with their
 * settings resolved while the old name still exists.  They are locked
 * as the rename will lock them, and only for their owner (anyone else's
 * rename fails on its own permission check).
 */
static List *
settings_before_column_rename(RenameStmt *stmt)
{
	Oid			relid;

	if (stmt->relation == NULL)
		return NIL;
	relid = RangeVarGetRelid(stmt->relation, NoLock, true);
	if (!OidIsValid(relid) || !pg_class_ownercheck(relid, GetUserId()))
		return NIL;
	return resolve_attached(stmt->relation->inh ? find_all_inheritors(relid, NoLock, NULL)
							: list_make1_oid(relid),
							AccessExclusiveLock);
}

/*
 * Before a utility statement (utility_hook.c): the attached tables whose
 * stored settings it may make stale, resolved while the old names still
 * exist; NIL for most statements.
 */
List *
attachment_ddl_before_utility(Node *statement)
{
	ObjectType	type;

	if (IsA(statement, RenameStmt))
		type = ((RenameStmt *) statement)->renameType;
	else if (IsA(statement, AlterObjectSchemaStmt))
		type = ((AlterObjectSchemaStmt *) statement)->objectType;
	else
		return NIL;
	if (type != OBJECT_COLUMN && type != OBJECT_TYPE && type != OBJECT_DOMAIN &&
		type != OBJECT_SCHEMA)
		return NIL;
	if (!OidIsValid(portal_sync_relid_if_exists("source")) || !source_settings_by_name())
		return NIL;
	if (type == OBJECT_COLUMN)
		return IsA(statement, RenameStmt)
			? settings_before_column_rename((RenameStmt *) statement) : NIL;
	/* a type or schema a rule may name: every attached table's rules */
	return resolve_attached(source_attached_relids(), NoLock);
}

/*
 * A column's current name as a datum of type name.
 */
static Datum
column_name_datum(Oid relid, AttrNumber attnum)
{
	return DirectFunctionCall1(namein, CStringGetDatum(get_attname(relid, attnum, false)));
}

/*
 * Rewrite the stored settings of one attached table from what was
 * resolved before the rename: current column names, rules deparsed again.
 * The caller is connected to SPI as the extension's owner.
 */
static void
rewrite_settings(RenamedSource *renamed)
{
	StoredSource *stored = &renamed->stored;
	Oid			relid = renamed->relid;
	Relation	rel = relation_open(relid, AccessShareLock);
	Oid			types[8] = {REGCLASSOID, NAMEOID, NAMEOID, NAMEOID, NAMEOID,
	TEXTOID, TEXTOID, NAMEARRAYOID};
	Datum		values[8];
	char		nulls[9] = "        ";

	values[0] = ObjectIdGetDatum(relid);
	values[1] = column_name_datum(relid, stored->patient_attnum);
	values[2] = column_name_datum(relid, stored->key_attnum);
	if (stored->date_attnum != InvalidAttrNumber)
		values[3] = column_name_datum(relid, stored->date_attnum);
	else
		nulls[3] = 'n';
	if (stored->privacy_attnum != InvalidAttrNumber)
		values[4] = column_name_datum(relid, stored->privacy_attnum);
	else
		nulls[4] = 'n';
	if (stored->share_when != NULL)
		values[5] = CStringGetTextDatum(rule_expr_deparse(rel, stored->share_when));
	else
		nulls[5] = 'n';
	if (stored->enroll_when != NULL)
		values[6] = CStringGetTextDatum(rule_expr_deparse(rel, stored->enroll_when));
	else
		nulls[6] = 'n';
	if (stored->ncolumns >= 0)
	{
		Datum	   *names = palloc(Max(stored->ncolumns, 1) * sizeof(Datum));

		for (int i = 0; i < stored->ncolumns; i++)
			names[i] = column_name_datum(relid, stored->columns[i]);
		values[7] = PointerGetDatum(construct_array(names, stored->ncolumns, NAMEOID,
													NAMEDATALEN, false, TYPALIGN_CHAR));
	}
	else
		nulls[7] = 'n';
	relation_close(rel, NoLock);

	if (SPI_execute_with_args("UPDATE portal_sync.source"
							  " SET patient_col = $2, key_col = $3, date_col = $4, privacy_col = $5,"
							  "     share_when = $6, enroll_when = $7, columns = $8"
							  " WHERE relid = $1"
							  "   AND (patient_col, key_col, date_col, privacy_col, share_when,"
							  "        enroll_when, columns)"
							  "       IS DISTINCT FROM ($2, $3, $4, $5, $6, $7, $8)",
							  8, types, values, nulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "rewriting the settings of an attached table failed");
}

/*
 * After the statement: rewrite the settings of every attached table it may
 * have made stale.
 */
static void
settings_after(List *renamed)
{
	ExtensionOwnerContext owner;
	ListCell   *lc;

	CommandCounterIncrement();	/* the new names */
	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	foreach(lc, renamed)
		rewrite_settings((RenamedSource *) lfirst(lc));
	SPI_finish();
	restore_user(&owner);
}

/*
 * After a CREATE TRIGGER: if it created the capture insert trigger of an
 * attached table outside attach() (a restore), record its dependencies.
 */
static void
after_create_trigger(CreateTrigStmt *stmt)
{
	Oid			relid;

	if (strcmp(stmt->trigname, CAPTURE_INSERT_TRIGGER) != 0 ||
		attach_is_creating_triggers() ||
		!OidIsValid(portal_sync_relid_if_exists("source")))
		return;
	CommandCounterIncrement();	/* the new trigger */
	relid = RangeVarGetRelid(stmt->relation, NoLock, true);
	if (OidIsValid(relid) && OidIsValid(get_trigger_oid(relid, CAPTURE_INSERT_TRIGGER, true)))
		record_capture_dependencies(relid);
}

/*
 * After a utility statement succeeded (utility_hook.c): the settings
 * resolved before it rewritten, and a restored capture trigger's
 * dependencies recorded.
 */
void
attachment_ddl_after_utility(Node *statement, List *resolved)
{
	if (resolved != NIL)
		settings_after(resolved);
	if (IsA(statement, CreateTrigStmt))
		after_create_trigger((CreateTrigStmt *) statement);
}
