/*-------------------------------------------------------------------------
 *
 * unit_commit.c
 *		Recording what the portal answered: the outbox entries it
 *		consumed, dead letters, enrollment state and the delivery log.
 *
 * Runs in a short transaction after each POST.  An outbox entry is deleted
 * once every key of it was accepted or dead-lettered; a partly consumed
 * entry keeps the keys still owed.  If the worker dies between the
 * portal's answer and this commit, the events are built again; those
 * whose content did not change keep their event ids, and the portal drops
 * them as duplicates.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/inval.h"

#include "delivery.h"
#include "shared_state.h"
#include "source_reader.h"
#include "worker_sources.h"

/*
 * Build a text[] or int8[] datum.
 */
static Datum
make_array(Datum *elements, int count, Oid element_type)
{
	if (element_type == TEXTOID)
		return PointerGetDatum(construct_array(elements, count, TEXTOID, -1, false, TYPALIGN_INT));
	return PointerGetDatum(construct_array(elements, count, INT8OID, 8, FLOAT8PASSBYVAL,
										   TYPALIGN_DOUBLE));
}

/*
 * Run a statement that must succeed.
 */
static void
execute_or_fail(const char *sql, int nargs, Oid *types, Datum *values,
				const char *nulls, int expected)
{
	int			ret = spi_query(sql, nargs, types, values, nulls, false);

	if (ret != expected)
		elog(ERROR, "portal_sync: recording a delivery failed: %s",
			 SPI_result_code_string(ret));
}

/*
 * Mark what an event consumes.
 */
static void
apply_consumption(DeliveryUnit *unit, DeliveryEvent *event)
{
	ListCell   *lc;

	foreach(lc, event->consumes)
	{
		Consumption *consumption = lfirst(lc);
		OutboxEntry *entry = &unit->entries[consumption->entry];

		if (consumption->key_index < 0)
			entry->consumed = true;
		else
			entry->key_consumed[consumption->key_index] = true;
		entry->changed = true;
	}
}

/*
 * A retraction whose deletes have all been delivered (or dead-lettered) is
 * over: the source is forgotten, and the worker's source list loses it.
 */
static void
forget_finished_retractions(void)
{
	execute_or_fail("DELETE FROM portal_sync.retraction r"
					" WHERE NOT EXISTS (SELECT 1 FROM portal_sync.outbox o"
					"                   WHERE o.source_id = r.source_id)",
					0, NULL, NULL, NULL, SPI_OK_DELETE);
	if (SPI_processed > 0)
		worker_sources_forget();
}

/*
 * Write back the entries whose consumption changed: delete the finished
 * ones, shorten the others to the keys still owed.
 */
static void
write_back_entries(DeliveryUnit *unit)
{
	Datum	   *finished = palloc(Max(unit->nentries, 1) * sizeof(Datum));
	int			nfinished = 0;

	for (int i = 0; i < unit->nentries; i++)
	{
		OutboxEntry *entry = &unit->entries[i];
		Datum	   *remaining;
		int			nremaining = 0;

		if (!entry->changed)
			continue;
		entry->changed = false;

		remaining = palloc(Max(entry->nkeys + entry->nunserved, 1) * sizeof(Datum));
		if (!entry->consumed)
		{
			for (int k = 0; k < entry->nkeys; k++)
				if (!entry->key_consumed[k])
					remaining[nremaining++] = CStringGetTextDatum(entry->keys[k]);
			for (int k = 0; k < entry->nunserved; k++)
				remaining[nremaining++] = CStringGetTextDatum(entry->unserved_keys[k]);
		}

		if (entry->consumed || nremaining == 0)
		{
			entry->consumed = true;
			finished[nfinished++] = Int64GetDatum(entry->seq);
		}
		else
		{
			Oid			types[2] = {INT8OID, TEXTARRAYOID};
			Datum		values[2] = {Int64GetDatum(entry->seq),
			make_array(remaining, nremaining, TEXTOID)};

			execute_or_fail("UPDATE portal_sync.outbox SET keys = $2 WHERE seq = $1",
							2, types, values, NULL, SPI_OK_UPDATE);
		}
	}

	if (nfinished > 0)
	{
		Oid			types[1] = {INT8ARRAYOID};
		Datum		values[1] = {make_array(finished, nfinished, INT8OID)};

		execute_or_fail("DELETE FROM portal_sync.outbox WHERE seq = ANY ($1)",
						1, types, values, NULL, SPI_OK_DELETE);
		if (unit->has_retractions)
			forget_finished_retractions();
	}
}

/*
 * Keep a rejected event as a dead letter.
 */
static void
insert_dead_letter(DeliveryEvent *event)
{
	Oid			types[9] = {TEXTOID, INT8OID, TEXTOID, INT4OID, TEXTOID, TEXTOID,
	TEXTOID, INT4OID, TEXTOID};
	Datum		values[9];
	char		nulls[10] = "         ";

	values[0] = CStringGetTextDatum(event->event_id);
	values[1] = Int64GetDatum(event->seq);
	values[2] = CStringGetTextDatum(event->patient_id);
	values[3] = Int32GetDatum(event->source_id);
	if (event->source_id == 0)
		nulls[3] = 'n';
	if (event->source_name != NULL)
		values[4] = CStringGetTextDatum(event->source_name);
	else
		nulls[4] = 'n';
	if (event->key != NULL)
		values[5] = CStringGetTextDatum(event->key);
	else
		nulls[5] = 'n';
	values[6] = CStringGetTextDatum(event_op_names[event->op]);
	values[7] = Int32GetDatum(event->dead_status);
	if (event->dead_reason != NULL)
		values[8] = CStringGetTextDatum(event->dead_reason);
	else
		nulls[8] = 'n';

	execute_or_fail("INSERT INTO portal_sync.dead_letter (event_id, seq, patient_id,"
					" source_id, source, key, op, http_status, reason)"
					" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
					" ON CONFLICT (event_id) DO UPDATE SET failed_at = pg_catalog.now(),"
					" http_status = excluded.http_status, reason = excluded.reason",
					9, types, values, nulls, SPI_OK_INSERT);
}

/* The snapshot ends of a batch the portal accepted, applied together. */
typedef struct AcceptedEnds
{
	int			count;
	char	  **patients;		/* distinct, in batch order */
	int64	   *seqs;			/* ... the seq of its last complete snapshot */
	bool	   *complete;		/* ... whether it had one (no items after it) */
	HTAB	   *index;			/* of AcceptedEndIndex, by patient */
} AcceptedEnds;

typedef struct AcceptedEndIndex
{
	char	   *patient_id;
	int			position;
} AcceptedEndIndex;

/*
 * Note a snapshot end the portal accepted; applied by
 * apply_accepted_ends().  Several ends of one patient in a batch leave the
 * state the last one would have left applied one after the other.
 */
static void
note_accepted_end(AcceptedEnds *ends, DeliveryEvent *end, int capacity)
{
	AcceptedEndIndex *entry;
	bool		found;

	if (ends->index == NULL)
	{
		ends->index = string_map_create("portal_sync accepted ends", sizeof(AcceptedEndIndex),
										CurrentMemoryContext);
		ends->patients = palloc(capacity * sizeof(char *));
		ends->seqs = palloc(capacity * sizeof(int64));
		ends->complete = palloc(capacity * sizeof(bool));
	}
	entry = string_map_enter(ends->index, end->patient_id, &found);
	if (!found)
	{
		entry->position = ends->count++;
		ends->patients[entry->position] = end->patient_id;
		ends->seqs[entry->position] = 0;
		ends->complete[entry->position] = false;
	}
	if (!end->items_follow)
	{
		ends->seqs[entry->position] = end->seq;
		ends->complete[entry->position] = true;
	}
}

/*
 * After snapshots were accepted: record them, and queue the patients'
 * C-CDA documents, which are sent (or deleted) only now.  One statement
 * for all the batch's patients, and one per C-CDA source: a go-live
 * accepts hundreds of snapshots per batch.
 */
static void
apply_accepted_ends(AcceptedEnds *ends)
{
	Oid			types[3] = {TEXTARRAYOID, INT8ARRAYOID, BOOLARRAYOID};
	Datum	   *patients;
	Datum	   *seqs;
	Datum	   *complete;
	Datum		values[3];
	ListCell   *lc;

	if (ends->count == 0)
		return;
	patients = palloc(ends->count * sizeof(Datum));
	seqs = palloc(ends->count * sizeof(Datum));
	complete = palloc(ends->count * sizeof(Datum));
	for (int i = 0; i < ends->count; i++)
	{
		patients[i] = CStringGetTextDatum(ends->patients[i]);
		seqs[i] = Int64GetDatum(ends->seqs[i]);
		complete[i] = BoolGetDatum(ends->complete[i]);
	}
	values[0] = make_array(patients, ends->count, TEXTOID);
	values[1] = make_array(seqs, ends->count, INT8OID);
	values[2] = PointerGetDatum(construct_array(complete, ends->count, BOOLOID, 1, true,
												TYPALIGN_CHAR));

	/*
	 * Any accepted snapshot makes the patient ready, also one older than a
	 * resync queued since: a C-CDA document waiting behind the newer
	 * snapshot request would otherwise wait for it forever.  Only a
	 * snapshot with nothing sent after its end is the patient's latest.
	 */
	execute_or_fail("UPDATE portal_sync.enrollment e SET snapshot_accepted_at = pg_catalog.now(),"
					" purged = false,"
					" snapshot_seq = CASE WHEN a.complete THEN a.seq ELSE e.snapshot_seq END,"
					" snapshot_request = CASE WHEN a.complete THEN NULL ELSE e.snapshot_request END"
					" FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3))"
					"  AS a(patient_id, seq, complete)"
					" WHERE e.patient_id = a.patient_id",
					3, types, values, NULL, SPI_OK_UPDATE);

	/*
	 * All of them: a snapshot never mentions C-CDA documents, so the
	 * portal keeps the ones it has; a document that is no longer shareable
	 * (settings changed, privacy raised) must go as a delete.
	 */
	foreach(lc, worker_sources())
	{
		WorkerSource *source = lfirst(lc);

		if (source->kind == SOURCE_CCDA && !source->retracting)
			requeue_documents(source, ends->patients, ends->count);
	}
	hash_destroy(ends->index);
	memset(ends, 0, sizeof(*ends));
}

/*
 * After a patient's purge was accepted.
 */
static void
purge_accepted(DeliveryEvent *purge)
{
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		values[2] = {CStringGetTextDatum(purge->patient_id), Int64GetDatum(purge->seq)};

	/*
	 * A snapshot that follows the purge (a higher seq, given when its unit
	 * was built) keeps its request: the portal may hold it open, and it is
	 * resumed under its seq.
	 */
	execute_or_fail("UPDATE portal_sync.enrollment SET purged = true, snapshot_accepted_at = NULL,"
					" snapshot_request = CASE WHEN snapshot_seq > $2 THEN snapshot_request END"
					" WHERE patient_id = $1",
					2, types, values, NULL, SPI_OK_UPDATE);
}

/*
 * After the purge of an unenroll() request was accepted: the enrollment
 * ends.  The patient's enrollment requests queued before it go, and so do
 * resyncs of the patient; an enrollment request queued after it stays, and
 * enrolls the patient again.  Changes the unit did not see (held, or
 * committed late) stay: they are served later for a patient who is not
 * enrolled (insurance and the chart's effect on it flow, the rest goes
 * silently).  Every backend's cached "enrolled" is dropped at this commit
 * (enroll.c).
 */
static void
enrollment_ended(DeliveryEvent *purge)
{
	Oid			types[2] = {TEXTOID, INT8OID};
	Datum		values[2] = {CStringGetTextDatum(purge->patient_id),
	Int64GetDatum(purge->ends_enrollment)};

	execute_or_fail("DELETE FROM portal_sync.enrollment WHERE patient_id = $1",
					1, types, values, NULL, SPI_OK_DELETE);
	execute_or_fail("DELETE FROM portal_sync.outbox o WHERE o.patient_id = $1"
					" AND (o.op = 's' OR (o.op = 'e' AND o.seq < $2))",
					2, types, values, NULL, SPI_OK_DELETE);
	CacheInvalidateRelcacheByRelid(portal_sync_relid("enrollment"));
}

/*
 * Record the answer to one POST of count events from first.  accepted:
 * the portal took the batch (2xx), except events marked dead.  Otherwise
 * only events marked dead are resolved (dead-lettered).
 */
void
record_batch_result(DeliveryUnit *unit, int first, int count,
					const char *batch_id, TimestampTz sent_at,
					int http_status, bool accepted)
{
	Datum	   *patients = palloc(Max(count, 1) * sizeof(Datum));
	int			npatients = 0;
	bool		snapshot_done = false;
	Oid			log_types[6] = {TEXTOID, TIMESTAMPTZOID, BOOLOID, INT4OID, INT4OID, TEXTARRAYOID};
	Datum		log_values[6];
	char		log_nulls[7] = "      ";
	AcceptedEnds ends = {0};

	for (int i = first; i < first + count; i++)
	{
		DeliveryEvent *event = list_nth(unit->events, i);
		bool		seen = false;

		for (int p = npatients - 1; p >= 0 && p >= npatients - 8; p--)
			if (strcmp(TextDatumGetCString(patients[p]), event->patient_id) == 0)
				seen = true;
		if (!seen)
			patients[npatients++] = CStringGetTextDatum(event->patient_id);

		/* a purge is applied after the snapshots before it */
		if (event->op == EVENT_PURGE)
			apply_accepted_ends(&ends);

		if (event->dead)
		{
			insert_dead_letter(event);
			apply_consumption(unit, event);
			/*
			 * unenroll() stops the flow even if the portal refused the
			 * purge: the dead letter says the portal may still hold the
			 * record, and retry_dead_letters() sends the purge again.
			 */
			if (event->op == EVENT_PURGE && event->ends_enrollment > 0)
				enrollment_ended(event);
		}
		else if (accepted)
		{
			apply_consumption(unit, event);
			if (event->op == EVENT_SNAPSHOT_END)
			{
				note_accepted_end(&ends, event, count);
				snapshot_done = true;
			}
			else if (event->op == EVENT_PURGE && event->ends_enrollment > 0)
				enrollment_ended(event);
			else if (event->op == EVENT_PURGE)
				purge_accepted(event);
		}
	}
	apply_accepted_ends(&ends);
	write_back_entries(unit);

	if (accepted)
	{
		Oid			types[1] = {TEXTARRAYOID};
		Datum		values[1] = {make_array(patients, npatients, TEXTOID)};

		execute_or_fail("UPDATE portal_sync.enrollment SET last_delivered_at = pg_catalog.now()"
						" WHERE patient_id = ANY ($1)",
						1, types, values, NULL, SPI_OK_UPDATE);
	}

	log_values[0] = CStringGetTextDatum(batch_id);
	log_values[1] = TimestampTzGetDatum(sent_at);
	log_values[2] = BoolGetDatum(accepted);
	log_values[3] = Int32GetDatum(http_status);
	if (http_status == 0)
		log_nulls[3] = 'n';
	log_values[4] = Int32GetDatum(count);
	log_values[5] = make_array(patients, npatients, TEXTOID);
	execute_or_fail("INSERT INTO portal_sync.delivery_log (batch_id, sent_at, accepted_at,"
					" http_status, events, patient_ids)"
					" VALUES ($1, $2, CASE WHEN $3 THEN pg_catalog.now() END, $4, $5,"
					" ARRAY(SELECT DISTINCT pg_catalog.unnest($6)))",
					6, log_types, log_values, log_nulls, SPI_OK_INSERT);

	if (snapshot_done)
		unit->snapshot_accepted = true;
}

/*
 * Write back the entries the builder consumed without an event.
 */
void
record_silent_consumption(DeliveryUnit *unit)
{
	write_back_entries(unit);
}
