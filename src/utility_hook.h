/*-------------------------------------------------------------------------
 *
 * utility_hook.h
 *		What each concern does around a utility statement, for the one
 *		ProcessUtility hook of portal_sync (utility_hook.c).
 *
 * Each concern keeps its logic in its own file and exposes a "before"
 * step, run before the statement (it may refuse the statement, or resolve
 * what the statement will change), and an "after" step, run only once the
 * statement succeeded, in the same transaction.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_UTILITY_HOOK_H
#define PORTAL_SYNC_UTILITY_HOOK_H

#include "nodes/nodes.h"
#include "nodes/pg_list.h"

/* Partition trees of attached tables (partitions.c) */
typedef struct PartitionChange
{
	bool		concerned;		/* the after step has work to look at */
	List	   *attached;		/* partitions put into a tree */
	List	   *detached;		/* partitions of an attached tree detached */
} PartitionChange;

extern void partitions_before_utility(Node *statement, PartitionChange *change);
extern void partitions_after_utility(Node *statement, PartitionChange *change);

/* Stored settings of attached tables across renames (attachment_ddl.c) */
extern List *attachment_ddl_before_utility(Node *statement);
extern void attachment_ddl_after_utility(Node *statement, List *resolved);

/* Commands that need a database without its worker (database_hook.c) */
extern int	database_pause_before_utility(Node *statement, Oid *dboid);
extern void database_pause_end(int index, Oid dboid);
extern void database_after_utility(Node *statement);

/* The hook itself (utility_hook.c), installed from _PG_init */
extern void utility_hook_install(void);

#endif							/* PORTAL_SYNC_UTILITY_HOOK_H */
