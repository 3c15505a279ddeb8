/*-------------------------------------------------------------------------
 *
 * unit_builder.c
 *		Turning the outbox into the events of a delivery unit.
 *
 * The worker reads committed outbox entries (an ordinary MVCC read: an
 * entry exists for it exactly when the change it reports committed) and,
 * in one short transaction with one snapshot, decides what each becomes
 * on the wire, reading every row as it is now:
 *
 *	- a change of an item becomes an upsert of its current state if it is
 *	  shareable and still belongs to the patient, else a delete;
 *	- a snapshot request (an enrollment 'e' or a resync 's') becomes
 *	  snapshot_begin, an upsert of every shareable item of the patient in
 *	  every source but C-CDA documents, and snapshot_end;
 *	- any entry of an enrolled patient whose chart is restricted becomes
 *	  one purge, then nothing until the chart is shareable again, when the
 *	  next entry becomes a snapshot;
 *	- an unenroll() request becomes a purge that consumes the patient's
 *	  earlier entries but insurance, followed by the patient's insurance
 *	  (which flows for patients who are not enrolled); the patient's later
 *	  entries wait for the next unit, when the enrollment has ended;
 *	- a C-CDA upsert waits until the patient's snapshot has been accepted.
 *
 * Wire seqs are taken here, in sending order, so a patient's events are in
 * seq order by construction, whatever order their transactions committed
 * in; the items of a snapshot share its seq.  Several changes of one row
 * in a unit become one event, at the place of the first; a change of an
 * item after the patient's snapshot in the same unit is consumed by the
 * snapshot's upsert of that item, which was read in the same snapshot.
 *
 * Nothing waits for anyone else.  An enrollment snapshot waits for the
 * writing transactions that were open when it was first seen
 * (snapshot_wait.c); meanwhile only that patient waits, and only for what
 * would add data: its deletes and purges still go.  An entry that must
 * wait (held) stays in the outbox and the read moves past it: each unit
 * reads from a scan position onwards, which goes back to the start once
 * the read reaches the end of the outbox, so held entries never fill a
 * unit and never hold back entries behind them.
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

#include "commands/sequence.h"

#include "delivery.h"
#include "shared_state.h"
#include "source_reader.h"
#include "worker_sources.h"
#include "string_map.h"

/* What the unit knows of one patient. */
typedef struct PatientState
{
	char	   *patient_id;		/* key */
	bool		enrolled;
	bool		purged;
	bool		snapshot_accepted;
	int64		snapshot_seq;	/* wire seq given to the snapshot of ... */
	int64		snapshot_request;	/* ... this request, or 0 */
	bool		resuming;		/* that request is in the unit */
	bool		snapshot_ahead; /* that request is queued, beyond the unit */
	bool		chart_shareable;
	bool		waiting;		/* enrollment snapshot waits: retractions only */
	int			epoch;			/* snapshots and purges so far in the unit */
	int			last_request;	/* index of the last snapshot request, or -1 */
	int			unenroll_request;	/* index of the first unenroll() request, or -1 */
	bool		has_enroll_request; /* some request in the unit is 'e' */
	List	   *deferred_requests;	/* earlier requests the snapshot consumes */
	DeliveryEvent *last_event;	/* the patient's latest event in the unit */
} PatientState;

/* An item already sent in this unit, to coalesce later changes into. */
typedef struct EmittedItem
{
	char	   *id;				/* key: epoch, source, patient, key */
	DeliveryEvent *event;
} EmittedItem;

/* Rows read by key, and snapshot rows read ahead, per source. */
typedef struct SourceRows
{
	WorkerSource *source;
	HTAB	   *rows;			/* of SourceRow */
	bool		rows_read;		/* rows holds every row the entries name */
	HTAB	   *snapshot_rows;	/* of SnapshotRows, by patient */
} SourceRows;

/* A patient whose snapshot rows were read ahead (all sources). */
typedef struct ReadAheadMark
{
	char	   *patient_id;
} ReadAheadMark;

typedef struct UnitBuilder
{
	DeliveryUnit *unit;
	SharingSettings *settings;
	List	   *sources;		/* of SourceRows, attached tables */
	List	   *retracting;		/* of SourceRows, sources being retracted */
	WorkerSource *chart_source;
	HTAB	   *patients;		/* of PatientState */
	HTAB	   *emitted;		/* of EmittedItem */
	int			nevents;
	size_t		nbytes;			/* of the events' row data */
	int			max_events;		/* the unit's limits */
	size_t		max_bytes;
	HTAB	   *read_ahead;		/* of ReadAheadMark: snapshot rows read */
	HTAB	   *sent;			/* what earlier attempts sent (worker.c) */
} UnitBuilder;

/*
 * What a snapshot held on average (rows and bytes, markers excluded), for
 * sizing the next read-ahead; negative until the first one.
 */
static double rows_per_snapshot = -1;
static double bytes_per_snapshot = -1;

/* Most patients whose snapshots are read in one statement per source. */
#define MAX_READ_AHEAD_PATIENTS	1000

/* Where the next unit starts reading the outbox (see the file header). */
static int64 scan_cursor = 0;

static void consume_silently(UnitBuilder *builder, int entry_index);
static bool purge_may_be_applied(UnitBuilder *builder, PatientState *patient);

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
					" s.max_privacy_level, i.install_id, i.database_identity"
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
	settings->database_identity = SPI_getvalue(tuple, desc, 6);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * The unit was delivered (or dead-lettered) whole: the next one reads on
 * from where it stopped.
 */
void
unit_finished(DeliveryUnit *unit)
{
	scan_cursor = unit->next_cursor;
}

/*
 * Read outbox entries from the scan position on, in queue order, until
 * about limit events.  If the read reaches the end of the outbox, the
 * next unit starts from the beginning again.
 */
static void
read_outbox_entries(DeliveryUnit *unit, int limit)
{
	Oid			types[2] = {INT4OID, INT8OID};
	Datum		values[2];
	int			ret;
	bool		reached_end;

	values[0] = Int32GetDatum(limit);
	values[1] = Int64GetDatum(scan_cursor);
	ret = spi_query("SELECT seq, patient_id, COALESCE(source_id, 0), op, keys,"
					" pg_catalog.to_char(captured_at AT TIME ZONE 'UTC',"
					"   'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
					" FROM portal_sync.outbox WHERE seq > $2 ORDER BY seq LIMIT $1",
					2, types, values, NULL, true);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.outbox failed: %s", SPI_result_code_string(ret));

	unit->nentries = (int) SPI_processed;
	reached_end = SPI_processed < (uint64) limit;
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
		/* the key of a request says what asked for it */
		if (entry->op == OUTBOX_OP_ENROLL || entry->op == OUTBOX_OP_SNAPSHOT ||
			entry->op == OUTBOX_OP_UNENROLL)
		{
			if (entry->nkeys > 0)
				entry->enrolled_by = entry->keys[0];
			entry->nkeys = 0;
		}
		entry->captured_at = SPI_getvalue(tuple, desc, 6);

		/* Enough entries for the unit: leave the rest for the next one. */
		nevents += Max(entry->nkeys, 1);
		if (nevents >= limit && i + 1 < unit->nentries)
		{
			unit->nentries = i + 1;
			reached_end = false;
			break;
		}
	}
	SPI_freetuptable(SPI_tuptable);

	unit->wrapped = reached_end;
	unit->next_cursor = reached_end || unit->nentries == 0 ? 0 :
		unit->entries[unit->nentries - 1].seq;
}

/*
 * The attached or retracted source with this id, or NULL if it was
 * detached.
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
	foreach(lc, builder->retracting)
	{
		SourceRows *source_rows = lfirst(lc);

		if (source_rows->source->source_id == source_id)
			return source_rows;
	}
	return NULL;
}

/*
 * Settle the enrollment requests of the unit whose patients are not
 * enrolled yet: insert their enrollment rows.  The worker is the only
 * writer of new enrollment rows, so nothing waits here; a capture that
 * looks with the latest snapshot sees the request or the row.
 */
static void
settle_enrollments(UnitBuilder *builder)
{
	DeliveryUnit *unit = builder->unit;
	Datum	   *patients = palloc(Max(unit->nentries, 1) * sizeof(Datum));
	Datum	   *enrolled_by = palloc(Max(unit->nentries, 1) * sizeof(Datum));
	Datum	   *enrolled_at = palloc(Max(unit->nentries, 1) * sizeof(Datum));
	Datum	   *seqs = palloc(Max(unit->nentries, 1) * sizeof(Datum));
	int			count = 0;
	Oid			types[4] = {TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID};
	Datum		values[4];

	for (int i = 0; i < unit->nentries; i++)
	{
		OutboxEntry *entry = &unit->entries[i];
		PatientState *patient;

		if (entry->op != OUTBOX_OP_ENROLL)
			continue;
		patient = string_map_find(builder->patients, entry->patient_id);
		if (patient->enrolled)
			continue;
		patient->enrolled = true;
		patients[count] = CStringGetTextDatum(entry->patient_id);
		enrolled_by[count] = CStringGetTextDatum(entry->enrolled_by ? entry->enrolled_by : "unknown");
		enrolled_at[count] = CStringGetTextDatum(entry->captured_at);
		seqs[count] = Int64GetDatum(entry->seq);
		count++;
	}
	if (count == 0)
		return;

	values[0] = PointerGetDatum(construct_array(patients, count, TEXTOID, -1, false, TYPALIGN_INT));
	values[1] = PointerGetDatum(construct_array(enrolled_by, count, TEXTOID, -1, false, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(enrolled_at, count, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_array(seqs, count, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (spi_query("INSERT INTO portal_sync.enrollment AS e"
				  " (patient_id, enrolled_at, enrolled_by, snapshot_requested_at)"
				  " SELECT r.p, r.t::pg_catalog.timestamptz, r.b, r.t::pg_catalog.timestamptz"
				  " FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2),"
				  "                pg_catalog.unnest($3), pg_catalog.unnest($4)) AS r(p, b, t, s)"
				  " ON CONFLICT (patient_id) DO NOTHING",
				  4, types, values, NULL, false) != SPI_OK_INSERT)
		elog(ERROR, "settling enrollments failed");
}

/*
 * A snapshot built by an earlier attempt whose request is still queued
 * but not in this unit (a transaction that committed since put entries
 * before it, and the unit ends before the request) is resumed by a later
 * unit under its old seq.  Until then every entry of its patient here is
 * held: an event sent now would get a later seq than that snapshot's
 * remaining items and overtake them at the portal.
 */
static void
hold_patients_of_snapshots_ahead(UnitBuilder *builder, char **patient_ids, int npatients)
{
	Datum	   *requests = palloc(Max(npatients, 1) * sizeof(Datum));
	int			nrequests = 0;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1];

	for (int i = 0; i < npatients; i++)
	{
		PatientState *patient = string_map_find(builder->patients, patient_ids[i]);

		if (patient->snapshot_request > 0 && !patient->resuming)
			requests[nrequests++] = Int64GetDatum(patient->snapshot_request);
	}
	if (nrequests == 0)
		return;
	values[0] = PointerGetDatum(construct_array(requests, nrequests, INT8OID, 8,
												FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	/* any entry may be a snapshot's request: see serve_entry */
	if (spi_query("SELECT patient_id FROM portal_sync.outbox"
				  " WHERE seq = ANY ($1)",
				  1, types, values, NULL, true) != SPI_OK_SELECT)
		elog(ERROR, "reading portal_sync.outbox failed");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		PatientState *patient = string_map_find(builder->patients,
												SPI_getvalue(SPI_tuptable->vals[i],
															 SPI_tuptable->tupdesc, 1));

		if (patient != NULL)
			patient->snapshot_ahead = true;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * Load the attached tables' settings and statements.
 */
static void
load_sources(UnitBuilder *builder)
{
	ListCell   *lc;

	worker_sources_check_snapshot();
	foreach(lc, worker_sources())
	{
		WorkerSource *source = lfirst(lc);
		SourceRows *source_rows = palloc0(sizeof(SourceRows));

		source_rows->source = source;
		source_rows->rows = string_map_create("portal_sync rows", sizeof(SourceRow),
											  CurrentMemoryContext);
		source_rows->snapshot_rows = string_map_create("portal_sync snapshot rows",
													   sizeof(SnapshotRows),
													   CurrentMemoryContext);
		/*
		 * A retracted source has no rows to read: every key of it is found
		 * missing, and so goes as a delete; it is in no snapshot.
		 */
		if (source->retracting)
		{
			builder->retracting = lappend(builder->retracting, source_rows);
			builder->unit->has_retractions = true;
			continue;
		}
		builder->sources = lappend(builder->sources, source_rows);
		if (source->kind == SOURCE_PATIENT && builder->chart_source == NULL)
			builder->chart_source = source;
	}
}

/*
 * Keep the unit's change entries to about max_bytes of row data: the
 * sizes of the rows they name are asked first, and the unit ends before
 * the entry that goes over (a first entry larger than that stays, alone).
 * The same statement reads the rows whose data is at most max_bytes
 * divided by the keys named, so that what it reads is bounded by
 * max_bytes too (a larger row is detoasted only to be measured, nothing
 * is kept); the rest are read by key once the unit is cut
 * (load_unit_context).  So the rows the unit reads, and the events it
 * holds, are bounded by bytes whatever their sizes; the rest is read by
 * the next unit.
 */
static void
limit_unit_to_bytes(UnitBuilder *builder, size_t max_bytes)
{
	DeliveryUnit *unit = builder->unit;
	HTAB	   *sizes = string_map_create("portal_sync row sizes", sizeof(RowSize),
										  CurrentMemoryContext);
	ListCell   *lc;
	size_t		bytes = 0;
	int			keys_named = 0;
	size_t		max_row_bytes;

	for (int i = 0; i < unit->nentries; i++)
		keys_named += Max(unit->entries[i].nkeys, 0);
	max_row_bytes = max_bytes / Max(keys_named, 1);

	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);
		WorkerSource *source = source_rows->source;
		int			nkeys = 0;
		char	  **keys;

		for (int i = 0; i < unit->nentries; i++)
			if (unit->entries[i].source_id == source->source_id)
				nkeys += unit->entries[i].nkeys;
		if (nkeys == 0)
			continue;
		keys = palloc(nkeys * sizeof(char *));
		nkeys = 0;
		for (int i = 0; i < unit->nentries; i++)
		{
			OutboxEntry *entry = &unit->entries[i];

			if (entry->source_id == source->source_id && entry->nkeys > 0)
			{
				memcpy(keys + nkeys, entry->keys, entry->nkeys * sizeof(char *));
				nkeys += entry->nkeys;
			}
		}
		source_rows->rows_read = read_rows_with_sizes(source, keys, nkeys, max_row_bytes,
													  source_rows->rows, sizes);
		if (!source_rows->rows_read)
			read_row_sizes(source, keys, nkeys, sizes);
		pfree(keys);
	}

	for (int i = 0; i < unit->nentries; i++)
	{
		OutboxEntry *entry = &unit->entries[i];

		for (int k = 0; k < entry->nkeys; k++)
		{
			char	   *id = psprintf("%d|%s", entry->source_id, entry->keys[k]);
			RowSize    *size = string_map_find(sizes, id);

			bytes += size != NULL ? size->bytes : 0;
			pfree(id);
			if (bytes <= max_bytes || (i == 0 && k == 0))
				continue;

			/*
			 * The rest is read by later units: the keys of this entry from
			 * k on are owed whatever this unit consumes of it.
			 */
			unit->wrapped = false;
			if (k == 0)
			{
				unit->next_cursor = unit->entries[i - 1].seq;
				unit->nentries = i;
			}
			else
			{
				/*
				 * The read moves past the entry: its keys still owed are
				 * read again when the scan comes round (as held entries
				 * are), so that an entry held here cannot keep every later
				 * unit on itself.
				 */
				unit->next_cursor = entry->seq;
				entry->unserved_keys = entry->keys + k;
				entry->nunserved = entry->nkeys - k;
				entry->nkeys = k;
				unit->nentries = i + 1;
			}
			hash_destroy(sizes);
			return;
		}
	}
	hash_destroy(sizes);
}

/*
 * Load the patients' enrollment and chart state, and every row the change
 * entries name.
 */
static void
load_unit_context(UnitBuilder *builder)
{
	DeliveryUnit *unit = builder->unit;
	ListCell   *lc;
	char	  **patient_ids = palloc(Max(unit->nentries, 1) * sizeof(char *));
	int			npatients = 0;
	Datum	   *elements;
	Oid			types[1] = {TEXTARRAYOID};
	Datum		values[1];
	int			ret;

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
			patient->last_request = -1;
			patient->unenroll_request = -1;
			patient_ids[npatients++] = patient->patient_id;
		}
		if (unit->entries[i].op == OUTBOX_OP_SNAPSHOT ||
			unit->entries[i].op == OUTBOX_OP_ENROLL)
		{
			patient->last_request = i;
			if (unit->entries[i].op == OUTBOX_OP_ENROLL)
				patient->has_enroll_request = true;
		}
		if (unit->entries[i].op == OUTBOX_OP_UNENROLL && patient->unenroll_request < 0)
			patient->unenroll_request = i;
	}
	if (npatients == 0)
		return;

	/* Enrollment */
	elements = palloc(npatients * sizeof(Datum));
	for (int i = 0; i < npatients; i++)
		elements[i] = CStringGetTextDatum(patient_ids[i]);
	values[0] = PointerGetDatum(construct_array(elements, npatients, TEXTOID, -1, false,
												TYPALIGN_INT));
	ret = spi_query("SELECT patient_id, purged, snapshot_accepted_at IS NOT NULL,"
					" COALESCE(snapshot_seq, 0), COALESCE(snapshot_request, 0)"
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
		patient->snapshot_seq = DatumGetInt64(SPI_getbinval(tuple, desc, 4, &isnull));
		patient->snapshot_request = DatumGetInt64(SPI_getbinval(tuple, desc, 5, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);

	settle_enrollments(builder);

	/*
	 * Which patients' enrollment snapshots wait.  A patient whose wait
	 * started in an earlier unit waits here too, though its request is
	 * behind the scan position: its other entries are retractions only.
	 */
	for (int i = 0; i < unit->nentries; i++)
	{
		OutboxEntry *entry = &unit->entries[i];
		PatientState *patient = string_map_find(builder->patients, entry->patient_id);

		if (entry->seq == patient->snapshot_request)
		{
			/* the request of a snapshot built before, whatever its op */
			patient->resuming = true;
			patient->last_request = Max(patient->last_request, i);
		}
	}
	hold_patients_of_snapshots_ahead(builder, patient_ids, npatients);
	for (int i = 0; i < npatients; i++)
	{
		PatientState *patient = string_map_find(builder->patients, patient_ids[i]);

		/*
		 * A snapshot already built once for its request passed its wait
		 * then: it is resumed, never held again.
		 */
		if (patient->resuming)
			patient->waiting = false;
		else if (patient->has_enroll_request)
			patient->waiting = !snapshot_wait_passed(patient->patient_id,
													 GetActiveSnapshot());
		else
			patient->waiting = snapshot_wait_pending(patient->patient_id);
	}

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

	/*
	 * Rows named by change entries, one statement per source: the rows
	 * read with their sizes are in hand but for the large ones; all of
	 * them where the rules failed on some row then.
	 */
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
			for (int k = 0; k < entry->nkeys; k++)
			{
				SourceRow  *row = source_rows->rows_read ?
					string_map_find(source_rows->rows, entry->keys[k]) : NULL;

				if (!source_rows->rows_read || (row != NULL && row->data_unread))
					keys[nkeys++] = entry->keys[k];
			}
		}
		if (nkeys > 0)
			read_rows_by_key(source_rows->source, keys, nkeys, source_rows->rows);
	}
}

/*
 * Append an event to the unit.  Its id, seq and JSON are made once the
 * unit is complete (finish_events): an event's id depends on every entry
 * it ends up consuming.
 */
static DeliveryEvent *
add_event(UnitBuilder *builder, OutboxEntry *entry, WorkerSource *source,
		  const char *key, EventOp op, const char *data_json)
{
	DeliveryEvent *event = palloc0(sizeof(DeliveryEvent));

	event->patient_id = entry->patient_id;
	event->op = op;
	event->change_seq = entry->seq;
	event->captured_at = entry->captured_at;
	event->data_json = data_json;
	if (source != NULL)
	{
		event->source_id = source->source_id;
		event->source_name = source->name;
		event->kind_name = source->kind_name;
		event->key = pstrdup(key);
	}
	builder->unit->events = lappend(builder->unit->events, event);
	builder->nevents++;
	if (data_json != NULL)
		builder->nbytes += strlen(data_json);
	((PatientState *) string_map_find(builder->patients, entry->patient_id))->last_event = event;
	return event;
}

/*
 * Record that accepting this event consumes an outbox entry (key_index -1)
 * or one of its keys.  The event then reports that entry's change.
 */
static void
add_consumption(UnitBuilder *builder, DeliveryEvent *event, int entry_index, int key_index)
{
	Consumption *consumption = palloc(sizeof(Consumption));
	OutboxEntry *entry = &builder->unit->entries[entry_index];

	consumption->entry = entry_index;
	consumption->key_index = key_index;
	event->consumes = lappend(event->consumes, consumption);
	/* a snapshot's markers are named by its request alone */
	if (event->op == EVENT_SNAPSHOT_BEGIN || event->op == EVENT_SNAPSHOT_END)
		return;
	if (entry->seq > event->change_seq)
	{
		event->change_seq = entry->seq;
		event->captured_at = entry->captured_at;
	}
}

/*
 * The coalescing key of an item in the unit: changes of one row between
 * two snapshots or purges of its patient become one event.
 */
static char *
item_id(PatientState *patient, int32 source_id, const char *key)
{
	return psprintf("%d|%d|%s|%s", patient->epoch, source_id, patient->patient_id, key);
}

/*
 * Would this entry become a snapshot when served?  A guess from what is
 * known before serving (serve_request decides): a wrong guess only reads
 * rows for nothing, or leaves a patient to be read alone.
 */
static bool
likely_snapshot(UnitBuilder *builder, int entry_index)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	PatientState *patient;

	if (entry->op != OUTBOX_OP_SNAPSHOT && entry->op != OUTBOX_OP_ENROLL)
		return false;
	patient = string_map_find(builder->patients, entry->patient_id);
	return patient != NULL && patient->enrolled && patient->chart_shareable &&
		!patient->waiting && !patient->snapshot_ahead && patient->unenroll_request < 0 &&
		entry_index == patient->last_request;
}

/*
 * Read the snapshot rows of this entry's patient and of the patients of
 * the next entries that will likely snapshot too, in one statement per
 * source: a go-live enrolls thousands of patients at once, and a
 * statement per patient and source is what made it slow.  As many
 * patients as the unit has room for, judged from the snapshots read so
 * far (one alone the first time), so that what is read stays about the
 * unit's size in events and bytes.  All reads use the unit's snapshot, so
 * rows read ahead are the rows a read at serving time would see.
 */
static void
read_snapshots_ahead(UnitBuilder *builder, int entry_index)
{
	OutboxEntry *entries = builder->unit->entries;
	char	  **patient_ids;
	int			npatients = 0;
	int			wanted = 1;
	int64		rows = 0;
	double		bytes = 0;
	bool		found;
	ListCell   *lc;

	if (rows_per_snapshot >= 0)
	{
		double		by_events = (builder->max_events - builder->nevents) / (rows_per_snapshot + 2);
		double		by_bytes = (builder->max_bytes - Min(builder->nbytes, builder->max_bytes)) /
			(bytes_per_snapshot + 1);

		wanted = (int) Max(1, Min(Min(by_events, by_bytes) + 1, MAX_READ_AHEAD_PATIENTS));
	}

	/* each patient is marked when asked for, so that it is asked for once */
	patient_ids = palloc(wanted * sizeof(char *));
	patient_ids[npatients++] = entries[entry_index].patient_id;
	(void) string_map_enter(builder->read_ahead, entries[entry_index].patient_id, &found);
	for (int i = entry_index + 1; i < builder->unit->nentries && npatients < wanted; i++)
	{
		if (likely_snapshot(builder, i) &&
			string_map_find(builder->read_ahead, entries[i].patient_id) == NULL)
		{
			(void) string_map_enter(builder->read_ahead, entries[i].patient_id, &found);
			patient_ids[npatients++] = entries[i].patient_id;
		}
	}

	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);
		WorkerSource *source = source_rows->source;

		if (source->kind == SOURCE_CCDA)
			continue;
		if (!read_snapshots_rows(source, patient_ids, npatients, source_rows->snapshot_rows))
		{
			/* the rules fail on some row: each patient alone */
			for (int p = 0; p < npatients; p++)
			{
				SnapshotRows *patient_rows = string_map_enter(source_rows->snapshot_rows,
															  patient_ids[p], &found);

				patient_rows->rows = read_snapshot_rows(source, patient_ids[p]);
			}
		}
		for (int p = 0; p < npatients; p++)
		{
			SnapshotRows *patient_rows = string_map_find(source_rows->snapshot_rows, patient_ids[p]);
			ListCell   *rc;

			if (patient_rows == NULL)
				continue;
			rows += list_length(patient_rows->rows);
			foreach(rc, patient_rows->rows)
			{
				SourceRow  *row = lfirst(rc);

				bytes += row->data_json ? strlen(row->data_json) : 0;
			}
		}
	}

	/* the latest read counts as much as all earlier ones */
	if (rows_per_snapshot < 0)
	{
		rows_per_snapshot = (double) rows / npatients;
		bytes_per_snapshot = bytes / npatients;
	}
	else
	{
		rows_per_snapshot = (rows_per_snapshot + (double) rows / npatients) / 2;
		bytes_per_snapshot = (bytes_per_snapshot + bytes / npatients) / 2;
	}
	pfree(patient_ids);
}

/*
 * A patient's shareable rows of a source for its snapshot, read ahead.
 */
static List *
snapshot_rows_of(SourceRows *source_rows, const char *patient_id)
{
	SnapshotRows *patient_rows = string_map_find(source_rows->snapshot_rows, patient_id);

	return patient_rows != NULL ? patient_rows->rows : NIL;
}

/*
 * Would this entry's snapshot, read ahead, take the unit past its limits?
 * Then the unit ends before it, so that its batches are full: a unit that
 * went over by one snapshot would send a last batch of a few events.
 */
static bool
snapshot_overflows_unit(UnitBuilder *builder, int entry_index)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	int			events = 2;
	size_t		bytes = 0;
	ListCell   *lc;

	if (builder->nevents == 0 || !likely_snapshot(builder, entry_index) ||
		string_map_find(builder->read_ahead, entry->patient_id) == NULL)
		return false;
	foreach(lc, builder->sources)
	{
		ListCell   *rc;

		foreach(rc, snapshot_rows_of(lfirst(lc), entry->patient_id))
		{
			SourceRow  *row = lfirst(rc);

			events++;
			bytes += row->data_json ? strlen(row->data_json) : 0;
		}
	}
	return builder->nevents + events > builder->max_events ||
		builder->nbytes + bytes > builder->max_bytes;
}

/*
 * Emit a patient's snapshot: begin, every shareable item of every source
 * but C-CDA documents, end, all reporting the request.  The end consumes
 * the request and the patient's earlier requests in the unit; later
 * changes of an item in the unit are consumed by its upsert here.
 */
static void
emit_snapshot(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	OutboxEntry *entry = &builder->unit->entries[entry_index];
	OutboxEntry *marker_entry = entry;
	ListCell   *lc;
	DeliveryEvent *begin;
	DeliveryEvent *end;
	int64		preset_seq = 0;
	bool		after_lost_purge = purge_may_be_applied(builder, patient);

	/*
	 * The snapshot of a request keeps the seq it was given when it was
	 * first built (kept with the patient's enrollment, see finish_events):
	 * the portal may hold it open, its begin accepted and not its end, and
	 * counts what it mentioned so far.  So it is resumed under the same
	 * seq and marker ids, even after a crash.
	 *
	 * Not after a purge of the patient whose answer was lost: the portal
	 * may have applied the purge, whose seq is higher, and closed the
	 * snapshot with it; or not, and still hold the snapshot open.  Then
	 * the purge goes again, first, and a new snapshot follows under a new
	 * seq: right in both cases.
	 */
	if (after_lost_purge)
		(void) add_event(builder, entry, NULL, NULL, EVENT_PURGE, NULL);
	else if (patient->snapshot_request > 0)
	{
		if (entry->seq != patient->snapshot_request)
		{
			foreach(lc, patient->deferred_requests)
			{
				OutboxEntry *earlier = &builder->unit->entries[lfirst_int(lc)];

				if (earlier->seq == patient->snapshot_request)
					marker_entry = earlier;
			}
		}
		if (marker_entry->seq == patient->snapshot_request)
			preset_seq = patient->snapshot_seq;
	}

	if (string_map_find(builder->read_ahead, entry->patient_id) == NULL)
		read_snapshots_ahead(builder, entry_index);

	patient->epoch++;
	begin = add_event(builder, marker_entry, NULL, NULL, EVENT_SNAPSHOT_BEGIN, NULL);
	begin->preset_seq = preset_seq;
	foreach(lc, builder->sources)
	{
		SourceRows *source_rows = lfirst(lc);
		WorkerSource *source = source_rows->source;
		List	   *rows;
		ListCell   *rc;

		if (source->kind == SOURCE_CCDA)
			continue;
		rows = snapshot_rows_of(source_rows, entry->patient_id);
		foreach(rc, rows)
		{
			SourceRow  *row = lfirst(rc);
			DeliveryEvent *item;
			EmittedItem *emitted;
			bool		found;

			item = add_event(builder, entry, source, row->key, EVENT_UPSERT, row->data_json);
			item->shares_seq = true;
			item->preset_seq = preset_seq;
			emitted = string_map_enter(builder->emitted,
									   item_id(patient, source->source_id, row->key), &found);
			emitted->event = item;
		}
	}
	end = add_event(builder, marker_entry, NULL, NULL, EVENT_SNAPSHOT_END, NULL);
	end->shares_seq = true;
	end->preset_seq = preset_seq;
	add_consumption(builder, end, entry_index, -1);
	foreach(lc, patient->deferred_requests)
		add_consumption(builder, end, lfirst_int(lc), -1);
	list_free(patient->deferred_requests);
	patient->deferred_requests = NIL;

	patient->purged = false;
	patient->snapshot_accepted = false;
}

/*
 * Emit a purge of an enrolled patient whose chart is restricted; it
 * consumes the entry.
 */
static void
emit_purge(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	DeliveryEvent *purge;
	ListCell   *lc;

	patient->epoch++;
	purge = add_event(builder, &builder->unit->entries[entry_index], NULL, NULL,
					  EVENT_PURGE, NULL);
	add_consumption(builder, purge, entry_index, -1);
	foreach(lc, patient->deferred_requests)
		add_consumption(builder, purge, lfirst_int(lc), -1);
	list_free(patient->deferred_requests);
	patient->deferred_requests = NIL;
	patient->purged = true;
	patient->snapshot_accepted = false;
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

			last = add_event(builder, entry, source, keys[i],
							 upsert ? EVENT_UPSERT : EVENT_DELETE,
							 upsert ? row->data_json : NULL);
		}
	}
	if (last != NULL)
		add_consumption(builder, last, entry_index, -1);
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
		add_consumption(builder, patient->last_event, entry_index, -1);
	else
	{
		entry->consumed = true;
		entry->changed = true;
		builder->unit->silent++;
	}
}

/*
 * Serve a change entry: one upsert or delete per key.  A key whose upsert
 * must wait (a C-CDA document before the patient's snapshot is accepted;
 * anything but a retraction while the patient's snapshot waits) is held:
 * it stays in the outbox for a later unit.
 */
static void
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
		EmittedItem *emitted;
		bool		found;

		if (row != NULL && row->data_unread)
			elog(ERROR, "a row of the unit was not read");
		upsert = row != NULL && row->shareable && patient->chart_shareable &&
			strcmp(row->patient_id, entry->patient_id) == 0;

		if (upsert && (patient->waiting ||
					   (source->kind == SOURCE_CCDA && !patient->snapshot_accepted)))
		{
			builder->unit->held++;
			continue;
		}

		emitted = string_map_enter(builder->emitted,
								   item_id(patient, source->source_id, key), &found);
		if (!found)
			emitted->event = add_event(builder, entry, source, key,
									   upsert ? EVENT_UPSERT : EVENT_DELETE,
									   upsert ? row->data_json : NULL);
		add_consumption(builder, emitted->event, entry_index, k);
	}
}

/*
 * Serve a snapshot request (an enrollment or a resync).  Only the last
 * request of a patient in the unit becomes a snapshot; it consumes the
 * earlier ones.
 */
static void
serve_request(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	if (patient->waiting)
	{
		builder->unit->held++;
		return;
	}
	if (entry_index < patient->last_request)
	{
		patient->deferred_requests = lappend_int(patient->deferred_requests, entry_index);
		return;
	}
	if (patient->has_enroll_request)
		snapshot_wait_done(patient->patient_id);

	if (!patient->enrolled)
	{
		/* a resync of a patient whose enrollment has ended */
		ListCell   *lc;

		foreach(lc, patient->deferred_requests)
			consume_silently(builder, lfirst_int(lc));
		patient->deferred_requests = NIL;
		consume_silently(builder, entry_index);
	}
	else if (!patient->chart_shareable)
	{
		if (patient->enrolled && !patient->purged)
			emit_purge(builder, entry_index, patient);
		else
		{
			ListCell   *lc;

			foreach(lc, patient->deferred_requests)
				consume_silently(builder, lfirst_int(lc));
			patient->deferred_requests = NIL;
			consume_silently(builder, entry_index);
		}
	}
	else
		emit_snapshot(builder, entry_index, patient);
}

/*
 * Serve an unenroll() request: a purge, which consumes the request and the
 * patient's earlier entries in the unit (deferred to it), and once
 * accepted ends the enrollment (unit_commit.c); then the patient's
 * insurance again, which the purge took off the portal.  A retraction:
 * it never waits for the patient's snapshot.
 */
static void
serve_unenroll(UnitBuilder *builder, int entry_index, PatientState *patient)
{
	/*
	 * Also for a patient no longer enrolled: the request is sent again
	 * after a crash, or by retry_dead_letters() after the portal refused
	 * the purge.
	 */
	{
		DeliveryEvent *purge;
		ListCell   *lc;

		patient->epoch++;
		purge = add_event(builder, &builder->unit->entries[entry_index], NULL, NULL,
						  EVENT_PURGE, NULL);
		purge->ends_enrollment = builder->unit->entries[entry_index].seq;
		foreach(lc, patient->deferred_requests)
			add_consumption(builder, purge, lfirst_int(lc), -1);
		list_free(patient->deferred_requests);
		patient->deferred_requests = NIL;
		snapshot_wait_done(patient->patient_id);
		patient->enrolled = false;
		patient->purged = false;
		patient->snapshot_accepted = false;
	}
	/* the insurance events, or the purge if there are none, consume it */
	emit_insurance_of_patient(builder, entry_index, patient);
}

/*
 * Was a purge of the patient sent by an earlier attempt at this unit,
 * whose answer was lost?  The portal may have applied it: the patient's
 * next events must then be a snapshot, as after an accepted purge.
 */
static bool
purge_may_be_applied(UnitBuilder *builder, PatientState *patient)
{
	char	   *id;
	bool		sent;

	if (builder->sent == NULL || hash_get_num_entries(builder->sent) == 0)
		return false;
	id = psprintf("purge|%s", patient->patient_id);
	sent = string_map_find(builder->sent, id) != NULL;
	pfree(id);
	return sent;
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

	if (patient->unenroll_request >= 0)
	{
		if (entry_index == patient->unenroll_request)
		{
			serve_unenroll(builder, entry_index, patient);
			return;
		}
		if (entry_index > patient->unenroll_request)
		{
			/* after the enrollment ended, in the next unit */
			builder->unit->held++;
			return;
		}
		source_rows = entry->source_id != 0 ? find_source(builder, entry->source_id) : NULL;
		if (source_rows == NULL || source_rows->source->kind != SOURCE_INSURANCE)
		{
			/* nothing more is sent for the patient: the purge consumes it */
			patient->deferred_requests = lappend_int(patient->deferred_requests, entry_index);
			return;
		}
	}

	if (patient->snapshot_ahead)
	{
		builder->unit->held++;
		return;
	}

	/*
	 * A snapshot's request is usually an enrollment or a resync, but the
	 * change that makes a purged patient's chart shareable again starts a
	 * snapshot too, and is then its request: once that snapshot was built,
	 * the change is served as the request, so that the snapshot is resumed
	 * under its seq.
	 */
	if (entry->op == OUTBOX_OP_SNAPSHOT || entry->op == OUTBOX_OP_ENROLL ||
		(patient->resuming && entry->seq == patient->snapshot_request))
	{
		serve_request(builder, entry_index, patient);
		return;
	}

	source_rows = find_source(builder, entry->source_id);
	if (source_rows == NULL)
	{
		consume_silently(builder, entry_index);	/* detached since */
		return;
	}

	/*
	 * The patient's snapshot later in this unit is read in the same
	 * snapshot as this change, so it carries it: the change is consumed
	 * with it, and the snapshot is the patient's first event here (a
	 * resumed snapshot keeps its older seq).  C-CDA documents are not in
	 * snapshots: they wait for its acceptance.
	 */
	if (patient->enrolled && !patient->waiting && entry_index < patient->last_request)
	{
		/*
		 * A retracted source is in no snapshot: its deletes wait for the
		 * next unit, after the snapshot (whose seq may be an older one,
		 * resumed).
		 */
		if (source_rows->source->kind == SOURCE_CCDA || source_rows->source->retracting)
			builder->unit->held++;
		else
			patient->deferred_requests = lappend_int(patient->deferred_requests, entry_index);
		return;
	}

	if (!patient->enrolled && source_rows->source->kind == SOURCE_PATIENT &&
		!source_rows->source->retracting)
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
	/*
	 * Only the patient's first event in the unit stands right after the
	 * purge: once a snapshot (or purge) is in the unit, it comes first.
	 */
	if (patient->enrolled &&
		(patient->purged ||
		 (patient->epoch == 0 && purge_may_be_applied(builder, patient))))
	{
		/* the chart is shareable again: a snapshot, unless it must wait */
		if (patient->waiting)
			builder->unit->held++;
		else
			emit_snapshot(builder, entry_index, patient);
		return;
	}

	serve_change_entry(builder, entry_index, patient, source_rows);
}

/* Snapshots given their seq by this unit. */
typedef struct NewSnapshots
{
	int			count;
	int			size;
	Datum	   *patients;
	Datum	   *seqs;
	Datum	   *requests;
} NewSnapshots;

static void
remember_snapshot_seq(NewSnapshots *snapshots, DeliveryEvent *begin)
{
	if (snapshots->count == snapshots->size)
	{
		snapshots->size = Max(16, snapshots->size * 2);
		snapshots->patients = snapshots->patients
			? repalloc(snapshots->patients, snapshots->size * sizeof(Datum))
			: palloc(snapshots->size * sizeof(Datum));
		snapshots->seqs = snapshots->seqs
			? repalloc(snapshots->seqs, snapshots->size * sizeof(Datum))
			: palloc(snapshots->size * sizeof(Datum));
		snapshots->requests = snapshots->requests
			? repalloc(snapshots->requests, snapshots->size * sizeof(Datum))
			: palloc(snapshots->size * sizeof(Datum));
	}
	snapshots->patients[snapshots->count] = CStringGetTextDatum(begin->patient_id);
	snapshots->seqs[snapshots->count] = Int64GetDatum(begin->seq);
	snapshots->requests[snapshots->count] = Int64GetDatum(begin->change_seq);
	snapshots->count++;
}

/*
 * Keep the seq of each new snapshot with its request, in the unit's own
 * transaction, which the worker flushes before sending anything.
 */
static void
keep_snapshot_seqs(NewSnapshots *snapshots)
{
	Oid			types[3] = {TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID};
	Datum		values[3];

	if (snapshots->count == 0)
		return;
	values[0] = PointerGetDatum(construct_array(snapshots->patients, snapshots->count,
												TEXTOID, -1, false, TYPALIGN_INT));
	values[1] = PointerGetDatum(construct_array(snapshots->seqs, snapshots->count,
												INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[2] = PointerGetDatum(construct_array(snapshots->requests, snapshots->count,
												INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (spi_query("UPDATE portal_sync.enrollment e"
				  " SET snapshot_seq = n.s, snapshot_request = n.r"
				  " FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2),"
				  "                pg_catalog.unnest($3)) AS n(p, s, r)"
				  " WHERE e.patient_id = n.p",
				  3, types, values, NULL, false) != SPI_OK_UPDATE)
		elog(ERROR, "keeping the seqs of snapshots failed");
}

/*
 * Leave out the events of resumed snapshots that the portal already
 * accepted in an earlier attempt (same id: same content, and the portal
 * counted them in the snapshot it holds open).  What they consumed goes
 * with the snapshot's end.  The worker only knows this until it restarts;
 * after that they are sent again and the portal drops the duplicates.
 */
static void
drop_accepted_snapshot_events(UnitBuilder *builder, HTAB *accepted)
{
	DeliveryUnit *unit = builder->unit;
	List	   *kept = NIL;
	ListCell   *lc;
	List	   *orphans = NIL;

	if (accepted == NULL || hash_get_num_entries(accepted) == 0)
		return;
	foreach(lc, unit->events)
	{
		DeliveryEvent *event = lfirst(lc);
		char		marker_id[64];
		const char *id = event->event_id;

		if (event->op == EVENT_SNAPSHOT_BEGIN && event->preset_seq > 0)
		{
			/* markers are named by their seq, known for a resumed one */
			snprintf(marker_id, sizeof(marker_id), "%s|" INT64_FORMAT,
					 event->patient_id, event->preset_seq);
			id = marker_id;
		}
		if (event->preset_seq > 0 && id != NULL && event->op != EVENT_SNAPSHOT_END &&
			string_map_find(accepted, id) != NULL)
		{
			orphans = list_concat(orphans, event->consumes);
			continue;
		}
		if (event->op == EVENT_SNAPSHOT_END && orphans != NIL)
		{
			event->consumes = list_concat(event->consumes, orphans);
			orphans = NIL;
		}
		kept = lappend(kept, event);
	}
	unit->events = kept;
}

/*
 * The name under which the worker remembers that an item of a snapshot
 * was sent after the snapshot's end (worker.c, note_snapshot_events).
 */
char *
moved_item_id(const DeliveryEvent *event, int64 snapshot_seq)
{
	return psprintf("moved|%s|" INT64_FORMAT "|%d|%s", event->patient_id, snapshot_seq,
					event->source_id, event->key ? event->key : "");
}

/*
 * A resumed snapshot is sent under its first seq, but the portal may
 * already hold later events of the patient: a batch after the snapshot's
 * end may have been applied though its answer was lost.  An item the
 * portal may have got before carries the same id as then (same content)
 * and is deduped; an item never sent in this snapshot (it changed since,
 * it is new, or the worker restarted and does not know) must not go out
 * under the old seq.  It follows the snapshot's end as an upsert of its
 * own, with a new seq and an id of its own: the end may drop it for a
 * moment, the upsert puts it back, and the patient's seqs only grow.
 */
static void
move_unsent_items_of_resumed_snapshots(DeliveryUnit *unit, HTAB *accepted,
									   const char *install_id)
{
	List	   *kept = NIL;
	List	   *moved = NIL;
	ListCell   *lc;

	foreach(lc, unit->events)
	{
		DeliveryEvent *event = lfirst(lc);

		if (event->preset_seq > 0 && event->op == EVENT_UPSERT && event->shares_seq)
		{
			char	   *sent_id = psprintf("sent|%s", event->event_id);
			char	   *moved_id = moved_item_id(event, event->preset_seq);
			bool		sent = accepted != NULL && string_map_find(accepted, sent_id) != NULL;

			/*
			 * An item once sent after the end stays there in every later
			 * build: the portal may hold that end and the events after
			 * it, and the item under the snapshot's seq would come after
			 * them (even where its content, and so its old id, is back).
			 */
			if (accepted != NULL && string_map_find(accepted, moved_id) != NULL)
				sent = false;
			pfree(sent_id);
			pfree(moved_id);
			if (!sent)
			{
				char		digest[48];

				/*
				 * Its own id: the portal may hold this content under the
				 * snapshot's id and would dedupe it after the end dropped
				 * it.
				 */
				snprintf(digest, sizeof(digest), "after snapshot seq " INT64_FORMAT,
						 event->preset_seq);
				event->event_id = event_identity(install_id, event,
												 event->data_json, digest);
				event->shares_seq = false;
				event->follows_snapshot = event->preset_seq;
				event->preset_seq = 0;
				moved = lappend(moved, event);
				continue;
			}
		}
		kept = lappend(kept, event);
		if (event->op == EVENT_SNAPSHOT_END && moved != NIL)
		{
			/*
			 * The request is consumed with the last of them, and the
			 * snapshot stays resumable until then: were the end accepted
			 * and they not, a retry sends them again after the same end.
			 */
			DeliveryEvent *last = llast(moved);

			last->consumes = list_concat(last->consumes, event->consumes);
			event->consumes = NIL;
			event->items_follow = true;
			kept = list_concat(kept, moved);
			moved = NIL;
		}
	}
	kept = list_concat(kept, moved);
	unit->events = kept;
}

/*
 * The id of an upsert inside a snapshot: what it sends and which snapshot
 * mentions it.  A portal that deduped the item under another snapshot's
 * seq would not count it as mentioned by this one, and drop it at its end.
 */
static char *
snapshot_item_identity(const char *install_id, DeliveryEvent *event, int64 snapshot_seq)
{
	char		digest[48];

	snprintf(digest, sizeof(digest), "in snapshot seq " INT64_FORMAT, snapshot_seq);
	return event_identity(install_id, event, event->data_json, digest);
}

/*
 * Give every event its id, its seq and its JSON.  Seqs are taken from the
 * outbox sequence in sending order (a snapshot's items and end share the
 * begin's).  The sequence is WAL-logged; the worker flushes it before
 * sending.
 */
static void
finish_events(UnitBuilder *builder, HTAB *accepted)
{
	DeliveryUnit *unit = builder->unit;
	const char *install_id = builder->settings->install_id;
	int			nevents = list_length(unit->events);
	Oid			seq_relid = portal_sync_relid("outbox_seq");
	int64		seq = 0;
	int			i;
	NewSnapshots new_snapshots = {0};

	/*
	 * ids of upserts and deletes: what they send; an item of a snapshot
	 * also by the snapshot's seq, known here for a resumed one (new ones
	 * get theirs below)
	 */
	for (i = 0; i < nevents; i++)
	{
		DeliveryEvent *event = list_nth(unit->events, i);

		if (event->source_name != NULL && !event->shares_seq)
			event->event_id = event_identity(install_id, event, event->data_json, NULL);
		else if (event->source_name != NULL && event->preset_seq > 0)
			event->event_id = snapshot_item_identity(install_id, event, event->preset_seq);
	}
	drop_accepted_snapshot_events(builder, accepted);
	move_unsent_items_of_resumed_snapshots(unit, accepted, install_id);
	nevents = list_length(unit->events);

	for (i = 0; i < nevents; i++)
	{
		DeliveryEvent *event = list_nth(unit->events, i);

		if (event->preset_seq > 0)
			seq = event->preset_seq;
		else if (!event->shares_seq || seq == 0)
			seq = nextval_internal(seq_relid, false);
		event->seq = seq;
		if (event->op == EVENT_SNAPSHOT_BEGIN && event->preset_seq == 0)
			remember_snapshot_seq(&new_snapshots, event);

		if (event->event_id == NULL && event->source_name != NULL)
			event->event_id = snapshot_item_identity(install_id, event, event->seq);
		/* a snapshot's markers are named by the patient and the seq */
		if (event->source_name == NULL)
		{
			char		digest[32];

			snprintf(digest, sizeof(digest), "seq " INT64_FORMAT, event->seq);
			event->event_id = event_identity(install_id, event, NULL, digest);
		}
		serialize_event(event, event->kind_name, event->captured_at, event->data_json);
	}
	keep_snapshot_seqs(&new_snapshots);
}

/*
 * The unit is cut before entry cut: the entries deferred to a request at
 * or after it (to be consumed by its snapshot, or by an unenroll()'s
 * purge) are not served by this unit.  Returns the index of the first of
 * them (the next unit reads again from there, so that they meet their
 * request again), or cut if there are none.
 */
static int
first_deferred_entry(UnitBuilder *builder, int cut)
{
	HASH_SEQ_STATUS status;
	PatientState *patient;
	int			first = cut;

	hash_seq_init(&status, builder->patients);
	while ((patient = hash_seq_search(&status)) != NULL)
	{
		if (patient->deferred_requests != NIL)
			first = Min(first, linitial_int(patient->deferred_requests));
	}
	return first;
}

/*
 * Build the next delivery unit from the scan position: entries until
 * max_events events.  Entries that need no event are marked consumed; the
 * caller writes that back.  The caller is in a transaction, connected to
 * SPI; the unit reads with a snapshot of its own, taken here.
 */
DeliveryUnit *
build_delivery_unit(SharingSettings *settings, int max_events, size_t max_bytes,
					MemoryContext context, HTAB *accepted)
{
	MemoryContext oldcontext = MemoryContextSwitchTo(context);
	DeliveryUnit *unit = palloc0(sizeof(DeliveryUnit));
	UnitBuilder builder;

	unit->context = context;
	memset(&builder, 0, sizeof(builder));
	builder.unit = unit;
	builder.settings = settings;
	builder.sent = accepted;
	builder.max_events = max_events;
	builder.max_bytes = max_bytes;
	builder.read_ahead = string_map_create("portal_sync snapshots read", sizeof(ReadAheadMark),
										   CurrentMemoryContext);

	/* transactions waited for must end before the unit's snapshot */
	snapshot_waits_refresh();
	if (ActiveSnapshotSet())
		PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());

	set_sharing_parameters(settings->date_cutoff, settings->max_privacy_level);
	rule_errors_reset();
	unit->from_start = scan_cursor == 0;
	read_outbox_entries(unit, max_events);
	load_sources(&builder);
	limit_unit_to_bytes(&builder, max_bytes);
	load_unit_context(&builder);

	for (int i = 0; i < unit->nentries; i++)
	{
		if (builder.nevents >= max_events || builder.nbytes >= max_bytes ||
			snapshot_overflows_unit(&builder, i))
		{
			/* the rest is read again by the next unit */
			int			resume_at = first_deferred_entry(&builder, i);

			unit->next_cursor = resume_at > 0 ? unit->entries[resume_at - 1].seq : scan_cursor;
			unit->wrapped = false;
			unit->nentries = i;
			break;
		}
		serve_entry(&builder, i);
	}
	finish_events(&builder, accepted);
	rule_errors_record();

	MemoryContextSwitchTo(oldcontext);
	return unit;
}
