/*-------------------------------------------------------------------------
 *
 * delivery.h
 *		Data structures of the delivery worker.
 *
 * The worker turns a stretch of the outbox into a delivery unit: the
 * events to send, in order, each knowing which outbox entries it consumes
 * once the portal accepts it.  The unit is then sent in batches, each at
 * most portal_sync.batch_size events and portal_sync.max_batch_bytes.
 * Wire seqs are taken when the unit is built, so a patient's events are
 * in seq order by construction; event ids are derived from what is sent
 * (event_identity.c).
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_DELIVERY_H
#define PORTAL_SYNC_DELIVERY_H

#include "postgres.h"

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/snapshot.h"
#include "utils/timestamp.h"

#include "portal_sync.h"

typedef enum EventOp
{
	EVENT_UPSERT,
	EVENT_DELETE,
	EVENT_SNAPSHOT_BEGIN,
	EVENT_SNAPSHOT_END,
	EVENT_PURGE
} EventOp;

extern const char *const event_op_names[];

/* One row of portal_sync.outbox, as read by the worker. */
typedef struct OutboxEntry
{
	int64		seq;
	char	   *patient_id;
	int32		source_id;		/* 0 for a snapshot request */
	char		op;
	int			nkeys;
	char	  **keys;
	char	   *captured_at;	/* ISO 8601, UTC */
	char	   *enrolled_by;	/* enrollment requests: the initiating event */
	bool	   *key_consumed;	/* per key: accepted or dead-lettered */
	int			nunserved;		/* keys left for a later unit (bytes) */
	char	  **unserved_keys;	/* ... owed whatever this unit consumes */
	bool		consumed;		/* the whole entry */
	bool		changed;		/* consumption not yet written back */
} OutboxEntry;

/* Where an event's acceptance is recorded. */
typedef struct Consumption
{
	int			entry;			/* index in DeliveryUnit.entries */
	int			key_index;		/* -1: the whole entry */
} Consumption;

/* One event of the wire protocol. */
typedef struct DeliveryEvent
{
	char	   *event_id;
	int64		seq;
	char	   *patient_id;
	int32		source_id;
	char	   *source_name;	/* NULL for markers */
	const char *kind_name;		/* NULL for markers */
	char	   *key;			/* NULL for markers */
	EventOp		op;
	int64		change_seq;		/* latest outbox entry this event reports */
	const char *captured_at;	/* of that entry */
	bool		shares_seq;		/* takes the seq of the event before it */
	int64		preset_seq;		/* snapshot begin: its seq, kept from an earlier attempt */
	bool		items_follow;	/* snapshot end: some of its items are sent after it */
	int64		follows_snapshot;	/* an item sent after that snapshot's end */
	int64		ends_enrollment;	/* purge: seq of the unenroll() request it serves, or 0 */
	int			reuse_group;	/* 1 + index of the failed batch it is sent again
								 * from, keeping its seq; 0: none */
	int64		reused_seq;		/* ... that seq */
	char	   *json;			/* the serialized event, without its data */
	size_t		json_len;		/* length on the wire, data included */
	const char *data_json;		/* the row as to_json() wrote it, or NULL */
	size_t		data_len;
	List	   *consumes;		/* of Consumption * */
	bool		dead;			/* rejected by the portal */
	int			dead_status;	/* HTTP status of the rejection */
	char	   *dead_reason;
} DeliveryEvent;

typedef struct DeliveryUnit
{
	MemoryContext context;
	int			nentries;
	OutboxEntry *entries;
	List	   *events;			/* of DeliveryEvent *, in sending order */
	int			held;			/* entries (or keys) that must wait */
	int			silent;			/* entries consumed without an event */
	bool		wrapped;		/* read to the end of the outbox */
	int64		next_cursor;	/* where the next unit reads from */
	bool		from_start;		/* read from the beginning of the outbox */
	int			nreused;		/* failed batches sent again as they were */
	int		   *reused_counts;	/* ... the events of each (0: not again) */
	bool		snapshot_accepted;	/* a snapshot_end was accepted */
	bool		has_retractions;	/* some source is being retracted */
} DeliveryUnit;

/*
 * What a batch sent that was not accepted (the portal may yet apply it):
 * if the unit built for the retry holds exactly the same events as the
 * first events of their patients, they keep their seqs and go in one
 * batch again, so that the portal gets the very same body (and so the
 * same batch_id), and a late copy of the old request can never put a
 * patient's seqs out of order.
 */
typedef struct FailedBatch
{
	int			count;
	char		practice_id[NAMEDATALEN * 2];
	char	  **patient_ids;
	char	  **event_ids;
	int64	   *seqs;
} FailedBatch;

/* The practice's settings, read at every unit. */
typedef struct SharingSettings
{
	char	   *practice_id;
	bool		enabled;
	bool		has_cutoff;
	char	   *date_cutoff;	/* text form, for SQL parameters */
	int32		max_privacy_level;
	char	   *install_id;
	char	   *database_identity;	/* the database the stream belongs to */
} SharingSettings;

/*
 * The body of one POST, produced piece by piece as libcurl reads it: the
 * envelope, then each event (its data spliced in), so that a batch holding
 * a C-CDA document of megabytes is never copied whole.
 */
typedef struct BatchBody
{
	char	   *prefix;			/* {"batch_id":..,"practice_id":..,"events":[ */
	List	   *events;
	int			first;
	int			count;
	size_t		total_len;
	/* read position */
	int			part;			/* -1 prefix, 0..count-1 events, count suffix */
	int			piece;			/* within an event: head, data, closing brace */
	size_t		offset;
} BatchBody;

/* HTTP */
typedef struct HttpRequest
{
	const char *endpoint;
	const char *token;
	const char *ca_file;
	int			timeout_ms;
	const char *batch_id;
	BatchBody  *body;
	bool		gzip;			/* send the body gzip-compressed */
} HttpRequest;

/*
 * The body of the portal's answer.  Kept in malloc'd memory: it is filled
 * from inside libcurl, where an out-of-memory error must not longjmp.
 */
typedef struct HttpAnswerBody
{
	char	   *data;			/* NUL-terminated; NULL while empty */
	size_t		len;
	size_t		allocated;
	bool		incomplete;		/* not read whole: too large, or no memory */
} HttpAnswerBody;

/* Most bytes of an answer read; a larger one is not read whole. */
#define MAX_ANSWER_BYTES	(8 * 1024 * 1024)

typedef struct HttpResult
{
	int			status;			/* 0: no HTTP answer */
	int64		retry_after_ms; /* -1: none */
	HttpAnswerBody body;
	char		transport_error[256];
} HttpResult;

extern void http_init(void);
extern void http_post_all(const HttpRequest *requests, HttpResult *results, int n);
extern void http_result_free(HttpResult *result);
extern bool endpoint_is_allowed(const char *endpoint, bool allow_insecure_http,
								const char **reason);
extern bool host_is_loopback(const char *host);

/* unit_builder.c: the caller is in a transaction, connected to SPI */
extern void read_sharing_settings(SharingSettings *settings);
extern DeliveryUnit *build_delivery_unit(SharingSettings *settings, int max_events,
										 size_t max_bytes, MemoryContext context,
										 List *failed, int max_failed, HTAB *accepted);
extern void unit_finished(DeliveryUnit *unit);
extern char *moved_item_id(const DeliveryEvent *event, int64 snapshot_seq);

/* event_identity.c */
extern char *event_identity(const char *install_id, const DeliveryEvent *event,
							const char *data_json, const char *digest);

extern void batch_identity(const char *practice_id, List *events, int first, int count,
						   char *batch_id);

/* lanes.c */
extern int	split_unit_into_lanes(DeliveryUnit *unit, int max_lanes, int *starts,
								  int *first_batches);

/* snapshot_wait.c */
extern void snapshot_waits_refresh(void);
extern bool snapshot_wait_passed(const char *patient_id, Snapshot snapshot);
extern void snapshot_wait_done(const char *patient_id);
extern bool snapshot_wait_pending(const char *patient_id);
extern void snapshot_waits_describe(char *buffer, size_t size);

/* wire.c */
extern void serialize_event(DeliveryEvent *event, const char *kind,
							const char *captured_at, const char *data_json);
extern void batch_body_init(BatchBody *body, const char *batch_id, const char *practice_id,
							List *events, int first, int count);
extern void batch_body_rewind(BatchBody *body);
extern size_t batch_body_read(BatchBody *body, char *buffer, size_t size);
extern bool parse_answer_body(const char *body, size_t len, List **rejected);

typedef struct RejectedEvent
{
	char	   *event_id;
	char	   *reason;
} RejectedEvent;

/* unit_commit.c: the caller is in a transaction, connected to SPI */
extern void record_batch_result(DeliveryUnit *unit, int first, int count,
								const char *batch_id, TimestampTz sent_at,
								int http_status, bool accepted);
extern void record_silent_consumption(DeliveryUnit *unit);

#endif							/* PORTAL_SYNC_DELIVERY_H */
