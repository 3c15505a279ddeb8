/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The delivery worker of one database.
 *
 * The loop follows worker_spi: wait on the latch (set at commit by every
 * transaction that queued events, and by a periodic sweep), reset it,
 * handle interrupts and configuration reloads, then do one step of work.
 * A step either builds the next delivery unit (a short transaction), or
 * POSTs a round of its batches (no transaction open) and records the
 * answers (short transactions).  The unit is split into lanes of whole
 * patients (lanes.c); a round sends the next batch of every lane at once,
 * up to portal_sync.max_inflight, so that the requests in flight are for
 * disjoint sets of patients.  Failures of the portal are retried with
 * exponential backoff and jitter; only an event the portal rejects is
 * dead-lettered.  Any error ends the process; the launcher starts it again
 * a second later and everything resumes from the tables.  When other
 * databases wait for a worker, the launcher asks this one to end its turn:
 * it leaves between two steps, and its database waits for the next turn
 * (launcher.c, database_registry.c).
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

#include <malloc.h>

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
#include "utils/syscache.h"
#include "storage/lmgr.h"
#include "access/xlog.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "shared_state.h"
#include "source_reader.h"
#include "string_map.h"
#include "worker_sources.h"

/* How often an idle worker looks at the outbox without being woken. */
#define SWEEP_INTERVAL_MS			5000

/* How long to gather commits after a wakeup before sending. */
#define COMMIT_LINGER_US			2000

/* How long to wait when the head of the outbox must wait. */
#define BLOCKED_RETRY_MS			20

/* First delay after a failure; doubled per failure up to retry_max_delay. */
#define FIRST_RETRY_DELAY_MS		1000

/*
 * Blocks at least this large are given back to the kernel when freed.
 * glibc raises its threshold for that after each large free, up to 32 MB,
 * so the copies of a 10 MB document would otherwise stay in the heap,
 * fragmented, and the worker's memory would not fall back after it.
 */
#define MALLOC_MMAP_THRESHOLD		(1024 * 1024)

/* Most bytes of the portal's answer kept as a dead letter's reason. */
#define MAX_REASON_BYTES			300

/*
 * Most events dead-lettered in a row, each alone and refused with the
 * same status, before the worker backs off instead of dead-lettering the
 * next one: a portal (or a proxy) that refuses everything with one status
 * dead-letters a few events per backoff, not the whole backlog.
 */
#define REFUSALS_BEFORE_BACKOFF		3

/* One POST of a unit: count events from first. */
typedef struct Batch
{
	int			first;
	int			count;
	char		batch_id[33];
	BatchBody	body;
} Batch;

/*
 * A lane of the unit: events [start, end), of whole patients, sent one
 * batch after the other.
 */
typedef struct Lane
{
	int			start;
	int			end;
	int			cursor;			/* next event to put in a batch */
	List	   *split_stack;	/* of Batch *: halves still to send */
	Batch	   *batch;			/* being sent (or sent again) */
	bool		failed;			/* its batch failed in this round: retried */
	bool		outcome_unknown;	/* ... and the portal may have applied it */
} Lane;

/*
 * A batch of the round failed in a way that is retried: once every answer
 * of the round is recorded, the worker backs off and builds the unit
 * again.
 */
typedef struct RoundFailure
{
	bool		failed;			/* some batch failed */
	int64		retry_after_ms; /* the longest Retry-After, -1: none */
	char	   *error;			/* of the first failure */
	bool		auth;			/* an authentication failure */
	bool		breaker;		/* the breaker tripped in this round */
} RoundFailure;

/* What the worker is in the middle of. */
typedef struct DeliveryState
{
	DeliveryUnit *unit;
	int			nlanes;
	Lane	   *lanes;			/* of the unit, in its context */
	RoundFailure failure;		/* of the round being answered */
	bool		probing;		/* one request at a time, until one is accepted */
	bool		unit_cut;		/* a round of the unit failed: only its
								 * unaccepted batches go again, then the unit
								 * is built afresh */
	TimestampTz next_attempt_at;
	int			held_rounds;	/* units in a row that found everything held */
	MemoryContext accepted_context; /* holds accepted_snapshot_events */
	HTAB	   *accepted_snapshot_events;	/* of the unit's open snapshots */
	TimestampTz settle_at;		/* next look at enrollment requests */
	bool		pass_progress;	/* this pass over the outbox sent or consumed */
	int			pass_held;		/* entries it held */
	bool		woken;			/* by a commit, since the last step */
	char	   *token;
	SharingSettings settings;
	double		resync_tokens;	/* snapshots resync_all may start now */
	TimestampTz resync_refilled_at;
	bool		resync_pending; /* the resync queue was not empty */
	TimestampTz resync_checked_at;
	TimestampTz housekeeping_at;
	int			refusals_in_row;	/* events dead-lettered alone in a row */
	int			refusal_status; /* ... each with this HTTP status */
	bool		gzip_refused;	/* the portal answered 415 to gzip, until reload */
} DeliveryState;

static WorkerSlot *my_slot = NULL;

/*
 * The portal's answers being acted upon (their bodies are malloc'd: no
 * memory context frees them), for the step's error handler to free.
 */
static HttpResult *answers_in_hand = NULL;
static int	answers_in_hand_count = 0;
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
		case WORKER_WAITING:
			return "waiting";
		case WORKER_BACKING_OFF:
			return "backing_off";
		case WORKER_DISABLED:
			return "disabled";
		case WORKER_UNCONFIGURED:
			return "unconfigured";
		case WORKER_NEEDS_ADOPTION:
			return "needs_adoption";
		case WORKER_WAITING_FOR_TURN:
			return "waiting_for_worker";
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

/* The extension instance this worker serves, and its outbox. */
static Oid	bound_extension = InvalidOid;
static Oid	bound_outbox = InvalidOid;

/*
 * Exit quietly unless the extension instance this worker started with is
 * still installed.  The caller is in a transaction, and about to touch the
 * extension's tables: the outbox is locked first, so the instance cannot
 * be dropped (nor replaced by a new one, whose seqs start again at 1)
 * before the transaction ends.  The first call binds the worker.
 */
static void
exit_if_extension_dropped(void)
{
	Oid			extension = get_extension_oid("portal_sync", true);

	if (OidIsValid(extension) && !OidIsValid(bound_extension))
	{
		bound_extension = extension;
		bound_outbox = portal_sync_relid("outbox");
	}
	if (OidIsValid(extension) && extension == bound_extension)
	{
		LockRelationOid(bound_outbox, RowExclusiveLock);
		/* dropped while we waited for the lock? */
		if (get_extension_oid("portal_sync", true) == bound_extension &&
			SearchSysCacheExists1(RELOID, ObjectIdGetDatum(bound_outbox)))
			return;
	}

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->extension_missing = true;
	LWLockRelease(portal_sync_shared->lock);
	registry_extension_missing(MyDatabaseId, GetCurrentTransactionStartTimestamp(),
							   OidIsValid(get_extension_oid("portal_sync", true)));
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
	delivery->lanes = NULL;
	delivery->nlanes = 0;
	delivery->unit_cut = false;
}

/*
 * A round failed in a way that is retried.  A request whose answer was
 * lost may still be applied by the portal, late, whenever: so every such
 * batch goes again first, exactly as it was (the same body, and so the
 * same batch_id: a late copy of it is then a duplicate of a batch the
 * portal accepted, never older content behind newer), until the portal
 * accepts it, and nothing else of the unit goes.  Then the unit is built
 * again from the rows as they are.  A batch the portal refused with an
 * answer, or that never reached it (connection refused), is not kept: the
 * unit built again sends the rows as they are then, withholding what is
 * no longer shareable.  Without a batch of unknown outcome, the unit is
 * dropped at once.  The halves of a split batch that were not sent yet
 * are dropped with the rest: the portal never saw them.
 */
static void
keep_batches_of_unknown_outcome(DeliveryState *delivery)
{
	bool		kept = false;

	for (int l = 0; l < delivery->nlanes; l++)
	{
		Lane	   *lane = &delivery->lanes[l];

		lane->end = lane->cursor;
		lane->split_stack = NIL;
		if (lane->failed && (lane->outcome_unknown || delivery->unit_cut))
		{
			lane->outcome_unknown = true;
			kept = true;
		}
		else if (lane->batch != NULL && lane->outcome_unknown)
			kept = true;		/* not sent in this round (probing) */
		else
			lane->batch = NULL;
		lane->failed = false;
	}
	if (kept)
		delivery->unit_cut = true;
	else
		forget_unit(delivery);
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
	if (SPI_execute_with_args("WITH due AS ("
							  "  DELETE FROM portal_sync.resync_queue WHERE patient_id IN ("
							  "    SELECT patient_id FROM portal_sync.resync_queue"
							  "    ORDER BY requested_at, patient_id LIMIT $1 FOR UPDATE SKIP LOCKED)"
							  "  RETURNING patient_id),"
							  " queued AS ("
							  "  INSERT INTO portal_sync.outbox (seq, patient_id, source_id, op, keys, captured_at)"
							  "  SELECT pg_catalog.nextval('portal_sync.outbox_seq'::pg_catalog.regclass),"
							  "         e.patient_id, NULL, 's', NULL, pg_catalog.now()"
							  "  FROM portal_sync.enrollment e JOIN due ON due.patient_id = e.patient_id"
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

/* What building a unit came to. */
typedef enum UnitOutcome
{
	UNIT_TO_SEND,				/* events to send */
	UNIT_READ_ON,				/* nothing to send here; read on at once */
	UNIT_HELD,					/* everything pending is held back */
	UNIT_NOTHING,				/* nothing pending */
	UNIT_DISABLED				/* delivery disabled in the settings */
} UnitOutcome;

/*
 * Publish what holds events back, for portal_sync.status and explain().
 */
static void
publish_hold_reason(DeliveryUnit *unit)
{
	char		reason[WORKER_ERROR_LEN];

	snapshot_waits_describe(reason, sizeof(reason));
	if (reason[0] == '\0' && unit->held > 0)
		strlcpy(reason, "C-CDA documents wait until their patient's snapshot is accepted by the portal",
				sizeof(reason));
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	strlcpy(my_slot->hold_reason, reason, WORKER_ERROR_LEN);
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Settle the enrollment requests ('e' entries) that have no enrollment row
 * yet, also while delivery cannot run (no endpoint, disabled): the
 * patients are enrolled from then on, and resync_all() covers them.  The
 * worker is the only writer of new enrollment rows: nobody waits.  Their
 * snapshots are served by the units, with the waits of snapshot_wait.c.
 */
static void
settle_enrollment_requests(DeliveryState *delivery, bool woken)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!woken && now < delivery->settle_at)
		return;
	delivery->settle_at = TimestampTzPlusMilliseconds(now, 1000);

	begin_work("portal_sync: settling enrollments");
	exit_if_extension_dropped();
	if (spi_query("INSERT INTO portal_sync.enrollment AS e"
					" (patient_id, enrolled_at, enrolled_by, snapshot_seq, snapshot_requested_at)"
					" SELECT DISTINCT ON (r.patient_id) r.patient_id, r.captured_at,"
					"        COALESCE(r.keys[1], 'unknown'), r.seq, r.captured_at"
					" FROM portal_sync.outbox r"
					" WHERE r.op = 'e' AND NOT EXISTS (SELECT 1 FROM portal_sync.enrollment x"
					"                                 WHERE x.patient_id = r.patient_id)"
					" ORDER BY r.patient_id, r.seq"
					" ON CONFLICT (patient_id) DO NOTHING", 0, NULL, NULL, NULL, false) != SPI_OK_INSERT)
		elog(ERROR, "settling enrollment requests failed");
	end_work();
}

/*
 * Split the unit just built into lanes of whole patients, at most one per
 * request that may be in flight.
 */
static void
split_into_lanes(DeliveryState *delivery)
{
	DeliveryUnit *unit = delivery->unit;
	int		   *starts = palloc((portal_sync_max_inflight + 1) * sizeof(int));

	delivery->nlanes = split_unit_into_lanes(unit, portal_sync_max_inflight,
											 starts);
	delivery->lanes = MemoryContextAllocZero(unit->context,
											 Max(delivery->nlanes, 1) * sizeof(Lane));
	for (int l = 0; l < delivery->nlanes; l++)
	{
		delivery->lanes[l].start = starts[l];
		delivery->lanes[l].end = starts[l + 1];
		delivery->lanes[l].cursor = starts[l];
	}
	pfree(starts);
}

/*
 * Build the next unit.
 */
static UnitOutcome
start_next_unit(DeliveryState *delivery)
{
	MemoryContext context;
	DeliveryUnit *unit;
	UnitOutcome outcome;
	XLogRecPtr	seqs_logged_upto;

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
	if (strcmp(delivery->settings.database_identity, database_identity()) != 0)
	{
		end_work();
		MemoryContextDelete(context);
		report_problem(WORKER_NEEDS_ADOPTION,
					   "this database is a copy of the one its portal_sync stream belongs to"
					   " (CREATE DATABASE ... TEMPLATE, or a restore): it captures but does not"
					   " deliver until a superuser calls portal_sync.adopt()");
		return UNIT_DISABLED;
	}
	if (!delivery->settings.enabled)
	{
		end_work();
		MemoryContextDelete(context);
		report_problem(WORKER_DISABLED, "delivery is disabled in portal_sync.settings");
		return UNIT_DISABLED;
	}
	/* a batch for each request that may be in flight */
	unit = build_delivery_unit(&delivery->settings,
							   portal_sync_batch_size * portal_sync_max_inflight,
							   (size_t) portal_sync_max_batch_bytes * 1024, context,
							   delivery->accepted_snapshot_events);
	record_silent_consumption(unit);
	/* the end of this transaction's last WAL record: the seqs taken */
	seqs_logged_upto = XactLastRecEnd;
	end_work();

	/* settings strings live in the unit's context, which outlives the step */
	MemoryContextSetParent(context, TopMemoryContext);
	delivery->unit = unit;
	split_into_lanes(delivery);
	publish_hold_reason(unit);
	if (list_length(unit->events) > 0)
	{
		/*
		 * The seqs just taken must survive a crash before the portal sees
		 * them (the worker commits asynchronously): a seq taken again after
		 * a crash would go backwards.  Up to the end of the last record this
		 * transaction wrote, and at least up to the start of the last one
		 * this process wrote (its commit), which covers the records of
		 * transactions that aborted after taking seqs.  Not to the insert
		 * position: at the start of a page not yet written it is past what
		 * can be flushed, and XLogFlush fails there.
		 */
		XLogFlush(Max(seqs_logged_upto, ProcLastRecPtr));
		delivery->pass_progress = true;
		return UNIT_TO_SEND;
	}

	/*
	 * A pass reads the outbox from its start to its end, unit by unit.
	 * Only a whole pass that sent and consumed nothing means there is
	 * nothing to do now: then everything pending is held, or nothing is.
	 */
	if (unit->from_start)
	{
		delivery->pass_progress = false;
		delivery->pass_held = 0;
	}
	delivery->pass_progress |= unit->silent > 0;
	delivery->pass_held += unit->held;
	if (!unit->wrapped || delivery->pass_progress)
		outcome = UNIT_READ_ON;	/* read on, or start a new pass */
	else if (delivery->pass_held > 0)
		outcome = UNIT_HELD;
	else
		outcome = UNIT_NOTHING;
	unit_finished(unit);
	forget_unit(delivery);
	return outcome;
}

/*
 * Cut the next batch of a lane: the top of its split stack, or its events
 * from the cursor up to batch_size and max_batch_bytes (a larger single
 * event goes alone).  NULL when the lane is done.
 */
static Batch *
next_batch(DeliveryState *delivery, Lane *lane)
{
	DeliveryUnit *unit = delivery->unit;
	Batch	   *batch;
	size_t		max_bytes = (size_t) portal_sync_max_batch_bytes * 1024;
	size_t		bytes = 128;

	if (lane->split_stack != NIL)
	{
		batch = llast(lane->split_stack);
		lane->split_stack = list_delete_last(lane->split_stack);
	}
	else
	{
		if (lane->cursor >= lane->end)
			return NULL;
		batch = MemoryContextAllocZero(unit->context, sizeof(Batch));
		batch->first = lane->cursor;
		while (lane->cursor < lane->end && batch->count < portal_sync_batch_size)
		{
			DeliveryEvent *event = list_nth(unit->events, lane->cursor);

			if (batch->count > 0 && bytes + event->json_len + 1 > max_bytes)
				break;
			bytes += event->json_len + 1;
			batch->count++;
			lane->cursor++;
		}
	}

	/* the same body, and only the same body, has the same id */
	batch_identity(delivery->settings.practice_id, unit->events, batch->first,
				   batch->count, batch->batch_id);
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
split_batch(DeliveryState *delivery, Lane *lane, Batch *batch)
{
	MemoryContext oldcontext = MemoryContextSwitchTo(delivery->unit->context);
	Batch	   *first = palloc0(sizeof(Batch));
	Batch	   *second = palloc0(sizeof(Batch));

	first->first = batch->first;
	first->count = batch->count / 2;
	second->first = batch->first + first->count;
	second->count = batch->count - first->count;
	lane->split_stack = lappend(lane->split_stack, second);
	lane->split_stack = lappend(lane->split_stack, first);
	MemoryContextSwitchTo(oldcontext);
}

/*
 * A reason for a dead letter from the portal's answer; never logged.
 */
static char *
answer_reason(HttpResult *result)
{
	if (result->body.len == 0 || result->body.incomplete)
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
 * After a failed attempt: wait longer each time, with jitter, and at least
 * as long as the portal's Retry-After says (retry_after_ms, -1: none), but
 * never longer than retry_max_delay.
 */
static void
back_off(DeliveryState *delivery, int64 retry_after_ms, const char *error, bool auth)
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
	if (retry_after_ms > delay)
		delay = Min(retry_after_ms, (int64) portal_sync_retry_max_delay);

	delivery->next_attempt_at = TimestampTzPlusMilliseconds(now, delay);
	/* a portal that fails gets one request at a time until it works again */
	delivery->probing = true;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	strlcpy(my_slot->last_error, error, WORKER_ERROR_LEN);
	my_slot->last_error_at = now;
	my_slot->next_attempt_at = delivery->next_attempt_at;
	my_slot->auth_failure = auth;
	my_slot->state = WORKER_BACKING_OFF;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * After an accepted batch: count what it delivered.
 */
static void
note_delivered(int delivered)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->delivered_total += delivered;
	my_slot->state = WORKER_RUNNING;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * After a round in which some batch was accepted and none failed: the
 * portal works again.  (A failure in the same round, in another lane,
 * keeps the backoff growing.)
 */
static void
note_success(void)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->consecutive_failures = 0;
	my_slot->auth_failure = false;
	my_slot->next_attempt_at = 0;
	my_slot->state = WORKER_RUNNING;
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Remember the events of snapshots the portal accepted in this batch, for
 * a unit built again after a later batch fails: the portal holds those
 * snapshots open and need not get their accepted events again.  Before a
 * batch goes out, its snapshot items are noted as sent ("sent|" + id):
 * the portal may have applied them, answer or not (see finish_events);
 * so are items sent after their snapshot's end ("moved|": they stay there
 * in every later build of the unit), and purges ("purge|" + patient): a
 * lost answer may hide an applied one.
 */
static void
note_snapshot_events(DeliveryState *delivery, Batch *batch, bool accepted)
{
	MemoryContext oldcontext;

	if (delivery->accepted_context == NULL)
		delivery->accepted_context = AllocSetContextCreate(TopMemoryContext,
														   "portal_sync accepted snapshot events",
														   ALLOCSET_SMALL_SIZES);
	oldcontext = MemoryContextSwitchTo(delivery->accepted_context);
	if (delivery->accepted_snapshot_events == NULL)
		delivery->accepted_snapshot_events =
			string_map_create("portal_sync accepted snapshot events", sizeof(char *),
							  delivery->accepted_context);
	for (int i = batch->first; i < batch->first + batch->count; i++)
	{
		DeliveryEvent *event = list_nth(delivery->unit->events, i);
		char	   *id = NULL;
		bool		found;

		if (event->dead)
			continue;
		if (!accepted)
		{
			if (event->op == EVENT_UPSERT && event->shares_seq)
				id = psprintf("sent|%s", event->event_id);
			else if (event->op == EVENT_UPSERT && event->follows_snapshot > 0)
				id = moved_item_id(event, event->follows_snapshot);
			/* the portal may apply a purge whose answer is lost */
			else if (event->op == EVENT_PURGE)
				id = psprintf("purge|%s", event->patient_id);
		}
		else if (event->op == EVENT_SNAPSHOT_BEGIN)
			id = psprintf("%s|" INT64_FORMAT, event->patient_id, event->seq);
		else if (event->op == EVENT_UPSERT && event->shares_seq)
			id = pstrdup(event->event_id);
		if (accepted && (event->op == EVENT_SNAPSHOT_BEGIN || event->op == EVENT_PURGE))
		{
			/* the portal's state of the patient is known again */
			char	   *purge_id = psprintf("purge|%s", event->patient_id);

			string_map_remove(delivery->accepted_snapshot_events, purge_id);
			pfree(purge_id);
		}
		if (id != NULL)
			(void) string_map_enter(delivery->accepted_snapshot_events, id, &found);
	}
	MemoryContextSwitchTo(oldcontext);
}

/*
 * The unit is done: no snapshot of it is open at the portal any more.
 * Purges whose answer was lost are remembered on ("purge|" + patient):
 * the unit built for the retry may not have reached the patient, and the
 * patient's next events, in whichever unit, must be a snapshot.  They are
 * forgotten when a purge or a snapshot of the patient is accepted.
 */
static void
forget_accepted_snapshot_events(DeliveryState *delivery)
{
	List	   *purges = NIL;
	ListCell   *lc;

	if (delivery->accepted_snapshot_events != NULL)
	{
		HASH_SEQ_STATUS status;
		char	  **entry;

		hash_seq_init(&status, delivery->accepted_snapshot_events);
		while ((entry = hash_seq_search(&status)) != NULL)
			if (strncmp(*entry, "purge|", 6) == 0)
				purges = lappend(purges, pstrdup(*entry));
	}
	if (delivery->accepted_context != NULL)
		MemoryContextDelete(delivery->accepted_context);
	delivery->accepted_context = NULL;
	delivery->accepted_snapshot_events = NULL;
	if (purges == NIL)
		return;

	delivery->accepted_context = AllocSetContextCreate(TopMemoryContext,
													   "portal_sync accepted snapshot events",
													   ALLOCSET_SMALL_SIZES);
	delivery->accepted_snapshot_events =
		string_map_create("portal_sync accepted snapshot events", sizeof(char *),
						  delivery->accepted_context);
	foreach(lc, purges)
	{
		bool		found;

		(void) string_map_enter(delivery->accepted_snapshot_events,
								MemoryContextStrdup(delivery->accepted_context, lfirst(lc)),
								&found);
	}
	list_free_deep(purges);
}

/*
 * Mark the events of a 2xx answer's "rejected" list dead; returns how many
 * of the batch's events were accepted.
 */
static int
apply_rejected_list(DeliveryState *delivery, Batch *batch, HttpResult *result,
					List *rejected)
{
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
 * A batch was not accepted, and nothing of it is dead-lettered: record
 * the answer, and have the round end in a backoff, after which the batch
 * goes again as it was if the portal may have it
 * (keep_batches_of_unknown_outcome).
 */
static void
retry_batch_later(DeliveryState *delivery, Lane *lane, const HttpResult *result,
				  TimestampTz sent_at, const char *error, bool auth)
{
	RoundFailure *failure = &delivery->failure;
	int			status = result->status;
	int64		retry_after_ms = result->retry_after_ms;

	record_answer(delivery, lane->batch, sent_at, status, false);
	lane->failed = true;

	/*
	 * A portal that answered anything but 2xx did not take the batch; one
	 * that did not answer after getting (some of) it, or whose 2xx answer
	 * could not be read, may have applied it, and may still apply it.
	 */
	if ((status == 0 && result->request_sent) || (status >= 200 && status < 300))
		lane->outcome_unknown = true;
	if (!failure->failed)
	{
		failure->failed = true;
		failure->error = pstrdup(error);
		failure->auth = auth;
	}
	failure->retry_after_ms = Max(failure->retry_after_ms, retry_after_ms);
}

/*
 * The portal answered 415 to a compressed body: it gets plain JSON from
 * now on, until the next reload (or change of the database's settings),
 * and the DBA can see why.  The batch is sent again at once, with the same
 * batch_id: its JSON is the same.
 */
static void
stop_compressing(DeliveryState *delivery)
{
	delivery->gzip_refused = true;
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	strlcpy(my_slot->last_error,
			"the portal answered HTTP 415 to a gzip-compressed body: sending uncompressed bodies"
			" until the next configuration reload or ALTER DATABASE ... SET"
			" (set portal_sync.compression = off to keep it so)",
			WORKER_ERROR_LEN);
	my_slot->last_error_at = GetCurrentTimestamp();
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Free the bodies of the answers being acted upon.
 */
static void
free_answers_in_hand(void)
{
	for (int i = 0; i < answers_in_hand_count; i++)
		http_result_free(&answers_in_hand[i]);
	answers_in_hand = NULL;
	answers_in_hand_count = 0;
}

/*
 * Act on the portal's answer to one batch of a lane.  Returns whether the
 * batch was accepted.
 */
static bool
act_on_answer(DeliveryState *delivery, Lane *lane, const HttpRequest *request,
			  HttpResult *result, TimestampTz sent_at)
{
	Batch	   *batch = lane->batch;
	int			status = result->status;
	List	   *rejected = NIL;
	bool		accepted = false;

	if (status >= 200 && status < 300 &&
		!result->body.incomplete &&
		parse_answer_body(result->body.data, result->body.len, &rejected))
	{
		int			delivered = apply_rejected_list(delivery, batch, result, rejected);

		record_answer(delivery, batch, sent_at, status, true);
		note_delivered(delivered);
		note_snapshot_events(delivery, batch, true);
		delivery->refusals_in_row = 0;
		lane->batch = NULL;
		accepted = true;
	}
	else if (status == 415 && request->gzip)
	{
		/* the lane sends the same batch again, uncompressed */
		record_answer(delivery, batch, sent_at, status, false);
		stop_compressing(delivery);
	}
	else if (status >= 200 && status < 300)
		retry_batch_later(delivery, lane, result, sent_at,
						  psprintf("the portal answered HTTP %d with a body that %s: not accepted",
								   status, result->body.incomplete
								   ? "could not be read whole" : "is not a JSON object"),
						  false);
	else if (status == 401 || status == 403)
		retry_batch_later(delivery, lane, result, sent_at,
						  psprintf("authentication failed: the portal answered HTTP %d", status),
						  true);
	else if ((status >= 300 && status < 400) || status == 404 || status == 405 ||
			 status == 410 || status == 415)
		retry_batch_later(delivery, lane, result, sent_at,
						  psprintf("the endpoint looks misconfigured: the portal answered HTTP %d%s; check portal_sync.endpoint",
								   status, status < 400 ? " (redirects are not followed)" : ""),
						  false);
	else if (status == 0 || status == 408 || status == 425 || status == 429 ||
			 status >= 500 || status < 200)
		retry_batch_later(delivery, lane, result, sent_at,
						  status == 0
						  ? psprintf("request failed: %s", result->transport_error)
						  : psprintf("the portal answered HTTP %d", status),
						  false);
	else if (batch->count == 1 &&
			 ((delivery->refusals_in_row >= REFUSALS_BEFORE_BACKOFF &&
			   delivery->refusal_status == status) || delivery->failure.breaker))
	{
		/*
		 * The breaker: the portal refuses everything, not this event.  The
		 * other lanes of the round dead-letter nothing more either.
		 */
		delivery->refusals_in_row = 0;
		delivery->failure.breaker = true;
		retry_batch_later(delivery, lane, result, sent_at,
						  psprintf("the portal refused %d events in a row, each alone, with HTTP %d: backing off before dead-lettering more",
								   REFUSALS_BEFORE_BACKOFF, status),
						  false);
	}
	else if (batch->count == 1)
	{
		DeliveryEvent *event = list_nth(delivery->unit->events, batch->first);

		event->dead = true;
		event->dead_status = status;
		event->dead_reason = MemoryContextStrdup(delivery->unit->context, answer_reason(result));
		record_answer(delivery, batch, sent_at, status, false);
		/* not a success: the breaker's backoff keeps growing */
		set_state(WORKER_RUNNING);
		if (delivery->refusal_status != status)
			delivery->refusals_in_row = 0;
		delivery->refusal_status = status;
		delivery->refusals_in_row++;
		lane->batch = NULL;
	}
	else
	{
		/* 413 or another 4xx: find the event the portal refuses */
		record_answer(delivery, batch, sent_at, status, false);
		split_batch(delivery, lane, batch);
		lane->batch = NULL;
	}
	return accepted;
}

/*
 * POST the next batch of every lane that has one, all at once, and act on
 * the answers once every one is in: no transaction is open while any
 * request is in flight.  While probing (at start, and after a failure)
 * only the first lane's batch goes: a portal that is down gets one
 * request per attempt, not max_inflight.  Returns false when every lane
 * is done.
 */
static bool
send_round(DeliveryState *delivery, const char *endpoint)
{
	HttpRequest *requests = palloc0(delivery->nlanes * sizeof(HttpRequest));
	HttpResult *results = palloc0(delivery->nlanes * sizeof(HttpResult));
	Lane	  **lanes = palloc(delivery->nlanes * sizeof(Lane *));
	int			n = 0;
	bool		any_accepted = false;
	TimestampTz sent_at;

	for (int l = 0; l < delivery->nlanes; l++)
	{
		Lane	   *lane = &delivery->lanes[l];
		HttpRequest *request = &requests[n];

		if (lane->batch == NULL)
			lane->batch = next_batch(delivery, lane);
		if (lane->batch == NULL)
			continue;
		request->endpoint = endpoint;
		request->token = delivery->token;
		request->ca_file = portal_sync_ca_file;
		request->timeout_ms = portal_sync_http_timeout;
		request->batch_id = lane->batch->batch_id;
		request->body = &lane->batch->body;
		request->gzip = portal_sync_compression == PORTAL_SYNC_COMPRESSION_GZIP &&
			!delivery->gzip_refused;
		note_snapshot_events(delivery, lane->batch, false);
		lanes[n++] = lane;
		if (delivery->probing)
			break;
	}
	if (n == 0)
		return false;

	set_state(WORKER_RUNNING);
	pgstat_report_activity(STATE_RUNNING, n == 1 ? "portal_sync: sending a batch"
						   : "portal_sync: sending batches");
	sent_at = GetCurrentTimestamp();
	http_post_all(requests, results, n);
	answers_in_hand = results;
	answers_in_hand_count = n;
	pgstat_report_activity(STATE_IDLE, NULL);
	CHECK_FOR_INTERRUPTS();

	memset(&delivery->failure, 0, sizeof(delivery->failure));
	delivery->failure.retry_after_ms = -1;
	for (int i = 0; i < n; i++)
		any_accepted |= act_on_answer(delivery, lanes[i], &requests[i], &results[i], sent_at);
	free_answers_in_hand();

	if (delivery->failure.failed)
	{
		back_off(delivery, delivery->failure.retry_after_ms, delivery->failure.error,
				 delivery->failure.auth);
		keep_batches_of_unknown_outcome(delivery);
	}
	else if (any_accepted)
	{
		delivery->probing = false;
		note_success();
	}
	return true;
}

/*
 * Has delivery been paused (portal_sync.settings.enabled) while the batches
 * of a failed round wait to go again?  They wait on, unsent, meanwhile.
 */
static bool
delivery_paused(DeliveryState *delivery)
{
	bool		enabled = true;

	begin_work("portal_sync: reading the settings");
	exit_if_extension_dropped();
	if (spi_query("SELECT enabled FROM portal_sync.settings", 0, NULL, NULL, NULL, true) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		bool		isnull;
		Datum		value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		enabled = isnull || DatumGetBool(value);
	}
	end_work();
	if (!enabled)
		report_problem(WORKER_DISABLED, "delivery is disabled in portal_sync.settings");
	return !enabled;
}

/*
 * One step of work; returns how long to sleep before the next one.
 */
static long
delivery_step(DeliveryState *delivery)
{
	const char *reason;
	TimestampTz now = GetCurrentTimestamp();

	settle_enrollment_requests(delivery, delivery->woken);
	delivery->woken = false;

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
		housekeeping(delivery);
		promote_resyncs(delivery);
		switch (start_next_unit(delivery))
		{
			case UNIT_TO_SEND:
				delivery->held_rounds = 0;
				break;
			case UNIT_READ_ON:
				return 0;
			case UNIT_HELD:
				/* woken at every commit; else look again, less often */
				set_state(WORKER_WAITING);
				delivery->held_rounds = Min(delivery->held_rounds + 1, 6);
				return BLOCKED_RETRY_MS << (delivery->held_rounds - 1);
			case UNIT_NOTHING:
				delivery->held_rounds = 0;
				set_state(WORKER_IDLE);
				return delivery->resync_pending ? BLOCKED_RETRY_MS : SWEEP_INTERVAL_MS;
			case UNIT_DISABLED:
				return SWEEP_INTERVAL_MS;
		}
	}

	if (delivery->unit_cut && delivery_paused(delivery))
		return SWEEP_INTERVAL_MS;

	if (!send_round(delivery, portal_sync_endpoint))
	{
		if (delivery->unit_cut)
		{
			/*
			 * The batches sent again were answered; the rest of the unit is
			 * built again, and its snapshots may be open at the portal.
			 */
			forget_unit(delivery);
			return 0;
		}
		/* every batch of the unit was answered */
		unit_finished(delivery->unit);
		forget_unit(delivery);
		forget_accepted_snapshot_events(delivery);
	}
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

		MemoryContextSwitchTo(context);
		error = CopyErrorData();
		FlushErrorState();
		/* what went wrong may be in the statements: generate them afresh */
		worker_sources_forget();
		if (IsTransactionState() || IsAbortedTransactionBlockState())
			AbortCurrentTransaction();
		/* an abort leaves TopMemoryContext current */
		MemoryContextSwitchTo(context);
		pgstat_report_activity(STATE_IDLE, NULL);
		free_answers_in_hand();

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
		back_off(delivery, -1, message, false);
		sleep_ms = 0;
	}
	PG_END_TRY();
	return sleep_ms;
}

/*
 * Between two steps (no request in flight, no transaction open): end this
 * worker's turn if the launcher asks, because other databases wait for a
 * worker (launcher.c).  A unit half sent is finished first, but not one
 * that waits, backing off, to send batches of unknown outcome again: the
 * portal may be down for long, and other databases must get their turn.
 * Those batches are then built again at the next turn, as after a
 * restart (docs/wire-protocol.md, Retries).
 */
static void
end_turn_if_asked(DeliveryState *delivery, uint64 wakes_seen)
{
	bool		asked;

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	asked = my_slot->yield_requested;
	LWLockRelease(portal_sync_shared->lock);
	if (!asked || (delivery->unit != NULL && !delivery->unit_cut))
		return;
	registry_end_turn(my_slot, my_slot->state != WORKER_IDLE,
					  delivery->next_attempt_at, wakes_seen);
	proc_exit(0);
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
	/* a fixed threshold: large rows' memory goes back when they are sent */
	mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* before the database's settings apply: see database_settings.c */
	database_settings_inherit();
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

	/*
	 * Settings a DBA gives the database (ALTER DATABASE … SET) are meant
	 * for the EHR's sessions and apply here too.  The worker writes in
	 * every step, waits for nobody but the transactions it must, and its
	 * unit reads need a new snapshot per statement (read committed): each
	 * of these would otherwise stop it or make it restart in a loop.
	 */
	SetConfigOption("default_transaction_read_only", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("default_transaction_deferrable", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("statement_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("lock_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("idle_in_transaction_session_timeout", "0", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The rows' data is written exactly, whatever the database's defaults:
	 * every float digit, intervals in the default style (dates in JSON
	 * are ISO in every style; keys and ids go through value_text()).
	 */
	SetConfigOption("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("IntervalStyle", "postgres", PGC_USERSET, PGC_S_SESSION);

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	my_slot->pid = MyProcPid;
	my_slot->latch = MyLatch;
	my_slot->state = WORKER_IDLE;
	my_slot->consecutive_failures = 0;
	my_slot->next_attempt_at = 0;
	LWLockRelease(portal_sync_shared->lock);
	before_shmem_exit(worker_detach, (Datum) 0);

	/*
	 * A command that needs the database without connections (DROP
	 * DATABASE...) may have begun while this worker started, before its
	 * pid could be signalled: step aside, the launcher starts it again.
	 */
	if (database_is_paused(MyDatabaseId))
		proc_exit(0);

	/* A database without the extension: say so and leave. */
	begin_work("portal_sync: starting");
	exit_if_extension_dropped();
	registry_confirm(MyDatabaseId);
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
	/* the first request finds out whether the portal works */
	delivery.probing = true;
	http_init();
	/* the database's own endpoint, token file, CA and compression */
	(void) database_settings_apply();
	(void) load_token(&delivery);
	step_context = AllocSetContextCreate(TopMemoryContext, "portal_sync step",
										 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		int			events = 0;
		uint64		wakes_seen;

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
			delivery.woken = true;

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

			/*
			 * Also sent by the commit of an ALTER DATABASE … SET: the
			 * database's settings are read again.  A new portal is probed
			 * like the first one.
			 */
			if (database_settings_apply())
				delivery.probing = true;
			if (!load_token(&delivery))
			{
				sleep_ms = SWEEP_INTERVAL_MS;
				continue;
			}
			/* a new endpoint or token deserves an attempt now */
			delivery.next_attempt_at = 0;
			/* and a portal that refused gzip, another chance */
			delivery.gzip_refused = false;
		}

		wakes_seen = pg_atomic_read_u64(&my_slot->wakes);
		MemoryContextSwitchTo(step_context);
		sleep_ms = guarded_delivery_step(&delivery);
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(step_context);
		end_turn_if_asked(&delivery, wakes_seen);
	}
}
