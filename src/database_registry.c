/*-------------------------------------------------------------------------
 *
 * database_registry.c
 *		Which databases have portal_sync, and which of them wait for a
 *		turn of a delivery worker.
 *
 * The launcher is connected to no database and cannot read another
 * database's catalogs, so it learns where the extension is from the
 * registry, an array in shared memory:
 *
 * - CREATE EXTENSION registers its database when it commits (the
 *   extension script calls portal_sync.start_worker());
 * - CREATE DATABASE ... TEMPLATE registers the copy of a registered
 *   database (pg_restore into a new database runs CREATE EXTENSION);
 * - every commit that queued events registers its database, and puts it
 *   in the queue for a turn when no worker serves it;
 * - a worker that finds no extension takes its database out; the
 *   launcher takes out the databases that no longer exist.
 *
 * The registry is written to $PGDATA/portal_sync.databases (through a
 * temporary file and durable_rename) whenever it changes, and read back
 * by the launcher after a restart or a crash.  The file says on which
 * timeline it was written: after a promotion or a restore of a base
 * backup, databases created since on the old primary may be missing from
 * it, so every database it does not list becomes a candidate, which a
 * worker looks at when a slot is free, one at a time.  The same happens
 * when there is no file (the first start).
 *
 * A database that is in the registry but has no worker and has pending
 * work waits for a turn: the launcher gives free slots to the databases
 * that have waited longest, and asks workers to end their turns (see
 * launcher.c).  What a worker that ended its turn last showed (backing
 * off, unconfigured, ...) stays here for portal_sync.status.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "access/xlog.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "portal_sync.h"
#include "shared_state.h"

#define REGISTRY_FILE		"portal_sync.databases"
#define REGISTRY_TEMP_FILE	"portal_sync.databases.tmp"
#define REGISTRY_MAGIC		0x50534442	/* "PSDB" */
#define REGISTRY_VERSION	1

/*
 * How long a database whose worker ended its turn unable to deliver
 * (unconfigured, disabled, a copy) waits before a worker looks again.
 */
#define PARKED_RECHECK_MS	(30 * 1000)

/* Header of the registry file. */
typedef struct RegistryFileHeader
{
	uint32		magic;
	uint32		version;
	TimeLineID	timeline;
	int32		count;
} RegistryFileHeader;

/* One database in the registry file. */
typedef struct RegistryFileEntry
{
	Oid			dboid;
	int32		knowledge;
} RegistryFileEntry;

DatabaseRegistry *database_registry = NULL;

/*
 * Size of the registry in shared memory.
 */
Size
database_registry_shmem_size(void)
{
	return sizeof(DatabaseRegistry);
}

/*
 * Set up the registry on first attach; the caller holds
 * AddinShmemInitLock.  It is empty until the launcher reads its file.
 */
void
database_registry_shmem_init(void)
{
	bool		found;

	database_registry = ShmemInitStruct("portal_sync databases",
										database_registry_shmem_size(), &found);
	if (!found)
		memset(database_registry, 0, database_registry_shmem_size());
}

/*
 * The entry of a database, or NULL.  The caller holds the lock.
 */
RegisteredDatabase *
registry_lookup(Oid dboid)
{
	for (int i = 0; i < MAX_REGISTERED_DATABASES; i++)
	{
		RegisteredDatabase *entry = &database_registry->entries[i];

		if (entry->knowledge != DATABASE_FREE_ENTRY && entry->dboid == dboid)
			return entry;
	}
	return NULL;
}

/*
 * Register a database (or update what is known of it); NULL if the
 * registry is full, which is logged once.  The caller holds the lock
 * exclusively.
 */
RegisteredDatabase *
registry_enter(Oid dboid, DatabaseKnowledge knowledge)
{
	RegisteredDatabase *entry = registry_lookup(dboid);

	for (int i = 0; entry == NULL && i < MAX_REGISTERED_DATABASES; i++)
	{
		if (database_registry->entries[i].knowledge == DATABASE_FREE_ENTRY)
		{
			entry = &database_registry->entries[i];
			memset(entry, 0, sizeof(*entry));
			entry->dboid = dboid;
			entry->parked_state = WORKER_NOT_RUNNING;
		}
	}
	if (entry == NULL)
	{
		if (!database_registry->full_warned)
			ereport(LOG,
					(errmsg("portal_sync: more than %d databases have the extension; database %u is not served",
							MAX_REGISTERED_DATABASES, dboid)));
		database_registry->full_warned = true;
		return NULL;
	}
	if (entry->knowledge != knowledge)
		database_registry->dirty = true;
	/* a candidate that a worker found the extension in stays found */
	if (!(knowledge == DATABASE_CANDIDATE && entry->knowledge == DATABASE_HAS_EXTENSION))
		entry->knowledge = knowledge;
	entry->registered_at = GetCurrentTimestamp();
	return entry;
}

/*
 * Take a database out of the registry.  The caller holds the lock
 * exclusively.
 */
void
registry_forget_locked(Oid dboid)
{
	RegisteredDatabase *entry = registry_lookup(dboid);

	if (entry != NULL)
	{
		entry->knowledge = DATABASE_FREE_ENTRY;
		entry->dboid = InvalidOid;
		database_registry->dirty = true;
	}
}

/*
 * Put a registered database in the queue for a turn (if it is not in it
 * already); "always" also forgets a parked state and its wait, because
 * the settings changed.  The caller holds the lock exclusively and wakes
 * the launcher.
 */
static void
queue_for_turn(RegisteredDatabase *entry, bool always)
{
	if (!entry->work_pending)
	{
		entry->work_pending = true;
		entry->pending_since = GetCurrentTimestamp();
	}
	if (always)
	{
		entry->not_before = 0;
		entry->parked_state = WORKER_NOT_RUNNING;
	}
}

/*
 * Wake the launcher; the caller holds the lock.
 */
static void
wake_launcher_locked(void)
{
	if (portal_sync_shared->launcher_latch != NULL)
		SetLatch(portal_sync_shared->launcher_latch);
}

/*
 * CREATE EXTENSION committed in a database: it has the extension, and its
 * worker starts now.
 */
void
registry_note_extension(Oid dboid)
{
	RegisteredDatabase *entry;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	entry = registry_enter(dboid, DATABASE_HAS_EXTENSION);
	if (entry != NULL)
		queue_for_turn(entry, true);
	portal_sync_shared->requested_database = dboid;
	wake_launcher_locked();
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * CREATE DATABASE committed: the copy of a database with the extension
 * has it too, and must soon say that it needs adoption.  Before the
 * registry is trusted, any copy is a candidate; after, a copy of a
 * database the registry does not know has no extension (an entry of an
 * earlier database with the same oid goes).
 */
void
registry_note_copy(Oid template_oid, Oid dboid)
{
	RegisteredDatabase *template_entry;
	RegisteredDatabase *entry = NULL;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	template_entry = registry_lookup(template_oid);
	if (template_entry != NULL)
		entry = registry_enter(dboid, template_entry->knowledge);
	else if (!database_registry->trusted)
		entry = registry_enter(dboid, DATABASE_CANDIDATE);
	else
		registry_forget_locked(dboid);
	if (entry != NULL)
		queue_for_turn(entry, true);
	wake_launcher_locked();
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * A transaction that queued events committed in a database that no
 * worker serves: the database has the extension, and waits for a turn.
 * The caller holds the lock exclusively.
 */
void
registry_note_work_locked(Oid dboid, bool always)
{
	RegisteredDatabase *entry = registry_lookup(dboid);

	if (entry == NULL || entry->knowledge != DATABASE_HAS_EXTENSION)
		entry = registry_enter(dboid, DATABASE_HAS_EXTENSION);
	if (entry == NULL)
		return;
	/* the launcher needs to hear of it once, not at every commit */
	if (!entry->work_pending || always)
	{
		queue_for_turn(entry, always);
		wake_launcher_locked();
	}
}

/*
 * A worker found the extension in its database: a candidate is one no
 * longer, and the state of an earlier turn is the new worker's to show.
 */
void
registry_confirm(Oid dboid)
{
	RegisteredDatabase *entry;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	entry = registry_lookup(dboid);
	if (entry == NULL || entry->knowledge != DATABASE_HAS_EXTENSION)
		entry = registry_enter(dboid, DATABASE_HAS_EXTENSION);
	if (entry != NULL)
	{
		entry->work_pending = false;
		entry->waiting_for_turn = false;
		entry->parked_state = WORKER_NOT_RUNNING;
		entry->parked_error[0] = '\0';
	}
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * A worker found that the extension instance it serves is gone, in a
 * transaction that started at seen_at.  If another instance replaced it,
 * the database gets a new worker (one turn now); if none is installed,
 * the database leaves the registry, unless it was registered since (a
 * CREATE EXTENSION that committed after the worker looked).
 */
void
registry_extension_missing(Oid dboid, TimestampTz seen_at, bool replaced)
{
	RegisteredDatabase *entry;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	entry = registry_lookup(dboid);
	if (entry != NULL && replaced)
		queue_for_turn(entry, true);
	else if (entry != NULL && entry->registered_at < seen_at)
		registry_forget_locked(dboid);
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * A worker ends its turn because other databases wait.  Its database goes
 * to the back of the queue if it still has work (or a commit woke it
 * since its last step began: wakes_seen), not before its next attempt if
 * it was backing off.  A worker that could not deliver at all
 * (unconfigured, disabled, a copy) is looked at again after a while, or
 * when the settings change.  What it showed stays for status.  After
 * this, commits put the database in the queue instead of waking the
 * worker.
 */
void
registry_end_turn(WorkerSlot *slot, bool has_work, TimestampTz next_attempt_at,
				  uint64 wakes_seen)
{
	RegisteredDatabase *entry;
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	slot->leaving = true;
	slot->latch = NULL;
	if (pg_atomic_read_u64(&slot->wakes) != wakes_seen)
		has_work = true;
	entry = registry_lookup(slot->dboid);
	if (entry != NULL)
	{
		entry->last_turn_end = now;
		entry->parked_state = WORKER_NOT_RUNNING;
		entry->parked_error[0] = '\0';
		entry->not_before = 0;
		switch (slot->state)
		{
			case WORKER_UNCONFIGURED:
			case WORKER_DISABLED:
			case WORKER_NEEDS_ADOPTION:
				has_work = true;
				entry->not_before = TimestampTzPlusMilliseconds(now, PARKED_RECHECK_MS);
				/* FALLTHROUGH */
			case WORKER_BACKING_OFF:
				entry->parked_state = slot->state;
				entry->parked_error_at = slot->last_error_at;
				strlcpy(entry->parked_error, slot->last_error, WORKER_ERROR_LEN);
				if (slot->state == WORKER_BACKING_OFF)
					entry->not_before = next_attempt_at;
				break;
			default:
				break;
		}
		entry->work_pending = false;
		if (has_work)
		{
			entry->work_pending = true;
			entry->pending_since = now;
		}
	}
	wake_launcher_locked();
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Read the registry file into shared memory; called by the launcher when
 * it starts.  Every database it lists may have work queued while no
 * worker ran: each is queued for a turn.  A missing file, or one written
 * on another timeline, leaves the registry untrusted (see the header).
 */
void
registry_load(void)
{
	RegistryFileHeader header;
	RegistryFileEntry file_entry;
	FILE	   *file;
	bool		trusted = false;

	LWLockAcquire(portal_sync_shared->lock, LW_SHARED);
	if (database_registry->loaded)
	{
		LWLockRelease(portal_sync_shared->lock);
		return;
	}
	LWLockRelease(portal_sync_shared->lock);

	file = AllocateFile(REGISTRY_FILE, PG_BINARY_R);
	if (file == NULL && errno != ENOENT)
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("portal_sync: could not read file \"%s\": %m", REGISTRY_FILE),
				 errhint("Every database is looked at again, one at a time.")));

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	if (file != NULL &&
		fread(&header, sizeof(header), 1, file) == 1 &&
		header.magic == REGISTRY_MAGIC && header.version == REGISTRY_VERSION)
	{
		trusted = header.timeline == GetWALInsertionTimeLine();
		for (int i = 0; i < header.count &&
			 fread(&file_entry, sizeof(file_entry), 1, file) == 1; i++)
		{
			RegisteredDatabase *entry;

			if (file_entry.knowledge != DATABASE_HAS_EXTENSION &&
				file_entry.knowledge != DATABASE_CANDIDATE)
				continue;
			entry = registry_enter(file_entry.dboid, (DatabaseKnowledge) file_entry.knowledge);
			if (entry != NULL)
			{
				/* not "registered now": a worker that finds nothing may drop it */
				entry->registered_at = 0;
				queue_for_turn(entry, false);
			}
		}
	}
	database_registry->trusted = trusted;
	database_registry->loaded = true;
	database_registry->dirty = !trusted;
	LWLockRelease(portal_sync_shared->lock);
	if (file != NULL)
		FreeFile(file);
}

/*
 * The launcher has read pg_database, in a transaction that started at
 * scanned_at: entries of databases that no longer exist go (not those
 * registered since: a CREATE DATABASE that committed during the scan);
 * before the registry is trusted, every database that accepts connections
 * and is not listed becomes a candidate, and from now on the registry is
 * trusted.
 */
void
registry_scan_done(TimestampTz scanned_at, const Oid *existing, int nexisting,
				   const Oid *servable, int nservable)
{
	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < MAX_REGISTERED_DATABASES; i++)
	{
		RegisteredDatabase *entry = &database_registry->entries[i];
		bool		exists = false;

		if (entry->knowledge == DATABASE_FREE_ENTRY || entry->registered_at >= scanned_at)
			continue;
		for (int j = 0; j < nexisting && !exists; j++)
			exists = existing[j] == entry->dboid;
		if (!exists)
			registry_forget_locked(entry->dboid);
	}
	if (!database_registry->trusted)
	{
		for (int j = 0; j < nservable; j++)
		{
			RegisteredDatabase *entry;

			if (registry_lookup(servable[j]) != NULL)
				continue;
			entry = registry_enter(servable[j], DATABASE_CANDIDATE);
			if (entry != NULL)
			{
				entry->registered_at = 0;
				queue_for_turn(entry, false);
			}
		}
		database_registry->trusted = true;
		database_registry->dirty = true;
	}
	LWLockRelease(portal_sync_shared->lock);
}

/*
 * Write the registry to its file if it changed, durably: a temporary file,
 * fsync, durable_rename.  On failure the registry stays dirty, and the
 * launcher tries again at its next pass.
 */
void
registry_save_if_dirty(void)
{
	RegistryFileHeader header;
	RegistryFileEntry *entries;
	int			count = 0;
	int			fd;
	bool		ok;

	LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
	if (!database_registry->dirty || !database_registry->trusted)
	{
		LWLockRelease(portal_sync_shared->lock);
		return;
	}
	entries = palloc(MAX_REGISTERED_DATABASES * sizeof(RegistryFileEntry));
	for (int i = 0; i < MAX_REGISTERED_DATABASES; i++)
	{
		RegisteredDatabase *entry = &database_registry->entries[i];

		if (entry->knowledge == DATABASE_FREE_ENTRY)
			continue;
		entries[count].dboid = entry->dboid;
		entries[count].knowledge = (int32) entry->knowledge;
		count++;
	}
	database_registry->dirty = false;
	LWLockRelease(portal_sync_shared->lock);

	header.magic = REGISTRY_MAGIC;
	header.version = REGISTRY_VERSION;
	header.timeline = GetWALInsertionTimeLine();
	header.count = count;

	fd = OpenTransientFile(REGISTRY_TEMP_FILE, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY);
	ok = fd >= 0;
	if (ok)
	{
		size_t		size = count * sizeof(RegistryFileEntry);

		errno = 0;
		ok = write(fd, &header, sizeof(header)) == sizeof(header) &&
			(size == 0 || write(fd, entries, size) == (ssize_t) size);
		if (ok)
			ok = pg_fsync(fd) == 0;
		if (CloseTransientFile(fd) != 0)
			ok = false;
	}
	if (ok)
		ok = durable_rename(REGISTRY_TEMP_FILE, REGISTRY_FILE, LOG) == 0;
	else
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("portal_sync: could not write file \"%s\": %m", REGISTRY_TEMP_FILE)));
	pfree(entries);

	if (!ok)
	{
		LWLockAcquire(portal_sync_shared->lock, LW_EXCLUSIVE);
		database_registry->dirty = true;
		LWLockRelease(portal_sync_shared->lock);
	}
}
