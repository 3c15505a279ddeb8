/*-------------------------------------------------------------------------
 *
 * event_identity.c
 *		Event ids that follow content.
 *
 * An event_id names one change with one content (SPEC: a portal that
 * dedupes by event_id never keeps an older content in place of a newer
 * one).  So it is derived from exactly what identifies the change and what
 * is sent for it: the installation, the patient, the source and key, the
 * operation, the latest outbox entry the event reports (a later change of
 * the row is a later entry, so the same content after A -> B -> A still
 * gets a new id), its capture time and the row's JSON (a row that became
 * a delete, or whose sent columns changed, gets a new id).  An item of a
 * snapshot is also named by the snapshot's seq: which snapshot mentions
 * it is part of what it says.  A snapshot's markers are named by the
 * patient and the snapshot's seq, which a snapshot resumed after a
 * failure keeps (unit_builder.c).  The same event built again from the
 * same state (a retry, a restart) gets the same id.
 *
 * A batch_id is derived the same way from the batch's body: the same body
 * sent again (a retry that the worker rebuilt to the very same events and
 * seqs) carries the same batch_id, and any other body another one.
 *
 * SHA-256, cut to 128 bits: ids never collide by accident.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "utils/builtins.h"
#include "utils/resowner.h"

#include "delivery.h"

/* Bytes of the hash kept in the id. */
#define EVENT_ID_HASH_BYTES		16

/*
 * Feed one field to the hash, with its length, so that fields cannot run
 * into each other ("ab","c" vs "a","bc"); NULL differs from "".
 */
static void
hash_field(pg_cryptohash_ctx *ctx, const char *value, size_t len)
{
	uint64		header = value == NULL ? PG_UINT64_MAX : (uint64) len;

	if (pg_cryptohash_update(ctx, (const uint8 *) &header, sizeof(header)) < 0 ||
		(value != NULL && pg_cryptohash_update(ctx, (const uint8 *) value, len) < 0))
		elog(ERROR, "could not compute an event id: %s", pg_cryptohash_error(ctx));
}

static void
hash_string(pg_cryptohash_ctx *ctx, const char *value)
{
	hash_field(ctx, value, value ? strlen(value) : 0);
}

/*
 * The event_id of an event: "<install_id>-<32 hex digits>".  digest names
 * a snapshot marker ("seq N"), else NULL.
 */
char *
event_identity(const char *install_id, const DeliveryEvent *event,
			   const char *data_json, const char *digest)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	uint8		hash[PG_SHA256_DIGEST_LENGTH];
	char		hex[EVENT_ID_HASH_BYTES * 2 + 1];
	char		number[32];

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0)
		elog(ERROR, "could not compute an event id");
	hash_string(ctx, install_id);
	hash_string(ctx, event->patient_id);
	snprintf(number, sizeof(number), "%d", event->source_id);
	hash_string(ctx, number);
	hash_string(ctx, event->source_name);
	hash_string(ctx, event->kind_name);
	hash_string(ctx, event->key);
	hash_string(ctx, event_op_names[event->op]);
	snprintf(number, sizeof(number), INT64_FORMAT, event->change_seq);
	hash_string(ctx, number);
	hash_string(ctx, event->captured_at);
	hash_string(ctx, data_json);
	hash_string(ctx, digest);
	if (pg_cryptohash_final(ctx, hash, sizeof(hash)) < 0)
		elog(ERROR, "could not compute an event id: %s", pg_cryptohash_error(ctx));
	pg_cryptohash_free(ctx);

	hex_encode((const char *) hash, EVENT_ID_HASH_BYTES, hex);
	hex[EVENT_ID_HASH_BYTES * 2] = '\0';
	return psprintf("%s-%s", install_id, hex);
}

/*
 * The batch_id of the body of count events from first: 32 hex digits
 * into batch_id (33 bytes), from the practice and every byte the events
 * put in the body.  Batches are cut outside transactions, and OpenSSL's
 * hash contexts belong to a resource owner: one of its own, then.
 */
void
batch_identity(const char *practice_id, List *events, int first, int count,
			   char *batch_id)
{
	static ResourceOwner owner = NULL;
	ResourceOwner saved_owner = CurrentResourceOwner;
	pg_cryptohash_ctx *ctx;
	uint8		hash[PG_SHA256_DIGEST_LENGTH];

	if (owner == NULL)
		owner = ResourceOwnerCreate(NULL, "portal_sync batch ids");
	if (saved_owner == NULL)
		CurrentResourceOwner = owner;
	PG_TRY();
	{
		ctx = pg_cryptohash_create(PG_SHA256);
		if (ctx == NULL || pg_cryptohash_init(ctx) < 0)
			elog(ERROR, "could not compute a batch id");
		hash_string(ctx, practice_id);
		for (int i = first; i < first + count; i++)
		{
			DeliveryEvent *event = list_nth(events, i);

			hash_string(ctx, event->json);
			hash_field(ctx, event->data_json, event->data_len);
		}
		if (pg_cryptohash_final(ctx, hash, sizeof(hash)) < 0)
			elog(ERROR, "could not compute a batch id: %s", pg_cryptohash_error(ctx));
		pg_cryptohash_free(ctx);
	}
	PG_FINALLY();
	{
		CurrentResourceOwner = saved_owner;
	}
	PG_END_TRY();

	hex_encode((const char *) hash, EVENT_ID_HASH_BYTES, batch_id);
	batch_id[EVENT_ID_HASH_BYTES * 2] = '\0';
}
