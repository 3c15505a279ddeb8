/*-------------------------------------------------------------------------
 *
 * unit_builder.c
 *		Turning the head of the outbox into the events of a delivery unit.
 *
 * The worker reads the oldest outbox entries and, in one short transaction,
 * decides what each becomes on the wire, reading every row as it is now:
 *
 *	- a change of an item becomes an upsert of its current state if it is
 *	  shareable and still belongs to the patient, else a delete;
 *	- a snapshot request becomes snapshot_begin, an upsert of every
 *	  shareable item of the patient in every source but C-CDA documents,
 *	  and snapshot_end (all with the request's seq);
 *	- any entry of an enrolled patient whose chart is restricted becomes
 *	  one purge, then nothing until the chart is shareable again, when the
 *	  next entry becomes a snapshot;
 *	- a C-CDA upsert waits (with everything after it of that patient)
 *	  until the patient's snapshot has been accepted.
 *
 * A patient's events keep the order of the outbox.  Several changes of one
 * row in a unit become one event, at the place of the first.  A snapshot
 * request is only served once every transaction of the database that was
 * running when the worker first saw it has ended: one of them may have
 * written a row for the patient without recording it, having checked
 * enrollment before the enrollment committed.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "delivery.h"
#include "seq_fence.h"
#include "shared_state.h"
#include "source_reader.h"
#include "string_map.h"

/* What the unit knows of one patient. */
typedef struct PatientState
{
	char	   *patient_id;		/* key */
	bool		enrolled;
	bool		purged;
	bool		snapshot_accepted;
	bool		chart_shareable;
	bool		blocked;		/* nothing more of this patient in the unit */
	int			epoch;			/* snapshots and purges so far in the unit */
	int64		snapshot_seq;	/* first snapshot request in the unit, or 0 */
	DeliveryEvent *last_event;	/* the patient's latest event in the unit */
} PatientState;

/* An item already sent in this unit, to coalesce later changes into. */
typedef struct EmittedItem
{
	char	   *id;				/* key: epoch, source, patient, key */
	DeliveryEvent *event;
} EmittedItem;

/* Rows read by key, per source. */
typedef struct SourceRows
{
	WorkerSource *source;
	HTAB	   *rows;			/* of SourceRow */
} SourceRows;

typedef struct UnitBuilder
{
	DeliveryUnit *unit;
	SharingSettings *settings;
	List	   *sources;		/* of SourceRows */
	WorkerSource *chart_source;
	HTAB	   *patients;		/* of PatientState */
	HTAB	   *emitted;		/* of EmittedItem */
	int			nevents;
	SeqFenceView *fence;
} UnitBuilder;

/*
 * First sight of each snapshot request: the transactions of this database
 * that were running then, which must end before the snapshot is read.
 */
typedef struct SnapshotHorizon
{
	int64		seq;
	int			nwaiting;
	VirtualTransactionId *waiting;
	bool		passed;			/* all ended before this unit's snapshot */
} SnapshotHorizon;

static HTAB *snapshot_horizons = NULL;

static void consume_silently(UnitBuilder *builder, int entry_index);

/*
 * Read settings and the installation id; the caller is connected to SPI
 * and its memory context is where the strings go.
 */
void
read_sharing_settings(SharingSettings *settings)
{
	int			ret;
	HeapTuple	tuple;
	TupleDesc	desc;
	char	   *value;

	ret = spi_query("SELECT s.practice_id, s.enabled, s.date_cutoff::pg_catalog.text,"
					" s.max_privacy_level, i.install_id"
					" FROM portal_sync.settings s, portal_sync.installation i",
					0, NULL, NULL, NULL, true);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "portal_sync.settings must hold one row");
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	settings->practice_id = SPI_getvalue(tuple, desc, 1);
	value = SPI_getvalue(tuple, desc, 2);
	settings->enabled = value[0] == 't';
	settings->date_cutoff = SPI_getvalue(tuple, desc, 3);
	settings->has_cutoff = settings->date_cutoff != NULL;
	settings->max_privacy_level = pg_strtoint32(SPI_getvalue(tuple, desc, 4));
	settings->install_id = SPI_getvalue(tuple, desc, 5);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Forget the horizons, after the worker lost track of what it saw.
 */
void
forget_snapshot_horizons(void)
{
	if (snapshot_horizons != NULL)
	{
		HASH_SEQ_STATUS status;
		SnapshotHorizon *entry;

		hash_seq_init(&status, snapshot_horizons);
		while ((entry = hash_seq_search(&status)) != NULL)
			pfree(entry->waiting);
		hash_destroy(snapshot_horizons);
	}
	snapshot_horizons = NULL;
}

/*
 * Before a unit takes its snapshot: note which snapshot requests no longer
 * wait for any transaction.  Checked before, so that the snapshot the unit
 * reads with sees everything those transactions committed.
 */
static void
refresh_snapshot_horizons(void)
{
	HASH_SEQ_STATUS status;
	SnapshotHorizon *entry;

	if (snapshot_horizons == NULL)
		return;
	hash_seq_init(&status, snapshot_horizons);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		int			still_running = 0;

		for (int i = 0; i < entry->nwaiting; i++)
		{
			if (!VirtualTransactionIdIsValid(entry->waiting[i]))
				continue;
			if (VirtualXactLock(entry->waiting[i], false))
				SetInvalidVirtualTransactionId(entry->waiting[i]);
			else
				still_running++;
		}
		entry->passed = still_running == 0;
	}
}

/*
 * May the snapshot requested at seq be read now?  See the file header.  A
 * transaction that was running when the worker first saw the request may
 * have checked enrollment before it committed; the snapshot is read once
 * all of them (in this database) have ended, by a unit whose snapshot was
 * taken after that.
 */
static bool
snapshot_horizon_passed(int64 seq)
{
	SnapshotHorizon *entry;
	bool		found;

	if (snapshot_horizons == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(SnapshotHorizon);
		ctl.hcxt = TopMemoryContext;
		snapshot_horizons = hash_create("portal_sync snapshot horizons", 64, &ctl,
										HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	entry = hash_search(snapshot_horizons, &seq, HASH_ENTER, &found);
	if (!found)
	{
		VirtualTransactionId *running;
		int			count;

		running = GetCurrentVirtualXIDs(InvalidTransactionId, false, false,
										PROC_IN_VACUUM, &count);
		entry->waiting = MemoryContextAlloc(TopMemoryContext,
											Max(count, 1) * sizeof(VirtualTransactionId));
		memcpy(entry->waiting, running, count * sizeof(VirtualTransactionId));
		entry->nwaiting = count;
		entry->passed = false;
		pfree(running);
		return false;
	}
	if (!entry->passed)
		return false;

	pfree(entry->waiting);
	hash_search(snapshot_horizons, &seq, HASH_REMOVE, NULL);
	return true;
}

/*
 * Look at the floors of running transactions (see seq_fence.c), then take
 * a new snapshot for reading the outbox, so that every event the view
 * lets through is visible in it.
 */
static void
read_seq_fence(SeqFenceView *view)
{
	int64		sequence_value;
	bool		isnull;

	if (spi_query("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
				  " FROM portal_sync.outbox_seq", 0, NULL, NULL, NULL, true) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "reading portal_sync.outbox_seq failed");
	sequence_value = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												 SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);

	seq_fence_scan(my_worker_slot(), sequence_value, view);

	PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());
}

/*
 * Read the oldest outbox entries into the unit: those at or below the
 * sequence value of the fence view.  If some above it wait, the unit is
 * marked blocked.
 */
static void
read_outbox_entries(DeliveryUnit *unit, int limit, const SeqFenceView *fence)
{
	Oid			types[2] = {INT4OID, INT8OID};
	Datum		values[2];
	int			ret;

	values[0] = Int32GetDatum(limit);
	values[1] = Int64GetDatum(fence->sequence_value);
	ret = spi_query("SELECT seq, patient_id, COALESCE(source_id, 0), op, keys,"
					" pg_catalog.to_char(captured_at AT TIME ZONE 'UTC',"
					"   'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
					" FROM portal_sync.outbox WHERE seq <= $2 ORDER BY seq LIMIT $1",
					2, types, values, NULL, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.outbox failed: %s", SPI_result_code_string(ret));

	unit->nentries = (int) SPI_processed;
	unit->more_pending = SPI_processed == (uint64) limit;
	unit->entries = palloc0(Max(unit->nentries, 1) * sizeof(OutboxEntry));
	for (int i = 0, nevents = 0; i < unit->nentries; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		OutboxEntry *entry = &unit->entries[i];
		bool		isnull;
		Datum		keys;

		entry->seq = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		entry->patient_id = SPI_getvalue(tuple, desc, 2);
		entry->source_id = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
		entry->op = DatumGetChar(SPI_getbinval(tuple, desc, 4, &isnull));
		keys = SPI_getbinval(tuple, desc, 5, &isnull);
		if (!isnull)
		{
			Datum	   *elements;
			int			count;

			deconstruct_array(DatumGetArrayTypeP(keys), TEXTOID, -1, false,
							  TYPALIGN_INT, &elements, NULL, &count);
			entry->nkeys = count;
			entry->keys = palloc(Max(count, 1) * sizeof(char *));
			for (int k = 0; k < count; k++)
				entry->keys[k] = TextDatumGetCString(elements[k]);
			entry->key_consumed = palloc0(Max(count, 1) * sizeof(bool));
		}
		entry->captured_at = SPI_getvalue(tuple, desc, 6);

		/* Enough entries for the unit: leave the rest for the next one. */
		nevents += Max(entry->nkeys, 1);
		if (nevents >= limit && i + 1 < unit->nentries)
		{
			unit->nentries = i + 1;
			unit->more_pending = true;
			break;
		}
	}
	SPI_freetuptable(SPI_tuptable);

	if (!unit->more_pending)
	{
		if (spi_query("SELECT 1 FROM portal_sync.outbox WHERE seq > $2 LIMIT $1",
					  2, types, values, NULL, true) != SPI_OK_SELECT)
			elog(ERROR, "reading portal_sync.outbox failed");
		if (SPI_processed > 0)
			unit->blocked = true;	/* a transaction may still commit below them */
		SPI_freetuptable(SPI_tuptable);
	}
}

/*
 * The attached source with this id, or NULL if it was detached.
 */
static SourceRows *
find_source(UnitBuilder *builder, int32 source_id)
{
	ListCell   *lc;

	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);

		if (source_rows->source->source_id == source_id)
			return source_rows;
	}
	return NULL;
}

/*
 * Load the sources, the patients' enrollment and chart state, and every
 * row the change entries name.
 */
static void
load_unit_context(UnitBuilder *builder)
{
	DeliveryUnit *unit = builder->unit;
	List	   *worker_sources = load_worker_sources();
	ListCell   *lc;
	char	  **patient_ids = palloc(Max(unit->nentries, 1) * sizeof(char *));
	int			npatients = 0;
	Datum	   *elements;
	Oid			types[1] = {TEXTARRAYOID};
	Datum		values[1];
	int			ret;

	foreach(lc, worker_sources)
	{
		WorkerSource *source = lfirst(lc);
		SourceRows *source_rows = palloc0(sizeof(SourceRows));

		source_rows->source = source;
		source_rows->rows = string_map_create("portal_sync rows", sizeof(SourceRow),
											  CurrentMemoryContext);
		builder->sources = lappend(builder->sources, source_rows);
		if (source->kind == SOURCE_PATIENT && builder->chart_source == NULL)
			builder->chart_source = source;
	}

	builder->patients = string_map_create("portal_sync patients", sizeof(PatientState),
										  CurrentMemoryContext);
	builder->emitted = string_map_create("portal_sync emitted", sizeof(EmittedItem),
										 CurrentMemoryContext);

	for (int i = 0; i < unit->nentries; i++)
	{
		bool		found;
		PatientState *patient = string_map_enter(builder->patients,
												 unit->entries[i].patient_id, &found);

		if (!found)
		{
			memset(((char *) patient) + sizeof(char *), 0,
				   sizeof(PatientState) - sizeof(char *));
			patient->chart_shareable = builder->chart_source == NULL;
			patient_ids[npatients++] = patient->patient_id;
		}
		if (unit->entries[i].op == OUTBOX_OP_SNAPSHOT && patient->snapshot_seq == 0)
			patient->snapshot_seq = unit->entries[i].seq;
	}
	if (npatients == 0)
		return;

	/* Enrollment */
	elements = palloc(npatients * sizeof(Datum));
	for (int i = 0; i < npatients; i++)
		elements[i] = CStringGetTextDatum(patient_ids[i]);
	values[0] = PointerGetDatum(construct_array(elements, npatients, TEXTOID, -1, false,
												TYPALIGN_INT));
	ret = spi_query("SELECT patient_id, purged, snapshot_accepted_at IS NOT NULL"
								" FROM portal_sync.enrollment WHERE patient_id = ANY ($1)",
								1, types, values, NULL, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.enrollment failed");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		PatientState *patient = string_map_find(builder->patients, SPI_getvalue(tuple, desc, 1));
		bool		isnull;

		if (patient == NULL)
			continue;
		patient->enrolled = true;
		patient->purged = DatumGetBool(SPI_getbinval(tuple, desc, 2, &isnull));
		patient->snapshot_accepted = DatumGetBool(SPI_getbinval(tuple, desc, 3, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);

	/* Charts */
	if (builder->chart_source != NULL)
	{
		HTAB	   *charts = string_map_create("portal_sync charts", sizeof(ChartState),
											   CurrentMemoryContext);

		read_charts(builder->chart_source, patient_ids, npatients, charts);
		for (int i = 0; i < npatients; i++)
		{
			ChartState *chart = string_map_find(charts, patient_ids[i]);
			PatientState *patient = string_map_find(builder->patients, patient_ids[i]);

			patient->chart_shareable = chart != NULL && chart->shareable;
		}
	}

	/* Rows named by change entries, one statement per source */
	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);
		char	  **keys = NULL;
		int			nkeys = 0;
		int			maxkeys = 0;

		for (int i = 0; i < unit->nentries; i++)
		{
			OutboxEntry *entry = &unit->entries[i];

			if (entry->source_id != source_rows->source->source_id ||
				entry->nkeys <= 0)
				continue;
			if (nkeys + entry->nkeys > maxkeys)
			{
				maxkeys = Max(maxkeys * 2, nkeys + entry->nkeys);
				keys = keys ? repalloc(keys, maxkeys * sizeof(char *))
					: palloc(maxkeys * sizeof(char *));
			}
			memcpy(keys + nkeys, entry->keys, entry->nkeys * sizeof(char *));
			nkeys += entry->nkeys;
		}
		if (nkeys > 0)
			read_rows_by_key(source_rows->source, keys, nkeys, source_rows->rows);
	}
}

/*
 * Append an event to the unit.
 */
static DeliveryEvent *
add_event(UnitBuilder *builder, OutboxEntry *entry, int64 seq, WorkerSource *source,
		  const char *key, EventOp op, const char *data_json)
{
	DeliveryEvent *event = palloc0(sizeof(DeliveryEvent));
	const char *install_id = builder->settings->install_id;

	event->seq = seq;
	event->patient_id = entry->patient_id;
	event->op = op;
	if (source != NULL)
	{
		event->source_id = source->source_id;
		event->source_name = source->name;
		event->key = pstrdup(key);
		event->event_id = psprintf("%s-%lld-%d-%s", install_id, (long long) seq,
								   source->source_id, key);
	}
	else
		event->event_id = psprintf("%s-%lld-%s", install_id, (long long) seq,
								   event_op_names[op]);
	serialize_event(event, source ? source->kind_name : NULL,
					entry->captured_at, data_json);
	builder->unit->events = lappend(builder->unit->events, event);
	builder->nevents++;
	((PatientState *) string_map_find(builder->patients, entry->patient_id))->last_event = event;
	return event;
}

/*
 * Record that accepting this event consumes an outbox entry (key_index -1)
 * or one of its keys.
 */
static void
add_consumption(DeliveryEvent *event, int entry_index, int key_index)
{
	Consumption *consumption = palloc(sizeof(Consumption));

	consumption->entry = entry_index;
	consumption->key_index = key_index;
	event->consumes = lappend(event->consumes, consumption);
}

/*
 * Emit a patient's snapshot: begin, every shareable item of every source
 * but C-CDA documents, end.  The end consumes the entry.
 */
static void
emit_snapshot(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	ListCell   *lc;
	DeliveryEvent *end;

	add_event(builder, entry, entry->seq, NULL, NULL, EVENT_SNAPSHOT_BEGIN, NULL);
	foreach(lc, builder->sources)
	{
		WorkerSource *source = ((SourceRows *) lfirst(lc))->source;
		SPITupleTable *tuptable;

		if (source->kind == SOURCE_CCDA)
			continue;
		read_snapshot_rows(source, entry->patient_id);
		tuptable = SPI_tuptable;
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			char	   *key = SPI_getvalue(tuptable->vals[i], tuptable->tupdesc, 1);
			char	   *data = SPI_getvalue(tuptable->vals[i], tuptable->tupdesc, 2);

			add_event(builder, entry, entry->seq, source, key, EVENT_UPSERT, data);
		}
		SPI_freetuptable(tuptable);
	}
	end = add_event(builder, entry, entry->seq, NULL, NULL, EVENT_SNAPSHOT_END, NULL);
	add_consumption(end, entry_index, -1);

	patient->purged = false;
	patient->snapshot_accepted = false;
	patient->epoch++;
}

/*
 * Emit a purge of an enrolled patient whose chart is restricted; it
 * consumes the entry.
 */
static void
emit_purge(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	DeliveryEvent *purge;

	purge = add_event(builder, entry, entry->seq, NULL, NULL, EVENT_PURGE, NULL);
	add_consumption(purge, entry_index, -1);
	patient->purged = true;
	patient->snapshot_accepted = false;
	patient->epoch++;
}

/*
 * The chart of a patient who is not enrolled changed: only their insurance
 * is on the portal, and it follows the chart.  Every insurance row of the
 * patient is sent again: upserted if shareable now, deleted otherwise.
 * The last event consumes the entry (or the entry goes silently).
 */
static void
emit_insurance_of_patient(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	DeliveryEvent *last = NULL;
	ListCell   *lc;

	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);
		WorkerSource *source = source_rows->source;
		SPITupleTable *tuptable;
		char	  **keys;
		int			nkeys;

		if (source->kind != SOURCE_INSURANCE)
			continue;
		read_all_keys(source, entry->patient_id);
		tuptable = SPI_tuptable;
		nkeys = (int) SPI_processed;
		keys = palloc(Max(nkeys, 1) * sizeof(char *));
		for (int i = 0; i < nkeys; i++)
			keys[i] = SPI_getvalue(tuptable->vals[i], tuptable->tupdesc, 1);
		SPI_freetuptable(tuptable);
		if (nkeys > 0)
			read_rows_by_key(source, keys, nkeys, source_rows->rows);

		for (int i = 0; i < nkeys; i++)
		{
			SourceRow  *row = string_map_find(source_rows->rows, keys[i]);
			bool		upsert = row != NULL && row->shareable && patient->chart_shareable &&
				strcmp(row->patient_id, entry->patient_id) == 0;

			last = add_event(builder, entry, entry->seq, source, keys[i],
							 upsert ? EVENT_UPSERT : EVENT_DELETE,
							 upsert ? row->data_json : NULL);
		}
	}
	if (last != NULL)
		add_consumption(last, entry_index, -1);
	else
		consume_silently(builder, entry_index);
}

/*
 * An entry needs no event (nothing to tell the portal).  If the patient
 * has an event earlier in the unit (a purge, say), the entry is consumed
 * when that event is accepted: were the unit sent again after a failure,
 * rebuilt from the rows as they are then, the entry may need an event
 * after all.  Otherwise it is consumed at once.
 */
static void
consume_silently(UnitBuilder *builder, int entry_index)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	PatientState *patient = string_map_find(builder->patients, entry->patient_id);

	if (patient != NULL && patient->last_event != NULL)
		add_consumption(patient->last_event, entry_index, -1);
	else
	{
		entry->consumed = true;
		entry->changed = true;
	}
}

/*
 * Serve a change entry: one upsert or delete per key.  Returns false when
 * the patient must wait (a C-CDA upsert before the snapshot is accepted).
 */
static bool
serve_change_entry(UnitBuilder *builder, int entry_index, PatientState *patient,
				   SourceRows *source_rows)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	WorkerSource *source = source_rows->source;

	for (int k = 0; k < entry->nkeys; k++)
	{
		const char *key = entry->keys[k];
		SourceRow  *row = string_map_find(source_rows->rows, key);
		bool		upsert;
		char	   *item_id;
		EmittedItem *emitted;
		bool		found;

		upsert = row != NULL && row->shareable && patient->chart_shareable &&
			strcmp(row->patient_id, entry->patient_id) == 0;

		if (upsert && source->kind == SOURCE_CCDA && !patient->snapshot_accepted)
			return false;

		item_id = psprintf("%d|%d|%s|%s", patient->epoch, source->source_id,
						   entry->patient_id, key);
		emitted = string_map_enter(builder->emitted, item_id, &found);
		if (!found)
			emitted->event = add_event(builder, entry, entry->seq, source, key,
									   upsert ? EVENT_UPSERT : EVENT_DELETE,
									   upsert ? row->data_json : NULL);
		add_consumption(emitted->event, entry_index, k);
	}
	return true;
}

/*
 * Serve one outbox entry.
 */
static void
serve_entry(UnitBuilder *builder, int entry_index)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	PatientState *patient = string_map_find(builder->patients, entry->patient_id);
	SourceRows *source_rows = NULL;

	if (patient->blocked)
		return;

	if (seq_fence_holds(builder->fence, entry->seq, entry->patient_id))
	{
		/* an earlier event of the patient may still commit */
		patient->blocked = true;
		builder->unit->blocked = true;
		return;
	}

	/*
	 * A later snapshot request of an enrolled patient in this unit sends the
	 * whole shareable record (and C-CDA documents are queued again once it
	 * is accepted), so an earlier change needs no event of its own.  Sending
	 * it anyway could also put it on the portal after a later change of the
	 * patient that the portal accepted from a worker that crashed before
	 * recording it, if the patient was enrolled in between.
	 */
	if (entry->op != OUTBOX_OP_SNAPSHOT && patient->enrolled &&
		patient->snapshot_seq > entry->seq)
	{
		consume_silently(builder, entry_index);
		return;
	}

	if (entry->op == OUTBOX_OP_SNAPSHOT)
	{
		if (!snapshot_horizon_passed(entry->seq))
		{
			patient->blocked = true;
			builder->unit->blocked = true;
		}
		else if (!patient->chart_shareable)
		{
			if (patient->enrolled && !patient->purged)
				emit_purge(builder, entry_index, patient);
			else
				consume_silently(builder, entry_index);
		}
		else
			emit_snapshot(builder, entry_index, patient);
		return;
	}

	source_rows = find_source(builder, entry->source_id);
	if (source_rows == NULL)
	{
		consume_silently(builder, entry_index);	/* detached since */
		return;
	}

	if (!patient->enrolled && source_rows->source->kind == SOURCE_PATIENT)
	{
		emit_insurance_of_patient(builder, entry_index, patient);
		return;
	}
	if (!patient->enrolled && source_rows->source->kind != SOURCE_INSURANCE)
	{
		consume_silently(builder, entry_index);	/* only insurance flows before enrollment */
		return;
	}

	if (patient->enrolled && !patient->chart_shareable)
	{
		if (!patient->purged)
			emit_purge(builder, entry_index, patient);
		else
			consume_silently(builder, entry_index);
		return;
	}
	if (patient->enrolled && patient->purged)
	{
		emit_snapshot(builder, entry_index, patient);
		return;
	}

	if (!serve_change_entry(builder, entry_index, patient, source_rows))
	{
		patient->blocked = true;
		builder->unit->blocked = true;
	}
}

/*
 * Build the next delivery unit from the head of the outbox: at least one
 * entry, and entries until max_events events.  Entries that need no event
 * are marked consumed; the caller writes that back.  The caller is in a
 * transaction with an active snapshot, connected to SPI.
 */
DeliveryUnit *
build_delivery_unit(SharingSettings *settings, int max_events, MemoryContext context)
{
	MemoryContext oldcontext = MemoryContextSwitchTo(context);
	DeliveryUnit *unit = palloc0(sizeof(DeliveryUnit));
	UnitBuilder builder;

	unit->context = context;
	memset(&builder, 0, sizeof(builder));
	builder.unit = unit;
	builder.settings = settings;

	refresh_snapshot_horizons();
	builder.fence = palloc(sizeof(SeqFenceView));
	read_seq_fence(builder.fence);
	set_sharing_parameters(settings->date_cutoff, settings->max_privacy_level);
	read_outbox_entries(unit, max_events, builder.fence);
	load_unit_context(&builder);

	for (int i = 0; i < unit->nentries; i++)
	{
		if (builder.nevents >= max_events)
		{
			unit->more_pending = true;
			break;
		}
		serve_entry(&builder, i);
	}

	MemoryContextSwitchTo(oldcontext);
	return unit;
}
