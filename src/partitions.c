/*-------------------------------------------------------------------------
 *
 * partitions.c
 *		Partitioned tables: every partition of an attached table captured.
 *
 * A statement-level trigger fires only on the table a statement names,
 * so attach() puts the capture triggers on a partitioned table and on
 * every one of its partitions, at every level.  This file keeps it so
 * while the partition tree changes, in the same transaction, before and
 * after the statement (steps run by the ProcessUtility hook,
 * utility_hook.c):
 *
 *	- CREATE TABLE ... PARTITION OF and ALTER TABLE ... ATTACH PARTITION
 *	  give the new partition (and its own partitions) the triggers; the
 *	  rows a table brings with it into the tree are captured as rows that
 *	  came (capture.c).
 *	- ALTER TABLE ... DETACH PARTITION drops the detached table's
 *	  triggers: its rows are no longer rows of the source.  The portal
 *	  keeps what it has of them, as after detach() without retract, and
 *	  later snapshots no longer mention them.
 *	- DROP TABLE of a partition removes its rows the way a TRUNCATE of
 *	  them would (capture.c): the portal is told.
 *
 * A partition's row format can differ from the attached table's (a
 * column dropped from the parent before the partition was created, a
 * table created on its own and then attached): the settings name columns,
 * and the source cache resolves those names against the partition itself.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_attribute.h"
#include "catalog/pg_class.h"
#include "catalog/pg_inherits.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/parsenodes.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "portal_sync.h"
#include "utility_hook.h"

/*
 * The settings a table's writes are captured with, if it is an attached
 * table or a partition of one.
 */
static SourceConfig *
captured_as(Oid relid)
{
	if (!OidIsValid(relid))
		return NULL;
	return source_config_lookup(relid);
}

/*
 * Is the table attached on its own (a row of portal_sync.source of its
 * own, not as a partition of an attached table)?
 */
static bool
attached_on_its_own(Oid relid)
{
	SourceConfig *config = captured_as(relid);

	return config != NULL && config->attached_relid == relid;
}

/*
 * Give a table and every partition of it the capture triggers they lack,
 * as the extension's owner (who creates them in attach() too).  Only the
 * tables that lack them are locked (by CREATE TRIGGER): a partition
 * created in a large tree does not hold up the writers of the others.
 */
static void
add_triggers_to_tree(Oid relid)
{
	ExtensionOwnerContext owner;
	List	   *tree = lcons_oid(relid, partitions_of(relid, NoLock));
	ListCell   *lc;

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	foreach(lc, tree)
		add_capture_triggers(lfirst_oid(lc));
	SPI_finish();
	restore_user(&owner);
}

/*
 * Drop the capture triggers of a table that left an attached tree, and of
 * its partitions.
 */
static void
drop_triggers_from_tree(Oid relid)
{
	ExtensionOwnerContext owner;
	List	   *tree = lcons_oid(relid, partitions_of(relid, ShareRowExclusiveLock));
	ListCell   *lc;

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	foreach(lc, tree)
	{
		drop_capture_triggers(lfirst_oid(lc));
		CacheInvalidateRelcacheByRelid(lfirst_oid(lc));
	}
	SPI_finish();
	restore_user(&owner);
}

/*
 * Before a DROP TABLE: the rows of every partition of an attached table
 * it drops are reported gone, like a TRUNCATE of them, while they can
 * still be read.  A partition dropped with its attached ancestor is not:
 * dropping the attached table forgets the source (the sql_drop event
 * trigger), and the portal keeps what it has, as after detach().  The
 * locks the DROP takes (the partition's parent first) are taken now,
 * so that reading the rows first cannot deadlock with it; a role that may
 * not drop the table is left to the DROP's own permission check.
 */
static void
before_drop(DropStmt *stmt)
{
	List	   *dropped = NIL;
	ListCell   *lc;

	foreach(lc, stmt->objects)
	{
		RangeVar   *rv = makeRangeVarFromNameList((List *) lfirst(lc));
		Oid			relid = RangeVarGetRelid(rv, NoLock, true);

		if (OidIsValid(relid))
			dropped = lappend_oid(dropped, relid);
	}

	foreach(lc, dropped)
	{
		Oid			relid = lfirst_oid(lc);
		SourceConfig *config;
		List	   *ancestors;
		ListCell   *alc;
		bool		with_ancestor = false;
		Relation	rel;

		if (!get_rel_relispartition(relid) || !pg_class_ownercheck(relid, GetUserId()))
			continue;
		config = captured_as(relid);
		if (config == NULL || config->attached_relid == relid)
			continue;
		ancestors = get_partition_ancestors(relid);
		foreach(alc, ancestors)
			with_ancestor = with_ancestor || list_member_oid(dropped, lfirst_oid(alc));
		if (with_ancestor)
			continue;

		LockRelationOid(linitial_oid(ancestors), AccessExclusiveLock);
		(void) find_all_inheritors(relid, AccessExclusiveLock, NULL);
		rel = table_open(relid, NoLock);
		capture_table_rows(rel, true);
		table_close(rel, NoLock);
	}
}

/*
 * Refuse to put into an attached tree a table that is attached on its own
 * (or holds such a partition): its rows would be two sources at once.
 */
static void
check_attachable_partition(Oid parent, Oid partition)
{
	List	   *tree;
	ListCell   *lc;

	if (captured_as(parent) == NULL)
		return;
	tree = lcons_oid(partition, partitions_of(partition, NoLock));
	foreach(lc, tree)
	{
		if (attached_on_its_own(lfirst_oid(lc)))
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("\"%s\" is attached to portal_sync on its own and cannot become a partition of \"%s\", which is attached too",
							get_rel_name(lfirst_oid(lc)), get_rel_name(parent)),
					 errhint("Detach it with portal_sync.detach() first: as a partition it is captured with the partitioned table.")));
	}
}

/*
 * Is this a statement that changes a partition tree, or drops tables?
 */
static bool
changes_partitions(Node *parsetree)
{
	if (IsA(parsetree, CreateStmt))
		return ((CreateStmt *) parsetree)->partbound != NULL;
	if (IsA(parsetree, AlterTableStmt))
		return ((AlterTableStmt *) parsetree)->objtype == OBJECT_TABLE;
	if (IsA(parsetree, DropStmt))
		return ((DropStmt *) parsetree)->removeType == OBJECT_TABLE;
	return false;
}

/*
 * Before a utility statement (utility_hook.c): refuse a partition that
 * cannot join an attached tree, report the rows of a dropped partition
 * gone while they can still be read, and note in *change what the after
 * step must look at (see the top of this file).
 */
void
partitions_before_utility(Node *parsetree, PartitionChange *change)
{
	ListCell   *lc;

	change->concerned = false;
	change->attached = NIL;
	change->detached = NIL;
	if (!changes_partitions(parsetree) || !IsTransactionState() ||
		!OidIsValid(portal_sync_relid_if_exists("source")))
		return;
	change->concerned = true;

	if (IsA(parsetree, DropStmt))
		before_drop((DropStmt *) parsetree);
	else if (IsA(parsetree, AlterTableStmt))
	{
		AlterTableStmt *stmt = (AlterTableStmt *) parsetree;

		foreach(lc, stmt->cmds)
		{
			AlterTableCmd *cmd = lfirst(lc);
			Oid			partition;
			Oid			parent;
			SourceConfig *config;

			if (cmd->subtype != AT_AttachPartition && cmd->subtype != AT_DetachPartition &&
				cmd->subtype != AT_DetachPartitionFinalize)
				continue;
			partition = RangeVarGetRelid(((PartitionCmd *) cmd->def)->name, NoLock, true);
			if (!OidIsValid(partition))
				continue;
			if (cmd->subtype == AT_AttachPartition)
			{
				parent = RangeVarGetRelid(stmt->relation, NoLock, true);
				if (!OidIsValid(parent))
					continue;
				check_attachable_partition(parent, partition);
				change->attached = lappend_oid(change->attached, partition);
			}
			else
			{
				config = captured_as(partition);
				if (config != NULL && config->attached_relid != partition)
					change->detached = lappend_oid(change->detached, partition);
			}
		}
	}
}

/*
 * After a utility statement succeeded (utility_hook.c): the capture
 * triggers on every partition of an attached tree, none on a partition
 * that left one, and the rows a partition brings with it captured.
 */
void
partitions_after_utility(Node *parsetree, PartitionChange *change)
{
	ListCell   *lc;

	if (!change->concerned)
		return;

	/* DETACH ... CONCURRENTLY ends in a transaction of its own: still one */
	if (!IsTransactionState())
		return;
	CommandCounterIncrement();

	if (IsA(parsetree, CreateStmt))
	{
		CreateStmt *stmt = (CreateStmt *) parsetree;
		Oid			parent = RangeVarGetRelid(linitial(stmt->inhRelations), NoLock, true);

		/* the new partition is the one of the parent's tree without them */
		if (captured_as(parent) != NULL)
			add_triggers_to_tree(parent);
	}

	foreach(lc, change->detached)
		drop_triggers_from_tree(lfirst_oid(lc));

	foreach(lc, change->attached)
	{
		Oid			partition = lfirst_oid(lc);
		SourceConfig *config = captured_as(partition);
		Relation	rel;

		/* not into an attached tree; or attached on its own, rows and all */
		if (config == NULL || config->attached_relid == partition)
			continue;
		add_triggers_to_tree(partition);
		rel = table_open(partition, NoLock);
		capture_table_rows(rel, false);
		table_close(rel, NoLock);
	}
}
