/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The delivery worker of one database.
 *
 * The loop follows worker_spi: wait on the latch (set at commit by every
 * transaction that queued events, and by a periodic sweep), reset it,
 * handle interrupts and configuration reloads, then do one step of work.
 * A step either builds the next delivery unit (a short transaction), or
 * POSTs one batch of it (no transaction open) and records the answer (a
 * short transaction).  Failures of the portal are retried with
 * exponential backoff and jitter; only an event the portal rejects is
 * dead-lettered.  Any error ends the process; the launcher starts it again
 * a second later and everything resumes from the tables.
 *
 * Each step runs in a memory context that is reset after it, so that
 * nothing a step allocates for its own use (an error message, the
 * portal's answer, its "rejected" list) outlives it.  The unit being sent
 * lasts several steps and has a context of its own.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "seq_fence.h"
#include "shared_state.h"

/* How often an idle worker looks at the outbox without being woken. */
#define SWEEP_INTERVAL_MS			5000

/* How long to gather commits after a wakeup before sending. */
#define COMMIT_LINGER_US			2000

/* How long to wait when the head of the outbox must wait. */
#define BLOCKED_RETRY_MS			100

/* First delay after a failure; doubled per failure up to retry_max_delay. */
#define FIRST_RETRY_DELAY_MS		1000

/* Most bytes of the portal's answer kept as a dead letter's reason. */
#define MAX_REASON_BYTES			300

/* One POST of a unit: count events from first. */
typedef struct Batch
{
	int			first;
	int			count;
	char		batch_id[33];
	BatchBody	body;
} Batch;

/* What the worker is in the middle of. */
typedef struct DeliveryState
{
	DeliveryUnit *unit;
	int			cursor;			/* next event to put in a batch */
	List	   *split_stack;	/* of Batch *: halves still to send */
	Batch	   *batch;			/* being sent (or retried) */
	TimestampTz next_attempt_at;
	char	   *token;
	SharingSettings settings;
	double		resync_tokens;	/* snapshots resync_all may start now */
	TimestampTz resync_refilled_at;
	bool		resync_pending; /* the resync queue was not empty */
	TimestampTz resync_checked_at;
	TimestampTz housekeeping_at;
} DeliveryState;

static WorkerSlot *my_slot = NULL;
static pg_prng_state backoff_prng;

/* Memory of one step of work; reset after each step. */
static MemoryContext step_context = NULL;

/* The memory context of begin_work's caller, where end_work returns. */
static MemoryContext work_caller_context = NULL;

/*
 * This worker's slot.
 */
WorkerSlot *
my_worker_slot(void)
{
	return my_slot;
}

/*
 * Names of the states, as portal_sync.status shows them.
 */
const char *
worker_state_name(WorkerState state)
{
	switch (state)
	{
		case WORKER_RUNNING:
			return "running";
		case WORKER_IDLE:
			return "idle";
		case WORKER_BACKING_OFF:
			return "backing_off";
		case WORKER_DISABLED:
			return "disabled";
		case WORKER_UNCONFIGURED:
			return "unconfigured";
		case WORKER_NOT_RUNNING:
			break;
	}
	return "not_running";
}

/*
 * Publish the worker's state.
 */
static void
set_state(WorkerState state)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->state = state;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Publish a problem that keeps the worker from delivering.  The message
 * never holds clinical content or the token.
 */
static void
report_problem(WorkerState state, const char *message)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	if (strcmp(my_slot->last_error, message) != 0 || my_slot->state != state)
	{
		strlcpy(my_slot->last_error, message, WORKER_ERROR_LEN);
		my_slot->last_error_at = GetCurrentTimestamp();
	}
	my_slot->state = state;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Leave the slot when the process exits.
 */
static void
worker_detach(int code, Datum arg)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->latch = NULL;
	my_slot->pid = 0;
	my_slot->state = WORKER_NOT_RUNNING;
	/* a launcher that adopted this worker has no handle to be told by */
	if (portal_sync_shared->launcher_latch != NULL)
		SetLatch(portal_sync_shared->launcher_latch);
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Start a short transaction with SPI and a snapshot.
 */
static void
begin_work(const char *activity)
{
	work_caller_context = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * Commit the short transaction and report our statistics, so that
 * autovacuum sees the outbox churn.  The caller is back in the memory
 * context it called begin_work in (a commit leaves TopMemoryContext
 * current, where whatever the caller allocated next would never be freed).
 */
static void
end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(work_caller_context);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Exit quietly if the extension was dropped from this database.  The
 * caller is in a transaction.
 */
static void
exit_if_extension_dropped(void)
{
	if (OidIsValid(get_extension_oid("portal_sync", true)))
		return;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->extension_missing = true;
	LWLockRelease(portal_sync_shared->lock);
	if (IsTransactionState())
		AbortCurrentTransaction();
	proc_exit(0);
}

/*
 * Read the token from portal_sync.auth_token_file or auth_token.  Returns
 * false, with a problem reported, when the file cannot be read.
 */
static bool
load_token(DeliveryState *delivery)
{
	if (delivery->token != NULL)
	{
		explicit_bzero(delivery->token, strlen(delivery->token));
		pfree(delivery->token);
		delivery->token = NULL;
	}

	if (portal_sync_auth_token_file != NULL && portal_sync_auth_token_file[0] != '\0')
	{
		FILE	   *file = AllocateFile(portal_sync_auth_token_file, "r");
		char		buffer[4096];
		size_t		len;

		if (file == NULL)
		{
			report_problem(WORKER_UNCONFIGURED, "could not read portal_sync.auth_token_file");
			return false;
		}
		len = fread(buffer, 1, sizeof(buffer) - 1, file);
		FreeFile(file);
		buffer[len] = '\0';
		while (len > 0 && (buffer[len - 1] == '\n' || buffer[len - 1] == '\r' ||
						   buffer[len - 1] == ' ' || buffer[len - 1] == '\t'))
			buffer[--len] = '\0';
		delivery->token = MemoryContextStrdup(TopMemoryContext, buffer);
		explicit_bzero(buffer, sizeof(buffer));
	}
	else if (portal_sync_auth_token != NULL && portal_sync_auth_token[0] != '\0')
		delivery->token = MemoryContextStrdup(TopMemoryContext, portal_sync_auth_token);
	return true;
}

/*
 * Drop the current unit and everything about it.
 */
static void
forget_unit(DeliveryState *delivery)
{
	if (delivery->unit != NULL)
		MemoryContextDelete(delivery->unit->context);
	delivery->unit = NULL;
	delivery->batch = NULL;
	delivery->split_stack = NIL;
	delivery->cursor = 0;
}

/*
 * Move patients from the resync queue to the outbox as snapshot requests,
 * at most portal_sync.resync_rate per second (a token bucket), so that a
 * practice-wide resync leaves room for incremental updates.
 */
static void
promote_resyncs(DeliveryState *delivery)
{
	TimestampTz now = GetCurrentTimestamp();
	double		elapsed = (double) (now - delivery->resync_refilled_at) / USECS_PER_SEC;
	int			budget;
	Oid			types[1] = {INT4OID};
	Datum		values[1];

	/* a small bucket: the snapshots start evenly spread over each second */
	delivery->resync_tokens = Min(Max(1.0, portal_sync_resync_rate / 10.0),
								  delivery->resync_tokens + elapsed * portal_sync_resync_rate);
	delivery->resync_refilled_at = now;
	budget = (int) delivery->resync_tokens;
	if (budget < 1)
		return;

	/* An empty queue is looked at once a second. */
	if (!delivery->resync_pending && now < delivery->resync_checked_at)
		return;
	delivery->resync_checked_at = TimestampTzPlusMilliseconds(now, 1000);

	values[0] = Int32GetDatum(budget);
	begin_work("portal_sync: starting resync snapshots");
	exit_if_extension_dropped();
	seq_fence_claim(NULL);
	if (SPI_execute_with_args("WITH due AS ("
							  "  DELETE FROM portal_sync.resync_queue WHERE patient_id IN ("
							  "    SELECT patient_id FROM portal_sync.resync_queue"
							  "    ORDER BY requested_at, patient_id LIMIT $1 FOR UPDATE SKIP LOCKED)"
							  "  RETURNING patient_id),"
							  " resync AS ("
							  "  UPDATE portal_sync.enrollment e"
							  "  SET snapshot_seq = pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
							  "      snapshot_requested_at = pg_catalog.now()"
							  "  FROM due WHERE e.patient_id = due.patient_id"
							  "  RETURNING e.patient_id, e.snapshot_seq),"
							  " queued AS ("
							  "  INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
							  "  SELECT snapshot_seq, patient_id, NULL, 's', NULL, pg_catalog.now() FROM resync"
							  "  RETURNING 1)"
							  " SELECT (SELECT pg_catalog.count(*) FROM due),"
							  "        (SELECT pg_catalog.count(*) FROM portal_sync.resync_queue)",
							  1, types, values, NULL, false, 0) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		bool		isnull;
		int64		moved = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, 1, &isnull));
		int64		left = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
													   SPI_tuptable->tupdesc, 2, &isnull));

		delivery->resync_tokens -= moved;
		delivery->resync_pending = left > moved;
	}
	end_work();
}

/*
 * Once a minute: drop delivery_log rows older than log_retention, and fold
 * old skipped_row counts into one row per source.
 */
static void
housekeeping(DeliveryState *delivery)
{
	TimestampTz now = GetCurrentTimestamp();
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(portal_sync_log_retention)};

	if (now < delivery->housekeeping_at)
		return;
	delivery->housekeeping_at = TimestampTzPlusMilliseconds(now, 60 * 1000);

	begin_work("portal_sync: housekeeping");
	exit_if_extension_dropped();
	(void) SPI_execute_with_args("DELETE FROM portal_sync.delivery_log"
								 " WHERE sent_at < pg_catalog.now() - pg_catalog.make_interval(mins => $1)",
								 1, types, values, NULL, false, 0);
	(void) SPI_execute("WITH old AS ("
					   "  DELETE FROM portal_sync.skipped_row"
					   "  WHERE skipped_at < pg_catalog.now() - interval '1 minute'"
					   "  RETURNING source_id, skipped_at, row_count)"
					   " INSERT INTO portal_sync.skipped_row (source_id, skipped_at, row_count)"
					   " SELECT source_id, pg_catalog.max(skipped_at), pg_catalog.sum(row_count)"
					   " FROM old GROUP BY source_id",
					   false, 0);
	end_work();
}

/*
 * Build the next unit.  Returns false if there is nothing to send.
 */
static bool
start_next_unit(DeliveryState *delivery, bool *blocked)
{
	MemoryContext context;
	DeliveryUnit *unit;

	*blocked = false;

	/*
	 * The unit's context belongs to the step until the unit is built: an
	 * error while building it frees it with the step's memory.
	 */
	context = AllocSetContextCreate(CurrentMemoryContext, "portal_sync unit",
									ALLOCSET_DEFAULT_SIZES);

	begin_work("portal_sync: reading the outbox");
	exit_if_extension_dropped();
	{
		MemoryContext oldcontext = MemoryContextSwitchTo(context);

		read_sharing_settings(&delivery->settings);
		MemoryContextSwitchTo(oldcontext);
	}
	if (!delivery->settings.enabled)
	{
		end_work();
		MemoryContextDelete(context);
		report_problem(WORKER_DISABLED, "delivery is disabled in portal_sync.settings");
		return false;
	}
	unit = build_delivery_unit(&delivery->settings, portal_sync_batch_size, context);
	record_silent_consumption(unit);
	end_work();

	/* settings strings live in the unit's context, which outlives the step */
	MemoryContextSetParent(context, TopMemoryContext);
	delivery->unit = unit;
	delivery->cursor = 0;
	*blocked = unit->blocked;
	if (list_length(unit->events) == 0)
	{
		bool		more = unit->more_pending && !unit->blocked;

		forget_unit(delivery);
		return more;
	}
	return true;
}

/*
 * Cut the next batch from the unit: the top of the split stack, or the
 * events from the cursor up to batch_size and max_batch_bytes (a larger
 * single event goes alone).
 */
static Batch *
next_batch(DeliveryState *delivery)
{
	DeliveryUnit *unit = delivery->unit;
	Batch	   *batch;
	size_t		max_bytes = (size_t) portal_sync_max_batch_bytes * 1024;
	size_t		bytes = 128;
	uint8		random_id[16];

	if (delivery->split_stack != NIL)
	{
		batch = llast(delivery->split_stack);
		delivery->split_stack = list_delete_last(delivery->split_stack);
	}
	else
	{
		int			total = list_length(unit->events);

		if (delivery->cursor >= total)
			return NULL;
		batch = MemoryContextAllocZero(unit->context, sizeof(Batch));
		batch->first = delivery->cursor;
		while (delivery->cursor < total && batch->count < portal_sync_batch_size)
		{
			DeliveryEvent *event = list_nth(unit->events, delivery->cursor);

			if (batch->count > 0 && bytes + event->json_len + 1 > max_bytes)
				break;
			bytes += event->json_len + 1;
			batch->count++;
			delivery->cursor++;
		}
	}

	if (!pg_strong_random(random_id, sizeof(random_id)))
		elog(ERROR, "could not generate a batch id");
	hex_encode((char *) random_id, sizeof(random_id), batch->batch_id);
	batch->batch_id[32] = '\0';
	{
		MemoryContext oldcontext = MemoryContextSwitchTo(unit->context);

		batch_body_init(&batch->body, batch->batch_id, delivery->settings.practice_id,
						unit->events, batch->first, batch->count);
		MemoryContextSwitchTo(oldcontext);
	}
	return batch;
}

/*
 * Split a batch the portal refused as a whole into two halves, the first
 * to be sent first.  The split stack lives in the unit's context, like the
 * batches on it: it lasts as long as the unit, and goes with it.
 */
static void
split_batch(DeliveryState *delivery, Batch *batch)
{
	MemoryContext oldcontext = MemoryContextSwitchTo(delivery->unit->context);
	Batch	   *first = palloc0(sizeof(Batch));
	Batch	   *second = palloc0(sizeof(Batch));

	first->first = batch->first;
	first->count = batch->count / 2;
	second->first = batch->first + first->count;
	second->count = batch->count - first->count;
	delivery->split_stack = lappend(delivery->split_stack, second);
	delivery->split_stack = lappend(delivery->split_stack, first);
	MemoryContextSwitchTo(oldcontext);
}

/*
 * A reason for a dead letter from the portal's answer; never logged.
 */
static char *
answer_reason(HttpResult *result)
{
	if (result->body.len == 0)
		return psprintf("HTTP %d", result->status);
	return pnstrdup(result->body.data, Min(result->body.len, MAX_REASON_BYTES));
}

/*
 * Record the answer to a batch in a short transaction.
 */
static void
record_answer(DeliveryState *delivery, Batch *batch, TimestampTz sent_at,
			  int status, bool accepted)
{
	begin_work("portal_sync: recording a delivery");
	exit_if_extension_dropped();
	record_batch_result(delivery->unit, batch->first, batch->count, batch->batch_id,
						sent_at, status, accepted);
	end_work();

	if (delivery->unit->snapshot_accepted)
	{
		delivery->unit->snapshot_accepted = false;
		ConditionVariableBroadcast(&portal_sync_shared->ready_cv);
	}
}

/*
 * After a failed attempt: wait longer each time, with jitter, or as long
 * as the portal's Retry-After says.
 */
static void
back_off(DeliveryState *delivery, HttpResult *result, const char *error, bool auth)
{
	int			failures;
	int64		delay;
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	failures = ++my_slot->consecutive_failures;
	LWLockRelease(portal_sync_shared->lock);

	delay = FIRST_RETRY_DELAY_MS;
	for (int i = 1; i < failures && delay < portal_sync_retry_max_delay; i++)
		delay *= 2;
	delay = Min(delay, (int64) portal_sync_retry_max_delay);
	delay = delay / 2 + (int64) pg_prng_uint64_range(&backoff_prng, 0, (uint64) delay / 2);
	if (result->retry_after_ms >= 0)
		delay = result->retry_after_ms;

	delivery->next_attempt_at = TimestampTzPlusMilliseconds(now, delay);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	strlcpy(my_slot->last_error, error, WORKER_ERROR_LEN);
	my_slot->last_error_at = now;
	my_slot->next_attempt_at = delivery->next_attempt_at;
	my_slot->auth_failure = auth;
	my_slot->state = WORKER_BACKING_OFF;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * After an accepted batch.
 */
static void
note_success(int delivered)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->consecutive_failures = 0;
	my_slot->auth_failure = false;
	my_slot->next_attempt_at = 0;
	my_slot->delivered_total += delivered;
	my_slot->state = WORKER_RUNNING;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Mark the events of a 2xx answer's "rejected" list dead; returns how many
 * of the batch's events were accepted.
 */
static int
apply_rejected_list(DeliveryState *delivery, Batch *batch, HttpResult *result)
{
	List	   *rejected = parse_rejected_list(result->body.data, result->body.len);
	int			accepted = batch->count;
	ListCell   *lc;

	foreach(lc, rejected)
	{
		RejectedEvent *rejection = lfirst(lc);

		for (int i = batch->first; i < batch->first + batch->count; i++)
		{
			DeliveryEvent *event = list_nth(delivery->unit->events, i);

			if (!event->dead && strcmp(event->event_id, rejection->event_id) == 0)
			{
				event->dead = true;
				event->dead_status = result->status;
				event->dead_reason = MemoryContextStrdup(delivery->unit->context,
														 rejection->reason ? rejection->reason : "rejected");
				accepted--;
			}
		}
	}
	return accepted;
}

/*
 * POST the current batch and act on the answer.
 */
static void
send_batch(DeliveryState *delivery, const char *endpoint)
{
	Batch	   *batch = delivery->batch;
	HttpRequest request;
	HttpResult	result;
	TimestampTz sent_at = GetCurrentTimestamp();
	int			status;

	set_state(WORKER_RUNNING);
	request.endpoint = endpoint;
	request.token = delivery->token;
	request.ca_file = portal_sync_ca_file;
	request.timeout_ms = portal_sync_http_timeout;
	request.batch_id = batch->batch_id;
	request.body = &batch->body;

	pgstat_report_activity(STATE_RUNNING, "portal_sync: sending a batch");
	http_post(&request, &result);
	pgstat_report_activity(STATE_IDLE, NULL);
	CHECK_FOR_INTERRUPTS();
	status = result.status;

	if (status >= 200 && status < 300)
	{
		int			accepted = apply_rejected_list(delivery, batch, &result);

		record_answer(delivery, batch, sent_at, status, true);
		note_success(accepted);
		delivery->batch = NULL;
	}
	else if (status == 401 || status == 403)
	{
		record_answer(delivery, batch, sent_at, status, false);
		back_off(delivery, &result,
				 psprintf("authentication failed: the portal answered HTTP %d", status), true);
		/* the retry reads the rows again: they may have changed meanwhile */
		forget_unit(delivery);
	}
	else if (status == 0 || status == 408 || status == 425 || status == 429 ||
			 status >= 500 || status < 200 || (status >= 300 && status < 400))
	{
		char	   *error = status == 0
			? psprintf("request failed: %s", result.transport_error)
			: psprintf("the portal answered HTTP %d", status);

		record_answer(delivery, batch, sent_at, status, false);
		back_off(delivery, &result, error, false);
		/* the retry reads the rows again: they may have changed meanwhile */
		forget_unit(delivery);
	}
	else if (batch->count == 1)
	{
		DeliveryEvent *event = list_nth(delivery->unit->events, batch->first);

		event->dead = true;
		event->dead_status = status;
		event->dead_reason = MemoryContextStrdup(delivery->unit->context, answer_reason(&result));
		record_answer(delivery, batch, sent_at, status, false);
		note_success(0);
		delivery->batch = NULL;
	}
	else
	{
		/* 413 or another 4xx: find the event the portal refuses */
		record_answer(delivery, batch, sent_at, status, false);
		split_batch(delivery, batch);
		delivery->batch = NULL;
	}
	pfree(result.body.data);
}

/*
 * One step of work; returns how long to sleep before the next one.
 */
static long
delivery_step(DeliveryState *delivery)
{
	const char *reason;
	TimestampTz now = GetCurrentTimestamp();

	if (portal_sync_endpoint == NULL || portal_sync_endpoint[0] == '\0')
	{
		report_problem(WORKER_UNCONFIGURED, "portal_sync.endpoint is not set");
		return SWEEP_INTERVAL_MS;
	}
	if (!endpoint_is_allowed(portal_sync_endpoint, portal_sync_allow_insecure_http, &reason))
	{
		report_problem(WORKER_UNCONFIGURED, reason);
		return SWEEP_INTERVAL_MS;
	}

	if (delivery->next_attempt_at > now)
		return (long) ((delivery->next_attempt_at - now) / 1000) + 1;

	if (delivery->unit == NULL)
	{
		bool		blocked;

		housekeeping(delivery);
		promote_resyncs(delivery);
		if (!start_next_unit(delivery, &blocked))
		{
			LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
			if (my_slot->state != WORKER_DISABLED)
				my_slot->state = WORKER_IDLE;
			LWLockRelease(portal_sync_shared->lock);
			if (blocked || delivery->resync_pending)
				return BLOCKED_RETRY_MS;
			return SWEEP_INTERVAL_MS;
		}
		if (delivery->unit == NULL)
			return 0;
	}

	if (delivery->batch == NULL)
		delivery->batch = next_batch(delivery);
	if (delivery->batch == NULL)
	{
		bool		blocked = delivery->unit->blocked;

		forget_unit(delivery);
		return blocked ? BLOCKED_RETRY_MS : 0;
	}

	send_batch(delivery, portal_sync_endpoint);
	return 0;
}

/*
 * Error classes whose messages cannot quote a value of a row: a message
 * of any other class (a failed cast in a share_when rule, say) may carry
 * clinical content and is not logged.
 */
static bool
error_message_is_safe(int sqlerrcode)
{
	char		class0 = PGUNSIXBIT(sqlerrcode);
	char		class1 = PGUNSIXBIT(sqlerrcode >> 6);

	return (class0 == '4' && class1 == '2') ||	/* syntax, undefined objects */
		(class0 == '5' && (class1 == '3' || class1 == '5' || class1 == '7' ||
						   class1 == '8')) ||	/* resources, state, system */
		(class0 == '0' && class1 == '8') || /* connection */
		(class0 == '4' && class1 == '0');	/* serialization, deadlock */
}

/*
 * One step of work, surviving its errors: an error (a rule that fails on
 * some row, a lock timeout...) is reported in portal_sync.status and the
 * step is retried with backoff, instead of the process dying and being
 * restarted in a loop.  Interrupts still end the process.
 */
static long
guarded_delivery_step(DeliveryState *delivery)
{
	MemoryContext context = CurrentMemoryContext;
	volatile long sleep_ms = 0;

	PG_TRY();
	{
		sleep_ms = delivery_step(delivery);
	}
	PG_CATCH();
	{
		ErrorData  *error;
		char		message[WORKER_ERROR_LEN];
		HttpResult	no_answer;

		MemoryContextSwitchTo(context);
		error = CopyErrorData();
		FlushErrorState();
		if (IsTransactionState() || IsAbortedTransactionBlockState())
			AbortCurrentTransaction();
		/* an abort leaves TopMemoryContext current */
		MemoryContextSwitchTo(context);
		pgstat_report_activity(STATE_IDLE, NULL);

		if (error->sqlerrcode == ERRCODE_QUERY_CANCELED ||
			error->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN)
			ReThrowError(error);

		if (error_message_is_safe(error->sqlerrcode))
			snprintf(message, sizeof(message), "%s (SQLSTATE %s)",
					 error->message, unpack_sql_state(error->sqlerrcode));
		else
			snprintf(message, sizeof(message),
					 "reading the data to send failed with SQLSTATE %s (message withheld: it may quote clinical data)",
					 unpack_sql_state(error->sqlerrcode));
		ereport(LOG, (errmsg("portal_sync: %s", message)));
		FreeErrorData(error);

		forget_unit(delivery);
		memset(&no_answer, 0, sizeof(no_answer));
		no_answer.retry_after_ms = -1;
		back_off(delivery, &no_answer, message, false);
		sleep_ms = 0;
	}
	PG_END_TRY();
	return sleep_ms;
}

/*
 * Main function of a delivery worker.
 */
void
portal_sync_worker_main(Datum arg)
{
	int			slot_index = DatumGetInt32(arg);
	Oid			dboid;
	DeliveryState delivery;
	long		sleep_ms = 0;

	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	my_slot = &portal_sync_shared->slots[slot_index];

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * Every statement of the worker looks rows up by key or by patient.
	 * Tables the EHR just filled have no statistics yet, and a planner
	 * misled into sequential scans turns each batch into a full read.
	 * JIT compilation would cost more than these small statements run.
	 */
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * A delivery recorded by a commit lost in a crash is sent again, with
	 * the same event ids: the worker need not wait for its WAL flushes.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->pid = MyProcPid;
	my_slot->latch = MyLatch;
	my_slot->state = WORKER_IDLE;
	my_slot->consecutive_failures = 0;
	my_slot->next_attempt_at = 0;
	LWLockRelease(portal_sync_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	/* A database without the extension: say so and leave. */
	begin_work("portal_sync: starting");
	exit_if_extension_dropped();
	if (SPI_execute("SELECT COALESCE(pg_catalog.sum(events), 0)::int8"
					" FROM portal_sync.delivery_log WHERE accepted_at IS NOT NULL",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		Datum		total = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
		my_slot->delivered_total = isnull ? 0 : (uint64) DatumGetInt64(total);
		LWLockRelease(portal_sync_shared->lock);
	}
	end_work();

	pg_prng_seed(&backoff_prng, (uint64) MyProcPid ^ (uint64) GetCurrentTimestamp());
	memset(&delivery, 0, sizeof(delivery));
	forget_snapshot_horizons();
	http_init();
	(void) load_token(&delivery);
	step_context = AllocSetContextCreate(TopMemoryContext, "portal_sync step",
										 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		int			events = 0;

		if (sleep_ms > 0)
			events = WaitLatch(MyLatch,
							   WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							   sleep_ms,
							   PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);

		if (events & WL_LATCH_SET)
		{
			/* woken by a commit: resync_all() may have queued work */
			delivery.resync_checked_at = 0;

			/*
			 * Linger a moment so that the commits of the next milliseconds
			 * go in the same batch, instead of every commit costing the
			 * EHR's CPUs a wakeup of this process.
			 */
			pg_usleep(COMMIT_LINGER_US);
		}
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (!load_token(&delivery))
			{
				sleep_ms = SWEEP_INTERVAL_MS;
				continue;
			}
			/* a new endpoint or token deserves an attempt now */
			delivery.next_attempt_at = 0;
		}

		MemoryContextSwitchTo(step_context);
		sleep_ms = guarded_delivery_step(&delivery);
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(step_context);
	}
}
