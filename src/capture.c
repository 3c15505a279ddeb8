/*-------------------------------------------------------------------------
 *
 * capture.c
 *		The trigger function that records changes of attached tables.
 *
 * attach() puts AFTER ... FOR EACH STATEMENT triggers with transition
 * tables on the EHR's table.  For each statement the function walks the
 * changed rows once and writes one outbox row per (patient, operation)
 * holding the keys of the rows that changed, so a bulk statement costs a
 * handful of outbox rows per patient instead of one per row.  It records
 * only which rows changed, never their content: delivery reads each row
 * as it is when it is sent.  An UPDATE of a row that changes none of the
 * columns sent or decided on (an EHR bumping last_viewed_at, a no-op
 * SET x = x) records nothing.
 *
 * Which patients' changes are recorded depends on the kind of source:
 * insurance always; other kinds only for enrolled patients.  Rows of the
 * enrolling kinds (appointment, ccda, note, pin) enroll their patient when
 * they are inserted satisfying enroll_when, or updated from not satisfying
 * it to satisfying it.
 *
 * A partitioned table and each of its partitions have the triggers: a
 * statement naming the partitioned table fires its triggers only (with
 * every row it changed, in any partition, also rows an UPDATE moved to
 * another partition), a statement naming a partition fires that
 * partition's.  Each finds its settings, in its own row format, through
 * source_config_lookup.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/datum.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

#include "portal_sync.h"
#include "unrecorded_writes.h"

PG_FUNCTION_INFO_V1(portal_sync_capture);

/* Memory of one run of the trigger function; see portal_sync_capture. */
static MemoryContext capture_context = NULL;

/* Most keys in one outbox row. */
#define KEYS_PER_OUTBOX_ROW		500

/* Most keys held in memory by one statement before they are written. */
#define KEYS_PER_STATEMENT_BUFFER	50000

/* Keys of one patient waiting to be written under one operation. */
typedef struct PendingKeys
{
	int			nkeys;
	int			maxkeys;
	Datum	   *keys;
} PendingKeys;

/*
 * What one statement knows of one patient.  The hash key is the patient
 * column's value for by-value types (no output function call per row), or
 * a pointer to its text form for the others.
 */
typedef struct PatientEntry
{
	Datum		hash_key;
	char	   *patient_id;
	bool		queued;			/* are this patient's changes recorded? */
	PendingKeys changed;		/* keys under the statement's operation */
	PendingKeys moved_away;		/* keys of rows that left the patient */
} PatientEntry;

/* The state of one run of the trigger function. */
typedef struct CaptureState
{
	SourceConfig *config;
	char		op;				/* operation of the statement */
	MemoryContext statement_context;	/* lives as long as the run */
	MemoryContext row_context;	/* reset after every row */
	HTAB	   *patients;
	OutboxWriter *writer;
	int64		buffered_keys;
	int64		skipped_rows;
	EState	   *estate;			/* for enroll_when */
	ExprState  *enroll_when;
	ExprContext *econtext;
} CaptureState;

/*
 * Hash and match functions for patients known by the text of their
 * identifier: the hash key points to the string.
 */
static uint32
patient_text_hash(const void *key, Size keysize)
{
	const char *patient_id = DatumGetCString(*(const Datum *) key);

	return string_hash(patient_id, strlen(patient_id) + 1);
}

static int
patient_text_match(const void *key1, const void *key2, Size keysize)
{
	return strcmp(DatumGetCString(*(const Datum *) key1),
				  DatumGetCString(*(const Datum *) key2));
}

/*
 * Write the pending keys of one patient and operation as one outbox row.
 */
static void
flush_pending_keys(CaptureState *state, PatientEntry *entry,
				   PendingKeys *pending, char op)
{
	if (pending->nkeys == 0)
		return;
	if (state->writer == NULL)
	{
		MemoryContext oldcontext = MemoryContextSwitchTo(state->statement_context);

		state->writer = outbox_writer_open();
		MemoryContextSwitchTo(oldcontext);
	}
	outbox_writer_add(state->writer, entry->patient_id,
					  state->config->source_id, op,
					  pending->keys, pending->nkeys);
	for (int i = 0; i < pending->nkeys; i++)
		pfree(DatumGetPointer(pending->keys[i]));
	state->buffered_keys -= pending->nkeys;
	pending->nkeys = 0;
}

/*
 * Write every patient's pending keys.
 */
static void
flush_all_pending_keys(CaptureState *state)
{
	HASH_SEQ_STATUS status;
	PatientEntry *entry;

	hash_seq_init(&status, state->patients);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		flush_pending_keys(state, entry, &entry->moved_away, OUTBOX_OP_DELETE);
		flush_pending_keys(state, entry, &entry->changed, state->op);
	}
}

/*
 * Remember the key of a row for a patient, writing a full outbox row when
 * there are KEYS_PER_OUTBOX_ROW of them, and everything when the statement
 * holds too many keys in memory.
 */
static void
add_pending_key(CaptureState *state, PatientEntry *entry, bool moved_away,
				TupleTableSlot *slot)
{
	PendingKeys *pending = moved_away ? &entry->moved_away : &entry->changed;
	SourceConfig *config = state->config;
	bool		isnull;
	Datum		key = slot_getattr(slot, config->key_attnum, &isnull);
	MemoryContext oldcontext;

	Assert(!isnull);
	oldcontext = MemoryContextSwitchTo(state->statement_context);
	if (pending->nkeys == pending->maxkeys)
	{
		pending->maxkeys = pending->maxkeys == 0 ? 8 : pending->maxkeys * 2;
		if (pending->keys == NULL)
			pending->keys = palloc(pending->maxkeys * sizeof(Datum));
		else
			pending->keys = repalloc(pending->keys, pending->maxkeys * sizeof(Datum));
	}
	pending->keys[pending->nkeys++] =
		CStringGetTextDatum(value_text(key, config->key_type, &config->key_output));
	MemoryContextSwitchTo(oldcontext);
	state->buffered_keys++;

	if (pending->nkeys >= KEYS_PER_OUTBOX_ROW)
		flush_pending_keys(state, entry, pending,
						   moved_away ? OUTBOX_OP_DELETE : state->op);
	else if (state->buffered_keys >= KEYS_PER_STATEMENT_BUFFER)
		flush_all_pending_keys(state);
}

/*
 * The statement's entry for the patient of a row, or NULL if the row has
 * no patient or no key.  On first sight of a patient, decide whether the
 * patient's changes are recorded.
 */
static PatientEntry *
row_patient(CaptureState *state, TupleTableSlot *slot)
{
	SourceConfig *config = state->config;
	bool		isnull;
	Datum		value = slot_getattr(slot, config->patient_attnum, &isnull);
	Datum		hash_key;
	char	   *patient_id = NULL;
	PatientEntry *entry;
	bool		found;

	if (isnull)
		return NULL;
	(void) slot_getattr(slot, config->key_attnum, &isnull);
	if (isnull)
		return NULL;

	if (config->patient_byval)
		hash_key = value;
	else
	{
		patient_id = value_text(value, config->patient_type, &config->patient_output);
		hash_key = CStringGetDatum(patient_id);
	}

	entry = hash_search(state->patients, &hash_key, HASH_ENTER, &found);
	if (!found)
	{
		if (patient_id == NULL)
			patient_id = value_text(value, config->patient_type, &config->patient_output);
		entry->patient_id = MemoryContextStrdup(state->statement_context, patient_id);
		if (!config->patient_byval)
			entry->hash_key = CStringGetDatum(entry->patient_id);
		memset(&entry->changed, 0, sizeof(PendingKeys));
		memset(&entry->moved_away, 0, sizeof(PendingKeys));
		/*
		 * Insurance flows for every patient, so a chart change matters for
		 * every patient too: it can show or hide their insurance.
		 */
		entry->queued = config->kind == SOURCE_INSURANCE ||
			config->kind == SOURCE_PATIENT ||
			patient_is_enrolled(entry->patient_id);
		if (!entry->queued)
			note_unrecorded_patient(entry->patient_id);
	}
	return entry;
}

/*
 * Does the row in the slot satisfy the source's enroll_when?  A NULL
 * result counts as false, like a WHERE clause.  The rule runs in a
 * subtransaction: a rule that fails on some row (a cast of a free-text
 * column, say) must not fail the EHR's write.  Such a row does not enroll,
 * and a warning without the error's text, which may quote the row, says so.
 */
static bool
row_satisfies_enroll_when(CaptureState *state, TupleTableSlot *slot)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool satisfied = false;

	if (state->enroll_when == NULL)
		return true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		bool		isnull;
		Datum		result;

		state->econtext->ecxt_scantuple = slot;
		result = ExecEvalExprSwitchContext(state->enroll_when, state->econtext, &isnull);
		satisfied = !isnull && DatumGetBool(result);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *error;

		MemoryContextSwitchTo(context);
		error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		if (error->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(error);
		ereport(WARNING,
				(errcode(error->sqlerrcode),
				 errmsg("enroll_when of source \"%s\" failed on a row (SQLSTATE %s); the row does not enroll its patient",
						state->config->name, unpack_sql_state(error->sqlerrcode))));
		FreeErrorData(error);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(context);
	CurrentResourceOwner = owner;
	ResetExprContext(state->econtext);
	return satisfied;
}

/*
 * Do two rows of the source have the same key?
 */
static bool
same_key(SourceConfig *config, TupleTableSlot *old_slot, TupleTableSlot *new_slot)
{
	bool		isnull;
	Datum		old_key = slot_getattr(old_slot, config->key_attnum, &isnull);
	Datum		new_key = slot_getattr(new_slot, config->key_attnum, &isnull);

	return datumIsEqual(old_key, new_key, config->key_byval, config->key_typlen);
}

/*
 * Are the stored bytes of two rows' values the same?  With every column
 * compared and no dropped column, that is one comparison of their null
 * bitmaps and data instead of one per column.  -1 when the rows do not
 * store the same number of attributes (a column was added after the old
 * row was written): the caller compares the columns.
 */
static int
same_stored_values(TupleTableSlot *old_slot, TupleTableSlot *new_slot)
{
	MinimalTuple old_tuple = ((MinimalTupleTableSlot *) old_slot)->mintuple;
	MinimalTuple new_tuple = ((MinimalTupleTableSlot *) new_slot)->mintuple;
	int			natts;
	int			data;

	Assert(TTS_IS_MINIMALTUPLE(old_slot) && TTS_IS_MINIMALTUPLE(new_slot));
	natts = HeapTupleHeaderGetNatts(old_tuple);
	if (natts != HeapTupleHeaderGetNatts(new_tuple))
		return -1;
	if ((old_tuple->t_infomask & HEAP_HASNULL) != (new_tuple->t_infomask & HEAP_HASNULL) ||
		old_tuple->t_hoff != new_tuple->t_hoff || old_tuple->t_len != new_tuple->t_len)
		return 0;
	if ((old_tuple->t_infomask & HEAP_HASNULL) &&
		memcmp(old_tuple->t_bits, new_tuple->t_bits, BITMAPLEN(natts)) != 0)
		return 0;
	/* t_hoff counts from where a full tuple header would begin */
	data = old_tuple->t_hoff - MINIMAL_TUPLE_OFFSET;
	return memcmp((char *) old_tuple + data, (char *) new_tuple + data,
				  old_tuple->t_len - data) == 0;
}

/*
 * Does an UPDATE leave the row as the portal and the rules see it?  True
 * when none of the source's compared columns (see source_cache.c) changed.
 * Values are compared as stored, byte for byte: a value equal by "=" but
 * not in its bytes (numeric 1.0 and 1.00) is a change the portal must see,
 * and an unchanged TOASTed value keeps its toast pointer, so it compares
 * without being fetched.  The rows are deformed only as far as the
 * comparison goes: a changed row usually differs early.
 */
static bool
row_unchanged(SourceConfig *config, TupleTableSlot *old_slot, TupleTableSlot *new_slot)
{
	TupleDesc	desc = old_slot->tts_tupleDescriptor;

	if (config->every_update_counts || config->ncompared == 0 ||
		config->compared_attnums[config->ncompared - 1] > desc->natts)
		return false;
	if (config->compare_whole_row)
	{
		int			same = same_stored_values(old_slot, new_slot);

		if (same >= 0)
			return same == 1;
	}
	for (int i = 0; i < config->ncompared; i++)
	{
		AttrNumber	attnum = config->compared_attnums[i];
		int			index = attnum - 1;
		Form_pg_attribute attr = TupleDescAttr(desc, index);

		if (old_slot->tts_nvalid < attnum)
			slot_getsomeattrs(old_slot, attnum);
		if (new_slot->tts_nvalid < attnum)
			slot_getsomeattrs(new_slot, attnum);
		if (old_slot->tts_isnull[index] != new_slot->tts_isnull[index])
			return false;
		if (!old_slot->tts_isnull[index] &&
			!datumIsEqual(old_slot->tts_values[index], new_slot->tts_values[index],
						  attr->attbyval, attr->attlen))
			return false;
	}
	return true;
}

/*
 * Record one changed row.  new_slot is NULL for a delete, old_slot NULL for
 * an insert; an update passes both, so that a row that moved to another
 * patient, or changed its key, is also reported where it was.  An update
 * that changes nothing the portal or the rules see records nothing.
 */
static void
capture_row(CaptureState *state, TupleTableSlot *old_slot, TupleTableSlot *new_slot)
{
	SourceConfig *config = state->config;
	PatientEntry *old_patient = NULL;
	PatientEntry *new_patient = NULL;

	if (old_slot != NULL && new_slot != NULL &&
		row_unchanged(config, old_slot, new_slot))
		return;

	if (old_slot != NULL)
		old_patient = row_patient(state, old_slot);
	if (new_slot != NULL)
		new_patient = row_patient(state, new_slot);

	if (new_slot != NULL && new_patient == NULL)
		state->skipped_rows++;
	else if (new_slot == NULL && old_patient == NULL)
		state->skipped_rows++;

	if (new_patient != NULL)
	{
		if (!new_patient->queued && source_kind_enrolls(config->kind) &&
			row_satisfies_enroll_when(state, new_slot) &&
			!(old_patient == new_patient &&
			  row_satisfies_enroll_when(state, old_slot)))
		{
			enroll_patient(new_patient->patient_id, config->name);
			new_patient->queued = true;
		}
		if (new_patient->queued)
			add_pending_key(state, new_patient, false, new_slot);
	}

	if (old_patient != NULL && old_patient->queued)
	{
		if (new_slot == NULL)
			add_pending_key(state, old_patient, false, old_slot);
		else if (old_patient != new_patient)
			add_pending_key(state, old_patient, true, old_slot);
		else if (!same_key(config, old_slot, new_slot))
			add_pending_key(state, old_patient, false, old_slot);
	}
}

/*
 * Prepare a read of a transition table that does not disturb other
 * triggers reading it: each reader has its own read pointer.
 */
static void
start_transition_read(Tuplestorestate *table)
{
	int			pointer;

	if (table == NULL)
		return;
	pointer = tuplestore_alloc_read_pointer(table, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(table, pointer);
	tuplestore_rescan(table);
}

/*
 * Walk the statement's transition tables, in step for an update: the old
 * and new tables hold the rows of an UPDATE in the same order.
 */
static void
capture_statement(CaptureState *state, Relation rel,
				  Tuplestorestate *old_table, Tuplestorestate *new_table)
{
	TupleTableSlot *old_slot = NULL;
	TupleTableSlot *new_slot = NULL;
	MemoryContext oldcontext;

	if (old_table != NULL)
		old_slot = MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsMinimalTuple);
	if (new_table != NULL)
		new_slot = MakeSingleTupleTableSlot(RelationGetDescr(rel), &TTSOpsMinimalTuple);

	start_transition_read(old_table);
	start_transition_read(new_table);

	for (;;)
	{
		bool		have_old = false;
		bool		have_new = false;

		CHECK_FOR_INTERRUPTS();

		if (old_table != NULL)
			have_old = tuplestore_gettupleslot(old_table, true, false, old_slot);
		if (new_table != NULL)
			have_new = tuplestore_gettupleslot(new_table, true, false, new_slot);
		if (!have_old && !have_new)
			break;
		if (old_table != NULL && new_table != NULL && have_old != have_new)
			elog(ERROR, "transition tables of an update differ in length");

		oldcontext = MemoryContextSwitchTo(state->row_context);
		capture_row(state,
					have_old ? old_slot : NULL,
					have_new ? new_slot : NULL);
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(state->row_context);
	}

	if (old_slot != NULL)
	{
		tuplestore_select_read_pointer(old_table, 0);
		ExecDropSingleTupleTableSlot(old_slot);
	}
	if (new_slot != NULL)
	{
		tuplestore_select_read_pointer(new_table, 0);
		ExecDropSingleTupleTableSlot(new_slot);
	}
}

/*
 * The transaction (and subtransaction) that last queued the snapshots of
 * every enrolled patient because rows went all at once.  A TRUNCATE of a
 * partitioned table fires the trigger of each of its partitions, and a
 * snapshot is read when it is sent, after commit: one set of snapshots
 * per transaction is enough.
 */
static LocalTransactionId resync_queued_lxid = InvalidLocalTransactionId;
static SubTransactionId resync_queued_subxid = InvalidSubTransactionId;

/*
 * The SQL text of column "column" of row t as capture writes it into the
 * outbox (see value_text.c).
 */
static char *
column_text_sql(Oid relid, AttrNumber attnum)
{
	const char *column = quote_identifier(get_attname(relid, attnum, false));

	if (type_needs_value_text(getBaseType(get_atttype(relid, attnum))))
		return psprintf("portal_sync.value_text(t.%s)", column);
	return psprintf("t.%s::pg_catalog.text", column);
}

/*
 * Every row of a table comes or goes at once: op is OUTBOX_OP_DELETE for
 * a TRUNCATE (before it runs: the rows are still there) or a DROP of a
 * partition, OUTBOX_OP_INSERT for a table attached as a partition (ALTER
 * TABLE ... ATTACH PARTITION).  Insurance rows are sent whether the
 * patient is enrolled or not, so each of them is reported; for the other
 * kinds, rows that go request every enrolled patient's snapshot again,
 * which tells the portal to drop what it no longer holds, and rows that
 * come are reported for the patients whose changes are recorded (as an
 * INSERT of them would, except that they enroll nobody: they are not new
 * appointments or documents, only rows moved in).
 */
static void
capture_whole_table(SourceConfig *config, Relation rel, char op)
{
	ExtensionOwnerContext owner;
	bool		every_patient = config->kind == SOURCE_INSURANCE ||
		config->kind == SOURCE_PATIENT;

	become_extension_owner(&owner);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (config->kind == SOURCE_INSURANCE || op == OUTBOX_OP_INSERT)
	{
		Oid			relid = RelationGetRelid(rel);
		const char *patient = quote_identifier(get_attname(relid, config->patient_attnum, false));
		const char *key = quote_identifier(get_attname(relid, config->key_attnum, false));
		Oid			types[3] = {INT4OID, CHAROID, BOOLOID};
		Datum		values[3] = {Int32GetDatum(config->source_id), CharGetDatum(op),
		BoolGetDatum(every_patient)};
		char	   *sql;

		sql = psprintf("INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
					   " SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
					   "        patient, $1, $2, keys, pg_catalog.statement_timestamp()"
					   " FROM (SELECT %s AS patient, pg_catalog.array_agg(%s) AS keys"
					   "       FROM %s t WHERE t.%s IS NOT NULL AND t.%s IS NOT NULL"
					   "       GROUP BY 1) rows"
					   " WHERE $3"
					   "    OR EXISTS (SELECT 1 FROM portal_sync.enrollment e WHERE e.patient_id = rows.patient)"
					   "    OR EXISTS (SELECT 1 FROM portal_sync.outbox o"
					   "               WHERE o.op = 'e' AND o.patient_id = rows.patient)",
					   column_text_sql(relid, config->patient_attnum),
					   column_text_sql(relid, config->key_attnum),
					   quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												  RelationGetRelationName(rel)),
					   patient, key);
		if (SPI_execute_with_args(sql, 3, types, values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "recording the rows of a whole table failed");
		if (SPI_processed > 0)
			outbox_note_queued();
	}
	else if (resync_queued_lxid != MyProc->lxid ||
			 resync_queued_subxid != GetCurrentSubTransactionId())
	{
		(void) queue_resync(NULL, NULL);
		resync_queued_lxid = MyProc->lxid;
		resync_queued_subxid = GetCurrentSubTransactionId();
	}
	SPI_finish();
	restore_user(&owner);
}

/*
 * The rows of a partition of an attached table come (it was attached with
 * ATTACH PARTITION) or go (it is about to be dropped) all at once; see
 * capture_whole_table.  Nothing for a table that is not captured.
 */
void
capture_table_rows(Relation rel, bool removed)
{
	SourceConfig *config = source_config_lookup(RelationGetRelid(rel));

	if (config != NULL)
		capture_whole_table(config, rel, removed ? OUTBOX_OP_DELETE : OUTBOX_OP_INSERT);
}

/*
 * Set up the state of one run: the patient table, the outbox writer and,
 * for the enrolling kinds, enroll_when ready to evaluate.
 */
static void
begin_capture(CaptureState *state, SourceConfig *config, char op)
{
	HASHCTL		ctl;

	memset(state, 0, sizeof(CaptureState));
	state->config = config;
	state->op = op;
	state->statement_context = CurrentMemoryContext;
	state->row_context = AllocSetContextCreate(CurrentMemoryContext,
											   "portal_sync capture row",
											   ALLOCSET_SMALL_SIZES);

	ctl.keysize = sizeof(Datum);
	ctl.entrysize = sizeof(PatientEntry);
	ctl.hcxt = CurrentMemoryContext;
	if (config->patient_byval)
		state->patients = hash_create("portal_sync capture patients", 256, &ctl,
									  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	else
	{
		ctl.hash = patient_text_hash;
		ctl.match = patient_text_match;
		state->patients = hash_create("portal_sync capture patients", 256, &ctl,
									  HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	}

	if (source_kind_enrolls(config->kind) && op != OUTBOX_OP_DELETE &&
		config->enroll_when != NULL)
	{
		state->estate = CreateExecutorState();
		state->econtext = GetPerTupleExprContext(state->estate);
		state->enroll_when = ExecPrepareExpr(copyObject(config->enroll_when),
											 state->estate);
	}
}

/*
 * Write what is left and count the skipped rows.
 */
static void
end_capture(CaptureState *state)
{
	flush_all_pending_keys(state);
	if (state->writer != NULL)
		outbox_writer_close(state->writer);
	if (state->skipped_rows > 0)
	{
		outbox_count_skipped(state->config->source_id, state->skipped_rows);
		ereport(DEBUG1,
				(errmsg("portal_sync skipped %lld rows of source \"%s\" without a patient",
						(long long) state->skipped_rows, state->config->name)));
	}
	if (state->estate != NULL)
		FreeExecutorState(state->estate);
}

/*
 * portal_sync.capture() RETURNS trigger
 *
 * The AFTER ... FOR EACH STATEMENT trigger that attach() installs.
 */
Datum
portal_sync_capture(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	SourceConfig *config;
	MemoryContext oldcontext;
	CaptureState state;
	char		op;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event) ||
		(!TRIGGER_FIRED_AFTER(trigdata->tg_event) &&
		 !TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("portal_sync.capture() must be called as an AFTER ... FOR EACH STATEMENT trigger"),
				 errhint("Use portal_sync.attach() to attach a table.")));

	rel = trigdata->tg_relation;
	config = source_config_lookup(RelationGetRelid(rel));
	if (config == NULL)
	{
		/* Triggers without settings: restored from a dump, say. */
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("changes of \"%s\" are not sent to the portal: it has portal_sync's triggers but is not attached",
						RelationGetRelationName(rel)),
				 errhint("Run portal_sync.attach() for it again, or portal_sync.detach() to drop the triggers.")));
		return PointerGetDatum(NULL);
	}

	if (TRIGGER_FIRED_BY_TRUNCATE(trigdata->tg_event))
	{
		/*
		 * A partitioned table holds no rows itself: its TRUNCATE fires the
		 * trigger of each of its partitions too.
		 */
		if (rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE)
			capture_whole_table(config, rel, OUTBOX_OP_DELETE);
		return PointerGetDatum(NULL);
	}

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
		op = OUTBOX_OP_INSERT;
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		op = OUTBOX_OP_UPDATE;
	else
		op = OUTBOX_OP_DELETE;

	if (trigdata->tg_oldtable == NULL && trigdata->tg_newtable == NULL)
		return PointerGetDatum(NULL);

	/*
	 * One context for the whole backend, emptied after each statement: the
	 * EHR's single-row statements should not pay for creating one.
	 */
	if (capture_context == NULL)
		capture_context = AllocSetContextCreate(TopMemoryContext,
												"portal_sync capture",
												ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(capture_context);
	oldcontext = MemoryContextSwitchTo(capture_context);

	begin_capture(&state, config, op);
	capture_statement(&state, rel, trigdata->tg_oldtable, trigdata->tg_newtable);
	end_capture(&state);

	MemoryContextSwitchTo(oldcontext);
	MemoryContextReset(capture_context);

	return PointerGetDatum(NULL);
}
