/*-------------------------------------------------------------------------
 *
 * shared_state.h
 *		Shared memory layout of portal_sync.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_SHARED_STATE_H
#define PORTAL_SYNC_SHARED_STATE_H

#include "postgres.h"

#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/timestamp.h"

/* What a delivery worker is doing, as portal_sync.status shows it. */
typedef enum WorkerState
{
	WORKER_NOT_RUNNING = 0,
	WORKER_RUNNING,				/* sending */
	WORKER_IDLE,				/* nothing to send */
	WORKER_WAITING,				/* events pending, all held back (hold_reason) */
	WORKER_BACKING_OFF,			/* waiting to retry after a failure */
	WORKER_DISABLED,			/* settings.enabled is false */
	WORKER_UNCONFIGURED,		/* no usable endpoint */
	WORKER_NEEDS_ADOPTION,		/* a copy of another database: adopt() */
	WORKER_WAITING_FOR_TURN		/* no worker: other databases have them */
} WorkerState;

#define WORKER_ERROR_LEN 256

/* One delivery worker, serving one database. */
typedef struct WorkerSlot
{
	/* Owned by the launcher (under the lock) */
	bool		in_use;
	Oid			dboid;

	/* Owned by the worker (under the lock) */
	pid_t		pid;
	Latch	   *latch;
	bool		extension_missing;	/* exited: extension not installed */
	WorkerState state;
	uint64		delivered_total;
	int			consecutive_failures;
	bool		auth_failure;
	TimestampTz last_error_at;
	TimestampTz next_attempt_at;
	char		last_error[WORKER_ERROR_LEN];
	char		hold_reason[WORKER_ERROR_LEN];	/* what holds events back */

	/* Turns (database_registry.c) */
	TimestampTz turn_started_at;	/* set by the launcher */
	bool		yield_requested;	/* the launcher: end your turn */
	bool		leaving;		/* the worker: my turn has ended */
	pg_atomic_uint64 wakes;		/* commit-time wakes, counted */
} WorkerSlot;

/*
 * A database whose worker must stay away while a command that needs it
 * without connections runs (DROP DATABASE ...): set by the backend running
 * the command, cleared when the command ends.
 */
typedef struct DatabasePause
{
	Oid			dboid;			/* InvalidOid: entry free */
	pid_t		commanding_pid; /* the backend running the command */
	TimestampTz until;			/* safety limit */
} DatabasePause;

#define MAX_DATABASE_PAUSES 8

typedef struct PortalSyncShared
{
	LWLock	   *lock;
	int			max_workers;
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	Oid			requested_database; /* start its worker now */
	/* wait_ready() sleeps here; broadcast when any snapshot is accepted */
	ConditionVariable ready_cv;
	DatabasePause pauses[MAX_DATABASE_PAUSES];
	WorkerSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} PortalSyncShared;

extern PortalSyncShared *portal_sync_shared;

/*
 * What the registry knows of a database that may have the extension
 * (database_registry.c).  A database that is not in the registry has no
 * portal_sync, once the registry is trusted.
 */
typedef enum DatabaseKnowledge
{
	DATABASE_FREE_ENTRY = 0,
	DATABASE_HAS_EXTENSION,		/* a worker found it, or it was created */
	DATABASE_CANDIDATE			/* unknown: a worker must look, one at a time */
} DatabaseKnowledge;

/* One database of the registry. */
typedef struct RegisteredDatabase
{
	Oid			dboid;
	DatabaseKnowledge knowledge;
	TimestampTz registered_at;	/* when knowledge was last set */
	bool		work_pending;	/* events may wait, and no worker serves it */
	TimestampTz pending_since;	/* its place in the queue for a turn */
	TimestampTz not_before;		/* no turn before (backoff, parked) */
	bool		waiting_for_turn;	/* the launcher found no slot for it */
	TimestampTz last_turn_end;
	/* what status shows while no worker serves it */
	WorkerState parked_state;
	TimestampTz parked_error_at;
	char		parked_error[WORKER_ERROR_LEN];
} RegisteredDatabase;

#define MAX_REGISTERED_DATABASES 1024

/* The registry, in shared memory, under portal_sync_shared->lock. */
typedef struct DatabaseRegistry
{
	bool		loaded;			/* read from its file by the launcher */
	bool		trusted;		/* absence means "no extension" */
	bool		dirty;			/* to be written to its file */
	int			waiting;		/* databases with work and no slot */
	bool		full_warned;
	RegisteredDatabase entries[MAX_REGISTERED_DATABASES];
} DatabaseRegistry;

extern DatabaseRegistry *database_registry;

extern void shared_state_install_hooks(void);
extern WorkerSlot *worker_slot_for_database(Oid dboid);
extern void wake_worker_of_database(Oid dboid, bool always);
extern void wake_launcher_for_database(Oid dboid);

/* database_registry.c */
extern Size database_registry_shmem_size(void);
extern void database_registry_shmem_init(void);
extern RegisteredDatabase *registry_lookup(Oid dboid);
extern RegisteredDatabase *registry_enter(Oid dboid, DatabaseKnowledge knowledge);
extern void registry_forget_locked(Oid dboid);
extern void registry_note_extension(Oid dboid);
extern void registry_note_copy(Oid template_oid, Oid dboid);
extern void registry_note_work_locked(Oid dboid, bool always);
extern void registry_confirm(Oid dboid);
extern void registry_extension_missing(Oid dboid, TimestampTz seen_at, bool replaced);
extern void registry_end_turn(WorkerSlot *slot, bool has_work, TimestampTz next_attempt_at,
							  uint64 wakes_seen);
extern void registry_load(void);
extern void registry_scan_done(TimestampTz scanned_at, const Oid *existing, int nexisting,
							  const Oid *servable, int nservable);
extern void registry_save_if_dirty(void);

/* database_hook.c */
extern bool database_is_paused(Oid dboid);

/* launcher.c */
extern void register_launcher(void);
extern PGDLLEXPORT void portal_sync_launcher_main(Datum arg);

/* worker.c */
extern PGDLLEXPORT void portal_sync_worker_main(Datum arg);
extern const char *worker_state_name(WorkerState state);
extern WorkerSlot *my_worker_slot(void);

#endif							/* PORTAL_SYNC_SHARED_STATE_H */
