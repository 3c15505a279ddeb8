/*-------------------------------------------------------------------------
 *
 * source_cache.c
 *		Per-backend cache of the attached tables' settings.
 *
 * The capture triggers run on every write of the EHR, so the settings of
 * an attached table are read from portal_sync.source once per backend and
 * kept until a relcache invalidation of that table says they may have
 * changed (attach, detach and any ALTER TABLE send one).  Among them is
 * what capture derives from the settings: which columns an UPDATE must
 * change to be recorded.  A partition of an attached partitioned table
 * has an entry of its own: the settings of its topmost attached ancestor,
 * with the columns mapped by name to the partition's own row format
 * (attach, detach, and ATTACH / DETACH PARTITION invalidate the
 * partition's entry: they change its triggers).  The OIDs of the
 * extension's own relations are cached the same way.
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
#include "access/attmap.h"
#include "catalog/partition.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "nodes/bitmapset.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteManip.h"
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

/* Column numbers of portal_sync.source, as created by the install script. */
#define Anum_source_source_id		1
#define Anum_source_relid			2
#define Anum_source_kind			3
#define Anum_source_name			4
#define Anum_source_patient_attnum	5
#define Anum_source_key_attnum		6
#define Anum_source_date_attnum		7
#define Anum_source_privacy_attnum	8
#define Anum_source_share_when		10
#define Anum_source_enroll_when		12
#define Anum_source_column_attnums	14	/* since 1.1 */

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

static RelationOidCache relation_oids[] = {
	{"source", InvalidOid},
	{"outbox", InvalidOid},
	{"outbox_seq", InvalidOid},
	{"enrollment", InvalidOid},
	{"outbox_enroll_request", InvalidOid},
	{"skipped_row", InvalidOid},
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
			if (relid == InvalidOid || cached->relid == relid)
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
 * qsort comparator of attribute numbers.
 */
static int
compare_attnums(const void *a, const void *b)
{
	return (int) *(const AttrNumber *) a - (int) *(const AttrNumber *) b;
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
load_compared_columns(SourceConfig *config, HeapTuple tuple, TupleDesc desc,
					  Expr *enroll_when, AttrMap *map)
{
	Bitmapset  *attnums = NULL;
	bool		isnull;
	Datum		value;
	bool		all_columns = true;
	AttrNumber	natts = relation_natts(config->relid);
	int			member = -1;

	/* the attached table's numbers; mapped to the partition's below */
	attnums = add_attnum(attnums, DatumGetInt16(heap_getattr(tuple, Anum_source_patient_attnum,
															 desc, &isnull)));
	attnums = add_attnum(attnums, DatumGetInt16(heap_getattr(tuple, Anum_source_key_attnum,
															 desc, &isnull)));
	value = heap_getattr(tuple, Anum_source_date_attnum, desc, &isnull);
	if (!isnull)
		attnums = add_attnum(attnums, DatumGetInt16(value));
	value = heap_getattr(tuple, Anum_source_privacy_attnum, desc, &isnull);
	if (!isnull)
		attnums = add_attnum(attnums, DatumGetInt16(value));
	value = heap_getattr(tuple, Anum_source_share_when, desc, &isnull);
	if (!isnull)
		pull_varattnos(stringToNode(TextDatumGetCString(value)), 1, &attnums);
	if (enroll_when != NULL)
		pull_varattnos((Node *) enroll_when, 1, &attnums);

	/* a 1.0 schema has no columns list: every column is sent */
	if (desc->natts >= Anum_source_column_attnums)
	{
		value = heap_getattr(tuple, Anum_source_column_attnums, desc, &isnull);
		if (!isnull)
		{
			Datum	   *elements;
			int			count;

			deconstruct_array(DatumGetArrayTypeP(value), INT2OID, sizeof(int16), true,
							  TYPALIGN_SHORT, &elements, NULL, &count);
			for (int i = 0; i < count; i++)
				attnums = add_attnum(attnums, DatumGetInt16(elements[i]));
			all_columns = false;
		}
	}
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

		/* the attached table's column, as the partition numbers it */
		if (attnum > 0 && map != NULL)
			attnum = attnum <= map->maplen ? map->attnums[attnum - 1] : InvalidAttrNumber;
		if (attnum < 0)
			config->every_update_counts = true;
		else if (attnum > 0 && !all_columns && attnum <= natts &&
				 !column_is_dropped(config->relid, attnum))
			config->compared_attnums[config->ncompared++] = attnum;
	}
	/* ascending: a partition may number the columns in another order */
	if (map != NULL && !all_columns)
		qsort(config->compared_attnums, config->ncompared, sizeof(AttrNumber),
			  compare_attnums);
	config->compare_whole_row = all_columns && config->ncompared == natts;
}

/*
 * A column of the attached table as the table capture fires on numbers
 * it (the same table, or a partition: see partition_column_map).
 */
static AttrNumber
mapped_attnum(AttrMap *map, AttrNumber attnum)
{
	if (map == NULL || attnum == InvalidAttrNumber)
		return attnum;
	if (attnum > map->maplen || map->attnums[attnum - 1] == InvalidAttrNumber)
		elog(ERROR, "a column of an attached table is missing from its partition");
	return map->attnums[attnum - 1];
}

/*
 * Fill a cache entry from the tuple of portal_sync.source for its table,
 * the cached table itself or its topmost attached ancestor.
 */
static void
load_source_config(CachedSource *cached, HeapTuple tuple, TupleDesc desc,
				   Oid attached_relid)
{
	SourceConfig *config = &cached->config;
	bool		isnull;
	Datum		value;
	Oid			typoutput;
	bool		typisvarlena;
	Oid			patient_type;
	Oid			key_type;
	MemoryContext oldcontext;
	AttrMap    *map = NULL;
	Expr	   *enroll_when;

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
	if (attached_relid != cached->relid)
		map = partition_column_map(attached_relid, cached->relid);
	config->source_id = DatumGetInt32(heap_getattr(tuple, Anum_source_source_id, desc, &isnull));
	if (!source_kind_from_name(TextDatumGetCString(heap_getattr(tuple, Anum_source_kind, desc, &isnull)),
							   &config->kind))
		elog(ERROR, "portal_sync.source holds an unknown kind");
	config->name = TextDatumGetCString(heap_getattr(tuple, Anum_source_name, desc, &isnull));
	config->patient_attnum = mapped_attnum(map, DatumGetInt16(heap_getattr(tuple, Anum_source_patient_attnum, desc, &isnull)));
	config->key_attnum = mapped_attnum(map, DatumGetInt16(heap_getattr(tuple, Anum_source_key_attnum, desc, &isnull)));

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

	value = heap_getattr(tuple, Anum_source_enroll_when, desc, &isnull);
	enroll_when = isnull ? NULL : rule_expr_load(TextDatumGetCString(value));

	load_compared_columns(config, tuple, desc, enroll_when, map);

	/* the rule reads the partition's rows, in its row format */
	config->enroll_when = enroll_when;
	if (enroll_when != NULL && map != NULL)
	{
		bool		found_whole_row;

		config->enroll_when = (Expr *)
			map_variable_attnos((Node *) enroll_when, 1, 0, map,
								get_rel_type_id(attached_relid), &found_whole_row);
	}

	MemoryContextSwitchTo(oldcontext);
	config->valid = true;
}

/*
 * The settings of an attached table, or NULL if it is not attached.  A
 * partition (at any level) of an attached partitioned table gets the
 * settings of its topmost attached ancestor, mapped to its own columns.
 *
 * portal_sync.source is read directly, with the latest snapshot, so that
 * the EHR's roles need no privilege on it.
 */
SourceConfig *
source_config_lookup(Oid relid)
{
	CachedSource *cached;
	bool		found;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;
	Snapshot	snapshot;
	List	   *candidates;
	HeapTuple	best = NULL;
	int			best_level = -1;
	Oid			best_relid = InvalidOid;

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

	/* the table, then its ancestors up to the root of its partition tree */
	candidates = list_make1_oid(relid);
	if (get_rel_relispartition(relid))
		candidates = list_concat(candidates, get_partition_ancestors(relid));

	rel = table_open(portal_sync_relid("source"), AccessShareLock);
	snapshot = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snapshot, 0, NULL);
	while ((tuple = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		bool		isnull;
		Oid			row_relid = DatumGetObjectId(heap_getattr(tuple, Anum_source_relid,
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
		load_source_config(cached, best, RelationGetDescr(rel), best_relid);
		heap_freetuple(best);
	}
	table_close(rel, AccessShareLock);
	list_free(candidates);

	return cached->config.valid ? &cached->config : NULL;
}
