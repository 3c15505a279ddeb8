/*-------------------------------------------------------------------------
 *
 * source_cache.c
 *		Per-backend cache of the attached tables' settings.
 *
 * The capture triggers run on every write of the EHR, so the settings of
 * an attached table are read from portal_sync.source once per backend and
 * kept until a relcache invalidation of that table says they may have
 * changed (attach, detach and any ALTER TABLE send one), or one of
 * portal_sync.source itself (its trigger sends one at every change, a
 * pg_restore's COPY included).  The settings name columns and hold rules
 * as SQL text: they are resolved against the table and analyzed here, at
 * load, never per row.  Among them is what capture derives from the
 * settings: which columns an UPDATE must change to be recorded.  A
 * partition of an attached partitioned table has an entry of its own: the
 * settings of its topmost attached ancestor, whose names are resolved
 * against the partition's own row format (attach, detach, and ATTACH /
 * DETACH PARTITION invalidate the partition's entry: they change its
 * triggers).  The OIDs of the extension's own relations are cached the
 * same way.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "nodes/bitmapset.h"
#include "optimizer/optimizer.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "portal_sync.h"

PG_FUNCTION_INFO_V1(portal_sync_source_changed);

typedef struct CachedSource
{
	Oid			relid;			/* hash key */
	MemoryContext context;		/* holds everything the entry points to */
	SourceConfig config;
} CachedSource;

typedef struct RelationOidCache
{
	const char *relname;
	Oid			relid;
} RelationOidCache;

static HTAB *source_cache = NULL;

/* portal_sync.source when the cached settings were read from it */
static Oid	settings_relid = InvalidOid;

static RelationOidCache relation_oids[] = {
	{"source", InvalidOid},
	{"outbox", InvalidOid},
	{"outbox_seq", InvalidOid},
	{"enrollment", InvalidOid},
	{"outbox_enroll_request", InvalidOid},
	{"skipped_row", InvalidOid},
	{"retraction", InvalidOid},
	{NULL, InvalidOid}
};

static const char *const source_kind_names[] = {
	[SOURCE_APPOINTMENT] = "appointment",
	[SOURCE_CCDA] = "ccda",
	[SOURCE_NOTE] = "note",
	[SOURCE_PIN] = "pin",
	[SOURCE_INSURANCE] = "insurance",
	[SOURCE_CLINICAL] = "clinical",
	[SOURCE_PATIENT] = "patient"
};

/*
 * Map the kind text of attach() and portal_sync.source to the enum.
 */
bool
source_kind_from_name(const char *name, SourceKind *kind)
{
	for (int i = 0; i < lengthof(source_kind_names); i++)
	{
		if (strcmp(name, source_kind_names[i]) == 0)
		{
			*kind = (SourceKind) i;
			return true;
		}
	}
	return false;
}

/*
 * The kinds whose rows can be initiating events (SPEC §1).
 */
bool
source_kind_enrolls(SourceKind kind)
{
	return kind == SOURCE_APPOINTMENT || kind == SOURCE_CCDA ||
		kind == SOURCE_NOTE || kind == SOURCE_PIN;
}

/*
 * Relcache invalidation callback: forget what may have changed.  A reset
 * (InvalidOid) forgets everything.
 */
static void
source_cache_invalidate(Datum arg, Oid relid)
{
	bool		all_settings = relid == InvalidOid ||
		(OidIsValid(settings_relid) && relid == settings_relid);

	for (RelationOidCache *entry = relation_oids; entry->relname; entry++)
	{
		if (relid == InvalidOid || entry->relid == relid)
		{
			for (RelationOidCache *all = relation_oids; all->relname; all++)
				all->relid = InvalidOid;
			break;
		}
	}

	if (source_cache != NULL)
	{
		HASH_SEQ_STATUS status;
		CachedSource *cached;

		hash_seq_init(&status, source_cache);
		while ((cached = hash_seq_search(&status)) != NULL)
		{
			if (all_settings || cached->relid == relid)
				cached->config.valid = false;
		}
	}
}

/*
 * Create the cache on first use and hook it to relcache invalidations.
 */
static void
source_cache_init(void)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(CachedSource);
	ctl.hcxt = CacheMemoryContext;
	source_cache = hash_create("portal_sync sources", 32, &ctl,
							   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	CacheRegisterRelcacheCallback(source_cache_invalidate, (Datum) 0);
}

/*
 * OID of one of the extension's relations in schema portal_sync, or
 * InvalidOid if it does not exist (an older version of the extension's
 * schema, or the extension is not installed).
 */
Oid
portal_sync_relid_if_exists(const char *relname)
{
	RelationOidCache *entry;

	if (source_cache == NULL)
		source_cache_init();

	for (entry = relation_oids; entry->relname; entry++)
	{
		if (strcmp(entry->relname, relname) == 0)
			break;
	}
	Assert(entry->relname != NULL);

	if (!OidIsValid(entry->relid))
	{
		Oid			namespace = get_namespace_oid(PORTAL_SYNC_SCHEMA, true);

		if (OidIsValid(namespace))
			entry->relid = get_relname_relid(relname, namespace);
	}
	return entry->relid;
}

/*
 * OID of one of the extension's relations in schema portal_sync; errors
 * out if the extension is not installed in this database.
 */
Oid
portal_sync_relid(const char *relname)
{
	Oid			relid = portal_sync_relid_if_exists(relname);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension portal_sync is not installed in this database"),
				 errhint("Run CREATE EXTENSION portal_sync.")));
	return relid;
}

/*
 * portal_sync.source_changed(): statement trigger of portal_sync.source.
 * Whoever changed the settings (attach, a rename, a restore's COPY or
 * INSERTs), every backend's capture and the delivery worker load them
 * again.
 */
Datum
portal_sync_source_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "portal_sync.source_changed() must be called as a trigger");
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	return PointerGetDatum(NULL);
}

/*
 * The number of attributes of a table, dropped ones included.
 */
static AttrNumber
relation_natts(Oid relid)
{
	HeapTuple	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	AttrNumber	natts;

	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	natts = ((Form_pg_class) GETSTRUCT(tuple))->relnatts;
	ReleaseSysCache(tuple);
	return natts;
}

/*
 * Is this attribute of the table a dropped column?  Rows written before
 * the drop still hold its old value, and rows written after hold NULL:
 * comparing it would count every old row's update as a change.
 */
static bool
column_is_dropped(Oid relid, AttrNumber attnum)
{
	HeapTuple	tuple = SearchSysCache2(ATTNUM, ObjectIdGetDatum(relid),
										Int16GetDatum(attnum));
	bool		dropped = true;

	if (HeapTupleIsValid(tuple))
	{
		dropped = ((Form_pg_attribute) GETSTRUCT(tuple))->attisdropped;
		ReleaseSysCache(tuple);
	}
	return dropped;
}

/*
 * Add an attribute number to a set kept the way pull_varattnos keeps it.
 */
static Bitmapset *
add_attnum(Bitmapset *attnums, AttrNumber attnum)
{
	if (attnum == InvalidAttrNumber)
		return attnums;
	return bms_add_member(attnums, attnum - FirstLowInvalidHeapAttributeNumber);
}

/*
 * The column of portal_sync.source with this name, or 0.  Looked up by
 * name: a schema updated from 1.0 holds dropped columns, so numbers differ
 * from a fresh install's.
 */
static AttrNumber
settings_column(TupleDesc desc, const char *name)
{
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute attr = TupleDescAttr(desc, i);

		if (!attr->attisdropped && strcmp(NameStr(attr->attname), name) == 0)
			return attr->attnum;
	}
	return InvalidAttrNumber;
}

/*
 * A column of portal_sync.source's tuple; *isnull if it is NULL or the
 * schema has no such column.
 */
static Datum
settings_value(HeapTuple tuple, TupleDesc desc, const char *name, bool *isnull)
{
	AttrNumber	attnum = settings_column(desc, name);

	if (attnum == InvalidAttrNumber)
	{
		*isnull = true;
		return (Datum) 0;
	}
	return heap_getattr(tuple, attnum, desc, isnull);
}

/*
 * Does portal_sync.source keep columns by name and rules as text (1.1)?
 * A 1.0 schema, until ALTER EXTENSION ... UPDATE, keeps attribute numbers
 * and node trees, and this library still captures into it.
 */
bool
source_settings_by_name(void)
{
	return get_attnum(portal_sync_relid("source"), "patient_col") != InvalidAttrNumber;
}

/*
 * The attribute number of a column the settings name, which must exist:
 * attach() checked it, the capture trigger's dependencies keep it from
 * being dropped, and a rename rewrites the name.
 */
static AttrNumber
stored_column(Oid relid, const char *column, const char *argname)
{
	AttrNumber	attnum = get_attnum(relid, column);

	if (attnum == InvalidAttrNumber || attnum < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of attached table \"%s\" does not exist",
						column, get_rel_name(relid)),
				 errdetail("portal_sync.source gives it as %s.", argname),
				 errhint("Attach the table again with portal_sync.attach().")));
	return attnum;
}

/*
 * A column number of 1.0's settings, or InvalidAttrNumber for NULL.
 */
static AttrNumber
stored_attnum(HeapTuple tuple, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		value = settings_value(tuple, desc, name, &isnull);

	return isnull ? InvalidAttrNumber : DatumGetInt16(value);
}

/*
 * A named column of the settings (1.1), or InvalidAttrNumber for NULL.
 */
static AttrNumber
stored_named_column(Oid relid, HeapTuple tuple, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		value = settings_value(tuple, desc, name, &isnull);

	return isnull ? InvalidAttrNumber
		: stored_column(relid, NameStr(*DatumGetName(value)), name);
}

/*
 * A rule of the settings, analyzed against the table, or NULL.
 */
static Node *
stored_rule(Oid relid, HeapTuple tuple, TupleDesc desc, const char *name, bool by_name)
{
	bool		isnull;
	Datum		value = settings_value(tuple, desc, name, &isnull);
	Relation	rel;
	Node	   *expr;

	if (isnull)
		return NULL;
	if (!by_name)
		return rule_expr_load_node_tree(TextDatumGetCString(value));
	rel = relation_open(relid, AccessShareLock);
	expr = rule_expr_analyze_stored(rel, TextDatumGetCString(value), name);
	relation_close(rel, NoLock);
	return expr;
}

/*
 * Resolve one tuple of portal_sync.source against its table, in the
 * current memory context.
 */
static void
resolve_settings(Oid relid, HeapTuple tuple, TupleDesc desc, StoredSource *stored)
{
	bool		by_name = settings_column(desc, "patient_col") != InvalidAttrNumber;
	bool		isnull;
	Datum		value;

	memset(stored, 0, sizeof(StoredSource));
	stored->source_id = DatumGetInt32(settings_value(tuple, desc, "source_id", &isnull));
	stored->kind_name = TextDatumGetCString(settings_value(tuple, desc, "kind", &isnull));
	if (!source_kind_from_name(stored->kind_name, &stored->kind))
		elog(ERROR, "portal_sync.source holds an unknown kind");
	stored->name = TextDatumGetCString(settings_value(tuple, desc, "name", &isnull));
	stored->ncolumns = -1;

	if (by_name)
	{
		stored->patient_attnum = stored_named_column(relid, tuple, desc, "patient_col");
		stored->key_attnum = stored_named_column(relid, tuple, desc, "key_col");
		stored->date_attnum = stored_named_column(relid, tuple, desc, "date_col");
		stored->privacy_attnum = stored_named_column(relid, tuple, desc, "privacy_col");
		value = settings_value(tuple, desc, "columns", &isnull);
		if (!isnull)
		{
			Datum	   *elements;
			int			count;

			deconstruct_array(DatumGetArrayTypeP(value), NAMEOID, NAMEDATALEN, false,
							  TYPALIGN_CHAR, &elements, NULL, &count);
			stored->ncolumns = count;
			stored->columns = palloc(Max(count, 1) * sizeof(AttrNumber));
			for (int i = 0; i < count; i++)
				stored->columns[i] = stored_column(relid, NameStr(*DatumGetName(elements[i])),
												   "columns");
		}
	}
	else
	{
		stored->patient_attnum = stored_attnum(tuple, desc, "patient_attnum");
		stored->key_attnum = stored_attnum(tuple, desc, "key_attnum");
		stored->date_attnum = stored_attnum(tuple, desc, "date_attnum");
		stored->privacy_attnum = stored_attnum(tuple, desc, "privacy_attnum");
	}
	stored->share_when = stored_rule(relid, tuple, desc, "share_when", by_name);
	stored->enroll_when = stored_rule(relid, tuple, desc, "enroll_when", by_name);
}

/*
 * Work out, once per attachment, which columns an UPDATE must change to be
 * captured: the columns sent in data (all of them when the source has no
 * columns list), the patient, key, date and privacy columns, and every
 * column share_when or enroll_when reads.  An UPDATE that changes none of
 * them changes nothing the portal sees or the rules decide on.  A rule
 * that reads the whole row compares every column; one that reads a system
 * column (which every UPDATE changes) makes every update count.
 */
static void
load_compared_columns(SourceConfig *config, StoredSource *stored)
{
	Bitmapset  *attnums = NULL;
	bool		all_columns = stored->ncolumns < 0;
	AttrNumber	natts = relation_natts(config->relid);
	int			member = -1;

	attnums = add_attnum(attnums, stored->patient_attnum);
	attnums = add_attnum(attnums, stored->key_attnum);
	attnums = add_attnum(attnums, stored->date_attnum);
	attnums = add_attnum(attnums, stored->privacy_attnum);
	if (stored->share_when != NULL)
		pull_varattnos(stored->share_when, 1, &attnums);
	if (stored->enroll_when != NULL)
		pull_varattnos(stored->enroll_when, 1, &attnums);
	for (int i = 0; i < stored->ncolumns; i++)
		attnums = add_attnum(attnums, stored->columns[i]);
	if (bms_is_member(0 - FirstLowInvalidHeapAttributeNumber, attnums))
		all_columns = true;

	config->every_update_counts = false;
	config->ncompared = 0;
	config->compared_attnums = palloc(Max(natts, 1) * sizeof(AttrNumber));
	if (all_columns)
	{
		for (AttrNumber attnum = 1; attnum <= natts; attnum++)
		{
			if (!column_is_dropped(config->relid, attnum))
				config->compared_attnums[config->ncompared++] = attnum;
		}
	}
	while ((member = bms_next_member(attnums, member)) >= 0)
	{
		AttrNumber	attnum = member + FirstLowInvalidHeapAttributeNumber;

		if (attnum < 0)
			config->every_update_counts = true;
		else if (attnum > 0 && !all_columns && attnum <= natts &&
				 !column_is_dropped(config->relid, attnum))
			config->compared_attnums[config->ncompared++] = attnum;
	}
	config->compare_whole_row = all_columns && config->ncompared == natts;
}

/*
 * Fill a cache entry from the tuple of portal_sync.source for its table.
 */
static void
load_source_config(CachedSource *cached, HeapTuple tuple, TupleDesc desc,
				   Oid attached_relid)
{
	SourceConfig *config = &cached->config;
	StoredSource stored;
	Oid			typoutput;
	bool		typisvarlena;
	Oid			patient_type;
	Oid			key_type;
	MemoryContext oldcontext;

	if (cached->context == NULL)
		cached->context = AllocSetContextCreate(CacheMemoryContext,
												"portal_sync source",
												ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(cached->context);
	oldcontext = MemoryContextSwitchTo(cached->context);

	memset(config, 0, sizeof(SourceConfig));
	config->relid = cached->relid;
	config->attached_relid = attached_relid;
	/* by name: a partition may number the columns otherwise */
	resolve_settings(config->relid, tuple, desc, &stored);
	config->source_id = stored.source_id;
	config->kind = stored.kind;
	config->name = stored.name;
	config->patient_attnum = stored.patient_attnum;
	config->key_attnum = stored.key_attnum;

	patient_type = get_atttype(config->relid, config->patient_attnum);
	getTypeOutputInfo(patient_type, &typoutput, &typisvarlena);
	fmgr_info(typoutput, &config->patient_output);
	config->patient_byval = get_typbyval(patient_type);
	config->patient_type = getBaseType(patient_type);

	key_type = get_atttype(config->relid, config->key_attnum);
	getTypeOutputInfo(key_type, &typoutput, &typisvarlena);
	fmgr_info(typoutput, &config->key_output);
	get_typlenbyval(key_type, &config->key_typlen, &config->key_byval);
	config->key_type = getBaseType(key_type);

	config->enroll_when = stored.enroll_when == NULL ? NULL
		: expression_planner((Expr *) copyObject(stored.enroll_when));

	load_compared_columns(config, &stored);

	MemoryContextSwitchTo(oldcontext);
	config->valid = true;
}

/*
 * Find the tuple of portal_sync.source for a table, or with
 * with_ancestors for the topmost of the table and its partition ancestors
 * that is attached, and pass it to the callback with the attached table's
 * OID; false if none is attached.  portal_sync.source is read directly,
 * with the latest snapshot, so that the EHR's roles need no privilege on
 * it.
 */
static bool
scan_settings(Oid relid, bool with_ancestors,
			  void (*found) (HeapTuple, TupleDesc, Oid, void *), void *arg)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	Snapshot	snapshot;
	AttrNumber	relid_attnum;
	List	   *candidates = list_make1_oid(relid);
	HeapTuple	best = NULL;
	int			best_level = -1;
	Oid			best_relid = InvalidOid;

	/* the table, then its ancestors up to the root of its partition tree */
	if (with_ancestors && get_rel_relispartition(relid))
		candidates = list_concat(candidates, get_partition_ancestors(relid));

	settings_relid = portal_sync_relid("source");
	rel = table_open(settings_relid, AccessShareLock);
	relid_attnum = settings_column(RelationGetDescr(rel), "relid");
	snapshot = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snapshot, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		bool		isnull;
		Oid			row_relid = DatumGetObjectId(heap_getattr(tuple, relid_attnum,
															  RelationGetDescr(rel), &isnull));
		int			level = 0;
		ListCell   *lc;

		foreach(lc, candidates)
		{
			if (lfirst_oid(lc) == row_relid && level > best_level)
			{
				if (best != NULL)
					heap_freetuple(best);
				best = heap_copytuple(tuple);
				best_level = level;
				best_relid = row_relid;
			}
			level++;
		}
	}
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	if (best != NULL)
	{
		found(best, RelationGetDescr(rel), best_relid, arg);
		heap_freetuple(best);
	}
	table_close(rel, AccessShareLock);
	list_free(candidates);
	return best != NULL;
}

/* scan_settings() callbacks */
static void
found_for_cache(HeapTuple tuple, TupleDesc desc, Oid attached_relid, void *arg)
{
	load_source_config((CachedSource *) arg, tuple, desc, attached_relid);
}

typedef struct SettingsReadArg
{
	Oid			relid;
	StoredSource *stored;
} SettingsReadArg;

static void
found_for_read(HeapTuple tuple, TupleDesc desc, Oid attached_relid, void *arg)
{
	SettingsReadArg *read = (SettingsReadArg *) arg;

	resolve_settings(read->relid, tuple, desc, read->stored);
}

/*
 * The settings of an attached table, or NULL if it is not attached.  A
 * partition (at any level) of an attached partitioned table gets the
 * settings of its topmost attached ancestor, resolved against its own
 * columns.
 */
SourceConfig *
source_config_lookup(Oid relid)
{
	CachedSource *cached;
	bool		found;

	if (source_cache == NULL)
		source_cache_init();

	cached = hash_search(source_cache, &relid, HASH_ENTER, &found);
	if (!found)
	{
		cached->context = NULL;
		cached->config.valid = false;
	}
	if (cached->config.valid)
		return &cached->config;

	(void) scan_settings(relid, true, found_for_cache, cached);
	return cached->config.valid ? &cached->config : NULL;
}

/*
 * The stored settings of a table resolved against it as it is now, read
 * afresh (not cached), in the current memory context; false if the table
 * is not attached.
 */
bool
source_settings_read(Oid relid, StoredSource *stored)
{
	SettingsReadArg arg = {relid, stored};

	if (source_cache == NULL)
		source_cache_init();
	return scan_settings(relid, false, found_for_read, &arg);
}

/* scan_settings() callback that only notes the table is attached */
static void
found_nothing_to_do(HeapTuple tuple, TupleDesc desc, Oid attached_relid, void *arg)
{
}

/*
 * Is this table attached?  Read afresh, without resolving its settings.
 */
bool
source_is_attached(Oid relid)
{
	if (source_cache == NULL)
		source_cache_init();
	return scan_settings(relid, false, found_nothing_to_do, NULL);
}

/*
 * The OIDs of every attached table, read afresh.
 */
List *
source_attached_relids(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	Snapshot	snapshot;
	AttrNumber	relid_attnum;
	List	   *relids = NIL;

	rel = table_open(portal_sync_relid("source"), AccessShareLock);
	relid_attnum = settings_column(RelationGetDescr(rel), "relid");
	snapshot = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snapshot, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		bool		isnull;

		relids = lappend_oid(relids, DatumGetObjectId(heap_getattr(tuple, relid_attnum,
																   RelationGetDescr(rel), &isnull)));
	}
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(rel, AccessShareLock);
	return relids;
}
