/*-------------------------------------------------------------------------
 *
 * enroll.c
 *		Enrollment of patients: the lookup on the capture path, the
 *		initiating event, portal_sync.enroll() and portal_sync.unenroll().
 *
 * An initiating event enrolls a patient by appending an enrollment request
 * (op 'e') to the outbox, in the EHR's own transaction.  Nothing is
 * updated and no unique index is probed, so two EHR transactions
 * enrolling patients never wait for or deadlock with each other.  The
 * delivery worker settles the request: it inserts the patient's row into
 * portal_sync.enrollment (it is that table's only writer) and serves the
 * request as the patient's snapshot.  Until then the request itself says
 * "enrolled": the capture path looks in both places (a partial index
 * holds the requests), with the latest snapshot.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/parallel.h"
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
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "portal_sync.h"
#include "string_map.h"
#include "unrecorded_writes.h"

PG_FUNCTION_INFO_V1(portal_sync_enroll);
PG_FUNCTION_INFO_V1(portal_sync_unenroll);

/* Column numbers of the patient in portal_sync.enrollment and .outbox */
#define Anum_enrollment_patient_id	1
#define Anum_outbox_seq				1
#define Anum_outbox_patient_id		2


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

	/* insert-only: an EHR's TRUNCATE never waits on enrollment rows */
	ret = SPI_execute_with_args("INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
								" SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
								"        p.patient_id, NULL, 's', NULL, pg_catalog.statement_timestamp()"
								" FROM (SELECT e.patient_id FROM portal_sync.enrollment e"
								"       WHERE $1 IS NULL OR e.patient_id = $1"
								"       UNION"
								"       SELECT o.patient_id FROM portal_sync.outbox o"
								"       WHERE o.op = 'e' AND ($1 IS NULL OR o.patient_id = $1)"
								"       ORDER BY 1) p"
								" RETURNING seq",
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
 * What this backend knows of patients' enrollment.  "Enrolled" by a
 * committed transaction is kept until portal_sync.enrollment changes in a
 * way that can end an enrollment: the worker, recording an unenroll(),
 * invalidates the table's relcache entry, and every backend drops its
 * cache at that commit.  "Not enrolled" is kept for the current
 * transaction only: a patient enrolled while it runs is covered by the
 * worker, which reads that patient's enrollment snapshot only after the
 * transactions that may have written unrecorded rows of the patient have
 * ended (snapshot_wait.c, unrecorded_writes.c).
 */
typedef struct EnrollmentCacheEntry
{
	char	   *patient_id;		/* key, in enrollment_cache_context */
	bool		enrolled;
	bool		for_good;		/* enrolled by a committed transaction */
	LocalTransactionId checked_in;	/* otherwise valid in this one only */
} EnrollmentCacheEntry;

/*
 * Most patients the cache holds; when it is full it starts again empty.
 * A practice's working set of a day fits; a statement touching more
 * patients than this asks again for some, which only costs an index probe.
 */
#define ENROLLMENT_CACHE_MAX_ENTRIES	8192

static HTAB *enrollment_cache = NULL;
static MemoryContext enrollment_cache_context = NULL;	/* table and keys */
static Oid	enrollment_cache_relid = InvalidOid;

/*
 * Drop the cache with everything it allocated.
 */
static void
enrollment_cache_reset(void)
{
	if (enrollment_cache_context != NULL)
		MemoryContextDelete(enrollment_cache_context);
	enrollment_cache_context = NULL;
	enrollment_cache = NULL;
}

/*
 * Forget the cache when portal_sync.enrollment goes (DROP EXTENSION), is
 * invalidated (an enrollment ended) or the relcache is reset.
 */
static void
enrollment_cache_invalidate(Datum arg, Oid relid)
{
	if (enrollment_cache != NULL &&
		(relid == InvalidOid || relid == enrollment_cache_relid))
		enrollment_cache_reset();
}

/*
 * Is there a row for the patient in this index of this table, visible to
 * the snapshot?  *mine is set when the row was written by the current
 * transaction, which may still roll back.
 */
static bool
index_has_patient(Oid relid, Oid indexid, AttrNumber patient_attnum,
				  const char *patient_id, Snapshot snapshot, bool *mine)
{
	Relation	rel = table_open(relid, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		found;

	/* systable_beginscan wants the table's column number */
	ScanKeyInit(&key, patient_attnum, BTEqualStrategyNumber, F_TEXTEQ,
				CStringGetTextDatum(patient_id));
	key.sk_collation = C_COLLATION_OID;

	scan = systable_beginscan(rel, indexid, true, snapshot, 1, &key);
	tuple = systable_getnext(scan);
	found = HeapTupleIsValid(tuple);
	*mine = found &&
		TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetXmin(tuple->t_data));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * The latest seq of the patient's outbox requests in this partial index
 * (op 'e' or 'x') visible to the snapshot, or 0.  *mine is set when that
 * request was written by the current transaction.
 */
static int64
latest_request_of_patient(const char *index_name, const char *patient_id,
						  Snapshot snapshot, bool *mine)
{
	Oid			indexid = portal_sync_relid_if_exists(index_name);
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	int64		latest = 0;

	*mine = false;
	if (!OidIsValid(indexid))
		return 0;
	rel = table_open(portal_sync_relid("outbox"), AccessShareLock);
	ScanKeyInit(&key, Anum_outbox_patient_id, BTEqualStrategyNumber, F_TEXTEQ,
				CStringGetTextDatum(patient_id));
	key.sk_collation = C_COLLATION_OID;
	scan = systable_beginscan(rel, indexid, true, snapshot, 1, &key);
	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		bool		isnull;
		int64		seq = DatumGetInt64(heap_getattr(tuple, Anum_outbox_seq,
													 RelationGetDescr(rel), &isnull));

		if (seq > latest)
		{
			latest = seq;
			*mine = TransactionIdIsCurrentTransactionId(HeapTupleHeaderGetXmin(tuple->t_data));
		}
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return latest;
}

/*
 * Look the patient up with the latest snapshot, so that an enrollment
 * committed while the current statement ran is seen too: in
 * portal_sync.enrollment, then among the enrollment requests the worker
 * has not settled yet.  The worker settles a request (inserts the
 * enrollment row) in the transaction that first reads it, so one snapshot
 * sees the patient in one place or the other.
 */
static bool
lookup_enrollment(const char *patient_id, bool *for_good)
{
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	Relation	enrollment;
	Oid			primary_key;
	bool		mine = false;
	bool		enrolled;
	int64		enroll_seq;
	int64		unenroll_seq;
	bool		enroll_mine;
	bool		unenroll_mine;

	enrollment = table_open(portal_sync_relid("enrollment"), AccessShareLock);
	primary_key = RelationGetPrimaryKeyIndex(enrollment);
	table_close(enrollment, AccessShareLock);

	enrolled = index_has_patient(portal_sync_relid("enrollment"), primary_key,
								 Anum_enrollment_patient_id, patient_id, snapshot, &mine);
	enroll_seq = latest_request_of_patient("outbox_enroll_request", patient_id, snapshot,
										   &enroll_mine);
	unenroll_seq = latest_request_of_patient("outbox_unenroll_request", patient_id, snapshot,
											 &unenroll_mine);
	if (unenroll_seq > enroll_seq)
	{
		/* unenroll() asked last: not enrolled, until a new request */
		enrolled = false;
		mine = unenroll_mine;
	}
	else if (!enrolled && enroll_seq > 0)
	{
		enrolled = true;
		mine = enroll_mine;
	}
	UnregisterSnapshot(snapshot);
	/* an enrollment of this very transaction may still roll back */
	*for_good = enrolled && !mine;
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
	bool		enrolled;
	bool		for_good;

	if (enrollment_cache != NULL &&
		hash_get_num_entries(enrollment_cache) >= ENROLLMENT_CACHE_MAX_ENTRIES)
		enrollment_cache_reset();
	if (enrollment_cache == NULL)
	{
		if (!callback_registered)
		{
			CacheRegisterRelcacheCallback(enrollment_cache_invalidate, (Datum) 0);
			callback_registered = true;
		}
		enrollment_cache_relid = portal_sync_relid("enrollment");
		enrollment_cache_context = AllocSetContextCreate(CacheMemoryContext,
														 "portal_sync enrollment cache",
														 ALLOCSET_DEFAULT_SIZES);
		enrollment_cache = string_map_create("portal_sync enrollment cache",
											 sizeof(EnrollmentCacheEntry),
											 enrollment_cache_context);
	}

	entry = string_map_find(enrollment_cache, patient_id);
	if (entry != NULL &&
		(entry->for_good || entry->checked_in == MyProc->lxid))
		return entry->enrolled;

	/* before the question: see unrecorded_writes.c */
	if (IsTransactionState() && !IsParallelWorker() &&
		TransactionIdIsValid(GetTopTransactionIdIfAny()))
		announce_unrecorded_candidate(patient_id);

	/*
	 * Opening the tables may process invalidations, which can drop the
	 * cache: ask first, then find (or make) the entry.
	 */
	enrolled = lookup_enrollment(patient_id, &for_good);
	if (enrollment_cache == NULL)
		return enrolled;
	entry = string_map_find(enrollment_cache, patient_id);
	if (entry == NULL)
	{
		char	   *key = MemoryContextStrdup(enrollment_cache_context, patient_id);

		entry = string_map_enter(enrollment_cache, key, &found);
	}
	entry->enrolled = enrolled;
	entry->for_good = for_good;
	entry->checked_in = MyProc->lxid;
	return enrolled;
}

/*
 * This backend enrolled or un-enrolled a patient: ask again next time.
 */
static void
forget_enrollment_of(const char *patient_id)
{
	if (enrollment_cache != NULL)
	{
		EnrollmentCacheEntry *entry = string_map_find(enrollment_cache, patient_id);

		if (entry != NULL)
			entry->checked_in = InvalidLocalTransactionId;	/* ask again */
	}
}

/*
 * Enrollment in a database whose extension is still at version 1.0: its
 * outbox has no enrollment requests, so the patient is enrolled at once as
 * 1.0 did.  This keeps the EHR's writes working between the installation
 * of this library and ALTER EXTENSION portal_sync UPDATE, which ends it.
 */
static void
enroll_patient_version_1_0(const char *patient_id, const char *enrolled_by)
{
	ExtensionOwnerContext owner;
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		args[2];

	args[0] = CStringGetTextDatum(patient_id);
	args[1] = CStringGetTextDatum(enrolled_by);
	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_with_args("WITH enrolled AS ("
							  "  INSERT INTO portal_sync.enrollment AS e"
							  "    (patient_id, enrolled_at, enrolled_by, snapshot_seq, snapshot_requested_at)"
							  "  VALUES ($1, pg_catalog.statement_timestamp(), $2,"
							  "          pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
							  "          pg_catalog.statement_timestamp())"
							  "  ON CONFLICT (patient_id) DO NOTHING"
							  "  RETURNING e.patient_id, e.snapshot_seq)"
							  " INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
							  " SELECT snapshot_seq, patient_id, NULL, 's', NULL, pg_catalog.statement_timestamp()"
							  " FROM enrolled",
							  2, argtypes, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "enrolling a patient failed");
	SPI_finish();
	restore_user(&owner);
	outbox_note_queued();
}

/*
 * Enroll a patient because of the named initiating event: append the
 * enrollment request, which the worker settles.  The caller has checked
 * that the patient is not enrolled; concurrent requests for one patient
 * are settled as one enrollment.
 */
void
enroll_patient(const char *patient_id, const char *enrolled_by)
{
	if (OidIsValid(portal_sync_relid_if_exists("outbox_enroll_request")))
		(void) outbox_queue_request(patient_id, OUTBOX_OP_ENROLL, enrolled_by);
	else
		enroll_patient_version_1_0(patient_id, enrolled_by);
	forget_enrollment_of(patient_id);
}

/*
 * A patient id given to a function (enroll('B1EEBC99-...')) as capture
 * writes it: read as a value of the chart's patient column and written
 * back, so that an upper-case uuid, say, names the same patient as the
 * column's canonical text.  Without a patient source attached, the text
 * as given.  A text that is not a value of that type is refused.
 */
/*
 * The type of the chart's patient column, looked up once per backend and
 * again after any relcache invalidation (attach and detach send one for
 * portal_sync.source, ALTER TABLE for the chart): a go-live enrolls
 * thousands of patients in one statement, and this query was most of the
 * cost of each enroll().
 */
static Oid	chart_patient_type = InvalidOid;
static bool chart_patient_type_valid = false;
static uint64 chart_patient_type_invalidations = 0;

static void
chart_patient_type_invalidate(Datum arg, Oid relid)
{
	chart_patient_type_valid = false;
	chart_patient_type_invalidations++;
}

static Oid
chart_patient_column_type(void)
{
	static bool callback_registered = false;
	ExtensionOwnerContext owner;
	Oid			type = InvalidOid;
	uint64		invalidations;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(chart_patient_type_invalidate, (Datum) 0);
		callback_registered = true;
	}
	AcceptInvalidationMessages();
	if (chart_patient_type_valid)
		return chart_patient_type;

	invalidations = chart_patient_type_invalidations;
	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT a.atttypid FROM portal_sync.source s"
					" JOIN pg_catalog.pg_attribute a"
					"   ON a.attrelid = s.relid AND a.attname = s.patient_col"
					" WHERE s.kind = 'patient' ORDER BY s.source_id LIMIT 1",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.source failed");
	if (SPI_processed == 1)
	{
		bool		isnull;

		type = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	}
	SPI_finish();
	restore_user(&owner);

	/* kept unless an invalidation arrived during the lookup */
	chart_patient_type = type;
	chart_patient_type_valid = invalidations == chart_patient_type_invalidations;
	return type;
}

char *
patient_id_as_captured(const char *patient_id)
{
	Oid			type;
	char	   *result;

	if (patient_id[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("patient_id must not be empty")));
	if (!OidIsValid(portal_sync_relid_if_exists("source")))
		return pstrdup(patient_id);

	type = chart_patient_column_type();
	if (!OidIsValid(type) || type == TEXTOID || type == VARCHAROID)
		return pstrdup(patient_id);
	{
		Oid			input;
		Oid			ioparam;
		Oid			output;
		bool		varlena;
		FmgrInfo	output_info;
		Datum		value;

		getTypeInputInfo(type, &input, &ioparam);
		getTypeOutputInfo(type, &output, &varlena);
		fmgr_info(output, &output_info);
		value = OidInputFunctionCall(input, (char *) patient_id, ioparam, -1);
		result = value_text(value, getBaseType(type), &output_info);
	}
	return result;
}

/*
 * portal_sync.enroll(patient_id text) RETURNS boolean
 *
 * Enroll a patient by hand; true if the patient was not enrolled (nor
 * being enrolled by a committed transaction) when it looked.
 */
Datum
portal_sync_enroll(PG_FUNCTION_ARGS)
{
	char	   *patient_id = patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));

	if (patient_is_enrolled(patient_id))
		PG_RETURN_BOOL(false);
	enroll_patient(patient_id, "enroll()");
	PG_RETURN_BOOL(true);
}

/*
 * portal_sync.unenroll(patient_id text) RETURNS boolean
 *
 * End a patient's enrollment: queue an unenrollment request, which the
 * worker sends as a purge; once the portal accepted it, the worker ends
 * the enrollment (and every backend's cached "enrolled"), and drops what
 * was still queued for the patient but insurance.  Until a new initiating
 * event, nothing but insurance flows for the patient.  True if the patient
 * was enrolled (or being enrolled by a committed transaction).
 */
Datum
portal_sync_unenroll(PG_FUNCTION_ARGS)
{
	char	   *patient_id;
	bool		for_good;

	if (!OidIsValid(portal_sync_relid_if_exists("outbox_enroll_request")))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("portal_sync.unenroll() needs version 1.1 of the extension"),
				 errhint("Run ALTER EXTENSION portal_sync UPDATE.")));
	patient_id = patient_id_as_captured(text_to_cstring(PG_GETARG_TEXT_PP(0)));

	if (!lookup_enrollment(patient_id, &for_good))
		PG_RETURN_BOOL(false);
	(void) outbox_queue_request(patient_id, OUTBOX_OP_UNENROLL, "unenroll()");
	forget_enrollment_of(patient_id);
	/* every backend asks again after this commit: the patient is not enrolled */
	CacheInvalidateRelcacheByRelid(portal_sync_relid("enrollment"));
	PG_RETURN_BOOL(true);
}

/*
 * Is the patient's enrollment the current transaction's own, not yet
 * committed?  Nothing can be ready for the patient before it commits.
 */
bool
enrollment_is_uncommitted_here(const char *patient_id)
{
	bool		for_good;

	return lookup_enrollment(patient_id, &for_good) && !for_good;
}
