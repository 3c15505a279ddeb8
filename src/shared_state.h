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
	WORKER_NEEDS_ADOPTION		/* a copy of another database: adopt() */
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

extern void shared_state_install_hooks(void);
extern WorkerSlot *worker_slot_for_database(Oid dboid);
extern void wake_worker_of_database(Oid dboid, bool always);
extern void wake_launcher(void);
extern void wake_launcher_for_database(Oid dboid);

/* database_hook.c */
extern void database_hook_install(void);
extern bool database_is_paused(Oid dboid);

/* launcher.c */
extern void register_launcher(void);
extern PGDLLEXPORT void portal_sync_launcher_main(Datum arg);

/* worker.c */
extern PGDLLEXPORT void portal_sync_worker_main(Datum arg);
extern const char *worker_state_name(WorkerState state);
extern WorkerSlot *my_worker_slot(void);

#endif							/* PORTAL_SYNC_SHARED_STATE_H */
