/*-------------------------------------------------------------------------
 *
 * retraction.c
 *		detach(..., retract => true): taking a table's items off the portal.
 *
 * Which items of a table the portal holds is not recorded anywhere; what
 * it may hold is known: the current rows of the table, for the patients
 * whose data flows (every patient for insurance, enrolled patients for
 * the other kinds), and the rows whose changes are still in the outbox.
 * detach() queues, in the same transaction and under the table's source
 * id, one outbox entry per such patient holding the keys of those rows,
 * and records the retraction (the source's name and kind) in
 * portal_sync.retraction.  The worker sends every entry of a retracted
 * source as deletes, never an upsert and never folded into a snapshot
 * (snapshots leave the retracted source out), and forgets the retraction
 * once the outbox holds nothing of it.  The table itself is not needed
 * after detach(): it may be dropped or attached again at once; deletes
 * come before the rows of a new attachment, in seq order.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "portal_sync.h"

/*
 * Queue the deletes of a table being detached with retract => true and
 * record the retraction.  The caller is connected to SPI as the extension
 * owner, holds a lock on the table that keeps writers out, and has
 * already deleted the table's source row (source_id, kind, name are what
 * it held).
 */
void
queue_retraction(Relation rel, int32 source_id, const char *kind, const char *name,
				 const char *patient_col, const char *key_col)
{
	Oid			types[3] = {INT4OID, TEXTOID, TEXTOID};
	Datum		values[3] = {Int32GetDatum(source_id), CStringGetTextDatum(name),
	CStringGetTextDatum(kind)};
	const char *patient = quote_identifier(patient_col);
	const char *key = quote_identifier(key_col);
	bool		every_patient = strcmp(kind, "insurance") == 0;
	char	   *sql;
	int			ret;

	/*
	 * Without a chart source every chart counts as unrestricted: the
	 * retraction's entries would send restricted patients' records.
	 */
	if (strcmp(kind, "patient") == 0)
	{
		ret = SPI_execute("SELECT 1 FROM portal_sync.source", true, 1);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "reading portal_sync.source failed: %s", SPI_result_code_string(ret));
		if (SPI_processed > 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the chart source \"%s\" cannot be retracted while other tables are attached", name),
					 errdetail("Without a chart source every chart counts as unrestricted."),
					 errhint("Detach or retract the other tables first.")));
	}

	sql = psprintf("INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
				   " SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
				   "        r.patient, $1, 'd', r.keys, pg_catalog.statement_timestamp()"
				   " FROM (SELECT portal_sync.value_text(t.%s) AS patient,"
				   "              pg_catalog.array_agg(portal_sync.value_text(t.%s) ORDER BY t.%s) AS keys"
				   "       FROM %s t WHERE t.%s IS NOT NULL AND t.%s IS NOT NULL"
				   "       GROUP BY 1) r"
				   "%s"
				   " ORDER BY r.patient",
				   patient, key, key,
				   quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
											  RelationGetRelationName(rel)),
				   patient, key,
				   every_patient ? "" :
				   " WHERE EXISTS (SELECT 1 FROM portal_sync.enrollment e"
				   "               WHERE e.patient_id = r.patient)");
	ret = SPI_execute_with_args(sql, 1, types, values, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "queueing the deletes of a retraction failed: %s",
			 SPI_result_code_string(ret));
	pfree(sql);

	/* nothing of it queued: nothing to retract, nothing to remember */
	ret = SPI_execute_with_args("INSERT INTO portal_sync.retraction (source_id, name, kind)"
								" SELECT $1, $2, $3 WHERE EXISTS"
								" (SELECT 1 FROM portal_sync.outbox o WHERE o.source_id = $1)",
								3, types, values, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "recording a retraction failed: %s", SPI_result_code_string(ret));

	/* wake the worker at commit */
	outbox_note_queued();
}
