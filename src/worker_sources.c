/*-------------------------------------------------------------------------
 *
 * worker_sources.c
 *		The delivery worker's list of attached tables, kept between units.
 *
 * Loading the list generates every statement the worker runs on the
 * attached tables (source_reader.c), each then parsed once and kept
 * (planned at each run), and adds the sources being retracted
 * (retraction.c), which have no table and no statements.  The list stays until an invalidation says it may be stale:
 * a relcache invalidation of an attached table (attach, detach and every
 * ALTER TABLE send one) or of portal_sync.source, or a syscache
 * invalidation of a schema, a type or a function (their names are in the
 * generated SQL).  An error of the worker's step forgets it as well, so
 * whatever went wrong is loaded afresh on the next attempt.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

#include "portal_sync.h"
#include "source_reader.h"
#include "worker_sources.h"

static MemoryContext sources_context = NULL;
static List *sources = NIL;
static bool sources_valid = false;
static bool callbacks_registered = false;
static char *sources_signature = NULL;	/* read_signature() at the load */

static char *read_signature(void);

/* OIDs the list depends on, for the relcache callback (no catalog access there) */
static Oid *source_relids = NULL;
static int	nsource_relids = 0;
static Oid	source_table_relid = InvalidOid;

/*
 * Relcache invalidation callback: an attached table, portal_sync.source,
 * or everything (InvalidOid) changed.
 */
static void
sources_relcache_invalidate(Datum arg, Oid relid)
{
	if (!sources_valid)
		return;
	if (relid == InvalidOid || relid == source_table_relid)
	{
		sources_valid = false;
		return;
	}
	for (int i = 0; i < nsource_relids; i++)
	{
		if (source_relids[i] == relid)
		{
			sources_valid = false;
			return;
		}
	}
}

/*
 * Syscache invalidation callback: a schema, type or function changed.
 * These are rare; forgetting the list costs one load.
 */
static void
sources_syscache_invalidate(Datum arg, int cacheid, uint32 hashvalue)
{
	sources_valid = false;
}

/*
 * The sources being retracted (detach with retract => true): only their id,
 * name and kind, for the deletes the worker still sends of them.
 */
static List *
load_retracting_sources(void)
{
	List	   *retracting = NIL;
	int			ret;

	ret = spi_query("SELECT source_id, name, kind FROM portal_sync.retraction ORDER BY source_id",
					0, NULL, NULL, NULL, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.retraction failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		WorkerSource *source = palloc0(sizeof(WorkerSource));

		source->source_id = pg_strtoint32(SPI_getvalue(tuple, desc, 1));
		source->name = SPI_getvalue(tuple, desc, 2);
		source->kind_name = SPI_getvalue(tuple, desc, 3);
		if (!source_kind_from_name(source->kind_name, &source->kind))
			elog(ERROR, "portal_sync.retraction holds an unknown kind");
		source->relid = InvalidOid;
		source->retracting = true;
		retracting = lappend(retracting, source);
	}
	return retracting;
}

/*
 * Load the list and remember what it depends on.  Marked valid before the
 * load: an invalidation that arrives during it marks it stale again.
 */
static void
load_sources(void)
{
	MemoryContext oldcontext;
	ListCell   *lc;
	int			i = 0;

	free_worker_source_plans(sources);
	sources = NIL;
	nsource_relids = 0;
	if (sources_context == NULL)
		sources_context = AllocSetContextCreate(TopMemoryContext, "portal_sync sources",
												ALLOCSET_DEFAULT_SIZES);
	else
		MemoryContextReset(sources_context);
	source_relids = NULL;
	sources_signature = NULL;

	sources_valid = true;
	PG_TRY();
	{
		oldcontext = MemoryContextSwitchTo(sources_context);
		source_table_relid = portal_sync_relid("source");
		sources = list_concat(load_worker_sources(), load_retracting_sources());
		sources_signature = read_signature();
		source_relids = palloc(Max(list_length(sources), 1) * sizeof(Oid));
		foreach(lc, sources)
			source_relids[i++] = ((WorkerSource *) lfirst(lc))->relid;
		nsource_relids = i;
		MemoryContextSwitchTo(oldcontext);
	}
	PG_CATCH();
	{
		sources_valid = false;
		sources = NIL;
		nsource_relids = 0;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * The attached tables (a list of WorkerSource), with their statements;
 * the caller is in a transaction, connected to SPI, and must not change
 * or free them.  Valid until the next call.
 */
List *
worker_sources(void)
{
	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(sources_relcache_invalidate, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, sources_syscache_invalidate, (Datum) 0);
		CacheRegisterSyscacheCallback(TYPEOID, sources_syscache_invalidate, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, sources_syscache_invalidate, (Datum) 0);
		callbacks_registered = true;
	}
	AcceptInvalidationMessages();
	if (!sources_valid)
		load_sources();
	return sources;
}

/*
 * What the list was loaded from: every attached source with the
 * transaction that last wrote its settings, and every retraction.  Read
 * with the caller's snapshot.
 */
static char *
read_signature(void)
{
	char	   *signature;

	if (spi_query("SELECT pg_catalog.string_agg(k, ',' ORDER BY k) FROM"
				  " (SELECT 's' || source_id || ':' || xmin::pg_catalog.text AS k"
				  "  FROM portal_sync.source"
				  "  UNION ALL SELECT 'r' || source_id FROM portal_sync.retraction) x",
				  0, NULL, NULL, NULL, true) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "reading portal_sync.source failed");
	signature = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	SPI_freetuptable(SPI_tuptable);
	return signature ? signature : pstrdup("");
}

/*
 * Forget the list when the caller's snapshot sees other settings than the
 * list was loaded from: an attach(), a detach(..., retract => true) or a
 * re-attach that committed is visible a moment before its invalidations
 * arrive, and the entries or snapshot requests it queued in the same
 * transaction must never be read with the list as it was before.  The
 * caller is connected to SPI, with the snapshot it builds a unit with.
 */
void
worker_sources_check_snapshot(void)
{
	char	   *signature;

	if (!sources_valid)
		return;
	signature = read_signature();
	if (sources_signature == NULL || strcmp(signature, sources_signature) != 0)
		sources_valid = false;
	pfree(signature);
}

/*
 * Load the list again at the next call (after an error of the step).
 */
void
worker_sources_forget(void)
{
	sources_valid = false;
}
