/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		Writing rows of portal_sync.outbox from the EHR's transactions.
 *
 * The capture triggers write the outbox directly through the table access
 * method, in batches (heap multi-insert, as COPY does), and insert the
 * index entries themselves: no SQL is planned on the EHR's write path and
 * the EHR's roles need no privilege on the outbox.  The outbox is an
 * ordinary WAL-logged table, written in the EHR's own transaction, so an
 * event exists exactly when the change it reports was committed.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "executor/executor.h"
#include "nodes/execnodes.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "miscadmin.h"
#include "portal_sync.h"
#include "shared_state.h"

/* Column numbers of portal_sync.outbox, as created by the install script. */
#define Natts_outbox				6
#define Anum_outbox_seq				1
#define Anum_outbox_patient_id		2
#define Anum_outbox_source_id		3
#define Anum_outbox_op				4
#define Anum_outbox_keys			5
#define Anum_outbox_captured_at		6

#define OUTBOX_BUFFERED_ROWS		64

/* Column numbers of portal_sync.skipped_row */
#define Natts_skipped_row			3

/* Did the current transaction queue events, or change the settings? */
static bool events_queued = false;
static bool settings_changed = false;
static bool enrollment_queued = false;	/* wake the worker whatever it does */

struct OutboxWriter
{
	Relation	rel;
	Oid			seq_relid;
	EState	   *estate;
	ResultRelInfo *result_rel;
	CommandId	command_id;
	TimestampTz captured_at;
	MemoryContext context;		/* the writer and its slots */
	MemoryContext batch_context;	/* values of the buffered rows */
	int			nbuffered;
	TupleTableSlot *slots[OUTBOX_BUFFERED_ROWS];
};

/*
 * Open the outbox for writing a batch of rows in the current command.
 */
OutboxWriter *
outbox_writer_open(void)
{
	OutboxWriter *writer = palloc0(sizeof(OutboxWriter));

	writer->rel = table_open(portal_sync_relid("outbox"), RowExclusiveLock);
	writer->seq_relid = portal_sync_relid("outbox_seq");
	writer->estate = CreateExecutorState();
	writer->result_rel = makeNode(ResultRelInfo);
	InitResultRelInfo(writer->result_rel, writer->rel, 1, NULL, 0);
	ExecOpenIndices(writer->result_rel, false);
	writer->command_id = GetCurrentCommandId(true);
	writer->captured_at = GetCurrentStatementStartTimestamp();
	writer->context = CurrentMemoryContext;
	writer->batch_context = AllocSetContextCreate(CurrentMemoryContext,
												  "portal_sync outbox batch",
												  ALLOCSET_DEFAULT_SIZES);
	return writer;
}

/*
 * Write the buffered rows to the heap in one multi-insert, then their index
 * entries.
 */
static void
outbox_writer_flush(OutboxWriter *writer)
{
	if (writer->nbuffered == 0)
		return;

	table_multi_insert(writer->rel, writer->slots, writer->nbuffered,
					   writer->command_id, 0, NULL);
	for (int i = 0; i < writer->nbuffered; i++)
	{
		List	   *conflicts;

		conflicts = ExecInsertIndexTuples(writer->result_rel, writer->slots[i],
										  writer->estate, false, false,
										  NULL, NIL);
		list_free(conflicts);
		ResetPerTupleExprContext(writer->estate);
		ExecClearTuple(writer->slots[i]);
	}
	writer->nbuffered = 0;
	MemoryContextReset(writer->batch_context);
}

/*
 * Queue one outbox row: these keys of this source changed for this patient
 * (or, with op 's' and no keys, the patient's snapshot is requested).  The
 * row's seq is assigned here, in queueing order, and returned.  The values
 * must stay valid until the writer is flushed.
 */
static int64
outbox_writer_add_row(OutboxWriter *writer, const char *patient_id,
					  int32 source_id, char op, Datum *keys, int nkeys)
{
	TupleTableSlot *slot;
	int64		seq;
	MemoryContext oldcontext;

	if (writer->nbuffered == OUTBOX_BUFFERED_ROWS)
		outbox_writer_flush(writer);

	slot = writer->slots[writer->nbuffered];
	if (slot == NULL)
	{
		oldcontext = MemoryContextSwitchTo(writer->context);
		slot = table_slot_create(writer->rel, NULL);
		writer->slots[writer->nbuffered] = slot;
		MemoryContextSwitchTo(oldcontext);
	}
	oldcontext = MemoryContextSwitchTo(writer->batch_context);

	seq = nextval_internal(writer->seq_relid, false);

	memset(slot->tts_isnull, false, Natts_outbox * sizeof(bool));
	slot->tts_values[Anum_outbox_seq - 1] = Int64GetDatum(seq);
	slot->tts_values[Anum_outbox_patient_id - 1] = CStringGetTextDatum(patient_id);
	if (source_id > 0)
		slot->tts_values[Anum_outbox_source_id - 1] = Int32GetDatum(source_id);
	else
		slot->tts_isnull[Anum_outbox_source_id - 1] = true;
	slot->tts_values[Anum_outbox_op - 1] = CharGetDatum(op);
	if (nkeys > 0)
		slot->tts_values[Anum_outbox_keys - 1] =
			PointerGetDatum(construct_array(keys, nkeys, TEXTOID, -1, false,
											TYPALIGN_INT));
	else
		slot->tts_isnull[Anum_outbox_keys - 1] = true;
	slot->tts_values[Anum_outbox_captured_at - 1] = TimestampTzGetDatum(writer->captured_at);
	ExecStoreVirtualTuple(slot);
	MemoryContextSwitchTo(oldcontext);

	writer->nbuffered++;
	return seq;
}

/*
 * Public form of outbox_writer_add_row for the capture triggers.
 */
void
outbox_writer_add(OutboxWriter *writer, const char *patient_id,
				  int32 source_id, char op, Datum *keys, int nkeys)
{
	outbox_writer_add_row(writer, patient_id, source_id, op, keys, nkeys);
}

/*
 * Flush what is buffered and release the writer.  The lock on the outbox
 * is kept until the end of the transaction.
 */
void
outbox_writer_close(OutboxWriter *writer)
{
	bool		wrote = writer->nbuffered > 0;

	outbox_writer_flush(writer);
	for (int i = 0; i < OUTBOX_BUFFERED_ROWS; i++)
	{
		if (writer->slots[i] != NULL)
			ExecDropSingleTupleTableSlot(writer->slots[i]);
	}
	ExecCloseIndices(writer->result_rel);
	FreeExecutorState(writer->estate);
	MemoryContextDelete(writer->batch_context);
	table_close(writer->rel, NoLock);
	pfree(writer);

	if (wrote)
		outbox_note_queued();
}

/*
 * Queue a request of a patient's whole record: a resync (op 's') or an
 * enrollment (op 'e', whose one key says what enrolled the patient).
 * Returns its seq.  Only appends: no EHR transaction ever waits for
 * another one here.
 */
int64
outbox_queue_request(const char *patient_id, char op, const char *note)
{
	OutboxWriter *writer = outbox_writer_open();
	Datum		keys[1];
	int64		seq;

	if (note != NULL)
		keys[0] = CStringGetTextDatum(note);
	seq = outbox_writer_add_row(writer, patient_id, 0, op, keys, note != NULL ? 1 : 0);
	outbox_writer_close(writer);
	if (op == OUTBOX_OP_ENROLL)
		enrollment_queued = true;
	return seq;
}

/*
 * Count rows of an attached table that were skipped because their patient
 * column was NULL.  One insert-only row per statement: concurrent EHR
 * transactions never wait for each other on a counter.
 */
void
outbox_count_skipped(int32 source_id, int64 row_count)
{
	Relation	rel = table_open(portal_sync_relid("skipped_row"), RowExclusiveLock);
	Datum		values[Natts_skipped_row];
	bool		nulls[Natts_skipped_row] = {false};
	TupleTableSlot *slot = table_slot_create(rel, NULL);

	values[0] = Int32GetDatum(source_id);
	values[1] = TimestampTzGetDatum(GetCurrentStatementStartTimestamp());
	values[2] = Int64GetDatum(row_count);

	ExecClearTuple(slot);
	memcpy(slot->tts_values, values, sizeof(values));
	memcpy(slot->tts_isnull, nulls, sizeof(nulls));
	ExecStoreVirtualTuple(slot);
	table_tuple_insert(rel, slot, GetCurrentCommandId(true), 0, NULL);
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);
}

/*
 * At commit of a transaction that queued events, wake the delivery worker
 * of the database, so that delivery starts within milliseconds.
 */
static void
wake_worker_at_commit(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (events_queued || settings_changed || enrollment_queued)
				wake_worker_of_database(MyDatabaseId, settings_changed || enrollment_queued);
			events_queued = settings_changed = enrollment_queued = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			events_queued = settings_changed = enrollment_queued = false;
			break;
		default:
			break;
	}
}

/*
 * Remember that this transaction queued events, so that the delivery
 * worker is woken when it commits.
 */
static void
register_wake_callback(void)
{
	static bool callback_registered = false;

	if (!callback_registered)
	{
		RegisterXactCallback(wake_worker_at_commit, NULL);
		callback_registered = true;
	}
}

/*
 * Remember that this transaction queued events, so that the delivery
 * worker is woken when it commits.
 */
void
outbox_note_queued(void)
{
	register_wake_callback();
	events_queued = true;
}

/*
 * Remember that this transaction changed portal_sync.settings: the worker
 * is woken at commit even if it is paused or backing off.
 */
void
outbox_note_settings_changed(void)
{
	register_wake_callback();
	settings_changed = true;
}
