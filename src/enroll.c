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
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "portal_sync.h"
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
 * Is the patient enrolled?  Looked up in the primary key of
 * portal_sync.enrollment with the latest snapshot, so that an enrollment
 * committed while the current statement ran is seen too.
 */
bool
patient_is_enrolled(const char *patient_id)
{
	Relation	rel = table_open(portal_sync_relid("enrollment"), AccessShareLock);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	ScanKeyData key;
	SysScanDesc scan;
	bool		enrolled;

	ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_TEXTEQ,
				CStringGetTextDatum(patient_id));
	key.sk_collation = C_COLLATION_OID;

	scan = systable_beginscan(rel, RelationGetPrimaryKeyIndex(rel), true,
							  snapshot, 1, &key);
	enrolled = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);

	UnregisterSnapshot(snapshot);
	table_close(rel, AccessShareLock);
	return enrolled;
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
