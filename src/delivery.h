/*-------------------------------------------------------------------------
 *
 * delivery.h
 *		Data structures of the delivery worker.
 *
 * The worker turns a stretch of the outbox into a delivery unit: the
 * events to send, in order, each knowing which outbox entries it consumes
 * once the portal accepts it.  The unit is then sent in batches, each at
 * most portal_sync.batch_size events and portal_sync.max_batch_bytes.
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
	bool	   *key_consumed;	/* per key: accepted or dead-lettered */
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
	char	   *key;			/* NULL for markers */
	EventOp		op;
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
	bool		blocked;		/* some patient waits on something */
	bool		more_pending;	/* the outbox had more than was read */
	bool		snapshot_accepted;	/* a snapshot_end was accepted */
} DeliveryUnit;

/* The practice's settings, read at every unit. */
typedef struct SharingSettings
{
	char	   *practice_id;
	bool		enabled;
	bool		has_cutoff;
	char	   *date_cutoff;	/* text form, for SQL parameters */
	int32		max_privacy_level;
	char	   *install_id;
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
} HttpRequest;

typedef struct HttpResult
{
	int			status;			/* 0: no HTTP answer */
	int64		retry_after_ms; /* -1: none */
	StringInfoData body;
	char		transport_error[256];
} HttpResult;

extern void http_init(void);
extern void http_post(const HttpRequest *request, HttpResult *result);
extern int64 parse_retry_after(const char *value, TimestampTz now);
extern bool endpoint_is_allowed(const char *endpoint, bool allow_insecure_http,
								const char **reason);
extern bool host_is_loopback(const char *host);

/* unit_builder.c: the caller is in a transaction, connected to SPI */
extern void read_sharing_settings(SharingSettings *settings);
extern DeliveryUnit *build_delivery_unit(SharingSettings *settings, int max_events,
										 MemoryContext context);

/* wire.c */
extern void serialize_event(DeliveryEvent *event, const char *kind,
							const char *captured_at, const char *data_json);
extern void batch_body_init(BatchBody *body, const char *batch_id, const char *practice_id,
							List *events, int first, int count);
extern void batch_body_rewind(BatchBody *body);
extern size_t batch_body_read(BatchBody *body, char *buffer, size_t size);
extern List *parse_rejected_list(const char *body, size_t len);

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

/* snapshot horizon (unit_builder.c) */
extern void forget_snapshot_horizons(void);

#endif							/* PORTAL_SYNC_DELIVERY_H */
