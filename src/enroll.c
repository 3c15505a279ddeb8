/*-------------------------------------------------------------------------
 *
 * enroll.c
 *		Enrollment of patients: the lookup on the capture path, the
 *		initiating event, and portal_sync.enroll().
 *
 * A patient is enrolled by inserting a row into portal_sync.enrollment and,
 * in the same statement, a snapshot request into the outbox.  That runs as
 * the extension's owner with a safe search_path, because it is called from
 * the capture triggers, which run as whatever EHR role wrote the row.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/xact.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "portal_sync.h"
#include "string_map.h"
#include "seq_fence.h"

PG_FUNCTION_INFO_V1(portal_sync_enroll);

/* The statement that enrolls a patient; prepared once per backend. */
static SPIPlanPtr enroll_plan = NULL;

static const char *const enroll_sql =
"WITH enrolled AS ("
"  INSERT INTO portal_sync.enrollment AS e"
"    (patient_id, enrolled_at, enrolled_by, snapshot_seq, snapshot_requested_at)"
"  VALUES ($1, pg_catalog.statement_timestamp(), $2,"
"          pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
"          pg_catalog.statement_timestamp())"
"  ON CONFLICT (patient_id) DO NOTHING"
"  RETURNING e.patient_id, e.snapshot_seq)"
" INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
" SELECT snapshot_seq, patient_id, NULL, 's', NULL, pg_catalog.statement_timestamp()"
" FROM enrolled";

/*
 * Queue a snapshot for one enrolled patient, or for all of them when
 * patient_id is NULL.  Returns the number queued; *last_seq gets the seq
 * of the last one.  The caller runs as the extension's owner, connected
 * to SPI.
 */
int64
queue_resync(const char *patient_id, int64 *last_seq)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	char		nulls[2] = " ";
	int			ret;
	int64		count;

	if (patient_id != NULL)
		values[0] = CStringGetTextDatum(patient_id);
	else
		nulls[0] = 'n';

	seq_fence_claim(patient_id);
	ret = SPI_execute_with_args("WITH resync AS ("
								"  UPDATE portal_sync.enrollment"
								"  SET snapshot_seq = pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
								"      snapshot_requested_at = pg_catalog.statement_timestamp()"
								"  WHERE $1 IS NULL OR patient_id = $1"
								"  RETURNING patient_id, snapshot_seq)"
								" INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
								" SELECT snapshot_seq, patient_id, NULL, 's', NULL, pg_catalog.statement_timestamp()"
								" FROM resync ORDER BY snapshot_seq RETURNING seq",
								1, types, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "queueing snapshots failed: %s", SPI_result_code_string(ret));
	count = (int64) SPI_processed;
	if (last_seq != NULL)
	{
		*last_seq = 0;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			bool		isnull;
			int64		seq = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i],
														  SPI_tuptable->tupdesc, 1, &isnull));

			*last_seq = Max(*last_seq, seq);
		}
	}
	if (count > 0)
		outbox_note_queued();
	return count;
}

/*
 * Switch to the owner of schema portal_sync (the extension's owner) with a
 * search_path that only holds pg_catalog, for work that the current role
 * must not be able to do or to influence.
 */
void
become_extension_owner(ExtensionOwnerContext *context)
{
	HeapTuple	tuple;
	Oid			owner;
	Oid			namespace = get_namespace_oid(PORTAL_SYNC_SCHEMA, false);

	tuple = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(namespace));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for namespace %u", namespace);
	owner = ((Form_pg_namespace) GETSTRUCT(tuple))->nspowner;
	ReleaseSysCache(tuple);

	GetUserIdAndSecContext(&context->save_userid, &context->save_sec_context);
	SetUserIdAndSecContext(owner, context->save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	context->save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * Undo become_extension_owner.
 */
void
restore_user(ExtensionOwnerContext *context)
{
	AtEOXact_GUC(false, context->save_nestlevel);
	SetUserIdAndSecContext(context->save_userid, context->save_sec_context);
}

/*
 * What this backend knows of patients' enrollment.  An enrollment is never
 * undone, so "enrolled" is kept for good.  "Not enrolled" is kept for the
 * current transaction only: a patient enrolled while it runs is covered by
 * the worker, which reads that patient's snapshot only after every
 * transaction that was running at the enrollment has ended.
 */
typedef struct EnrollmentCacheEntry
{
	char	   *patient_id;		/* key */
	bool		enrolled;
	bool		for_good;		/* enrolled by a committed transaction */
	LocalTransactionId checked_in;	/* otherwise valid in this one only */
} EnrollmentCacheEntry;

static HTAB *enrollment_cache = NULL;
static Oid	enrollment_cache_relid = InvalidOid;

/*
 * Forget the cache when portal_sync.enrollment goes (DROP EXTENSION) or
 * the relcache is reset.
 */
static void
enrollment_cache_invalidate(Datum arg, Oid relid)
{
	if (enrollment_cache != NULL &&
		(relid == InvalidOid || relid == enrollment_cache_relid))
	{
		hash_destroy(enrollment_cache);
		enrollment_cache = NULL;
	}
}

/*
 * Look the patient up in the primary key of portal_sync.enrollment with
 * the latest snapshot, so that an enrollment committed while the current
 * statement ran is seen too.
 */
static bool
lookup_enrollment(const char *patient_id, bool *for_good)
{
	Relation	rel = table_open(portal_sync_relid("enrollment"), AccessShareLock);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		enrolled;

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_TEXTEQ,
				CStringGetTextDatum(patient_id));
	key.sk_collation = C_COLLATION_OID;

	scan = systable_beginscan(rel, RelationGetPrimaryKeyIndex(rel), true,
							  snapshot, 1, &key);
	tuple = systable_getnext(scan);
	enrolled = HeapTupleIsValid(tuple);
	/* an enrollment of this very transaction may still roll back */
	*for_good = enrolled &&
		!TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetXmin(tuple->t_data));
	systable_endscan(scan);

	UnregisterSnapshot(snapshot);
	table_close(rel, AccessShareLock);
	return enrolled;
}

/*
 * Is the patient enrolled?  Called once per patient per statement on the
 * capture path, so the answer is cached (see EnrollmentCacheEntry).
 */
bool
patient_is_enrolled(const char *patient_id)
{
	static bool callback_registered = false;
	EnrollmentCacheEntry *entry;
	bool		found;

	if (enrollment_cache == NULL)
	{
		if (!callback_registered)
		{
			CacheRegisterRelcacheCallback(enrollment_cache_invalidate, (Datum) 0);
			callback_registered = true;
		}
		enrollment_cache_relid = portal_sync_relid("enrollment");
		enrollment_cache = string_map_create("portal_sync enrollment cache",
											 sizeof(EnrollmentCacheEntry),
											 CacheMemoryContext);
	}

	entry = string_map_find(enrollment_cache, patient_id);
	if (entry != NULL &&
		(entry->for_good || entry->checked_in == MyProc->lxid))
		return entry->enrolled;

	if (entry == NULL)
	{
		char	   *key = MemoryContextStrdup(CacheMemoryContext, patient_id);

		entry = string_map_enter(enrollment_cache, key, &found);
	}
	entry->enrolled = lookup_enrollment(patient_id, &entry->for_good);
	entry->checked_in = MyProc->lxid;
	return entry->enrolled;
}

/*
 * Remember that this backend enrolled a patient.
 */
static void
note_enrolled(const char *patient_id)
{
	if (enrollment_cache != NULL)
	{
		EnrollmentCacheEntry *entry = string_map_find(enrollment_cache, patient_id);

		if (entry != NULL)
			entry->checked_in = InvalidLocalTransactionId;	/* ask again */
	}
}

/*
 * Enroll a patient because of the named initiating event.  Returns true if
 * the patient was not enrolled before; then a snapshot request is queued.
 * Concurrent enrollments of one patient queue a single snapshot.
 */
bool
enroll_patient(const char *patient_id, const char *enrolled_by)
{
	ExtensionOwnerContext owner;
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		args[2];
	int			ret;
	bool		newly_enrolled;

	args[0] = CStringGetTextDatum(patient_id);
	args[1] = CStringGetTextDatum(enrolled_by);

	seq_fence_claim(patient_id);
	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	if (enroll_plan == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare(enroll_sql, 2, argtypes);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(plan);
		enroll_plan = plan;
	}

	ret = SPI_execute_plan(enroll_plan, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "enrolling a patient failed: %s", SPI_result_code_string(ret));
	newly_enrolled = SPI_processed > 0;

	SPI_finish();
	restore_user(&owner);

	note_enrolled(patient_id);
	if (newly_enrolled)
		outbox_note_queued();
	return newly_enrolled;
}

/*
 * portal_sync.enroll(patient_id text) RETURNS boolean
 *
 * Enroll a patient by hand; true if newly enrolled.
 */
Datum
portal_sync_enroll(PG_FUNCTION_ARGS)
{
	char	   *patient_id = text_to_cstring(PG_GETARG_TEXT_PP(0));

	if (patient_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("patient_id must not be empty")));

	PG_RETURN_BOOL(enroll_patient(patient_id, "enroll()"));
}
