/*-------------------------------------------------------------------------
 *
 * wire.c
 *		The JSON of the wire protocol, with json-c.
 *
 * Each event is serialized once, when its unit is built, so that a batch
 * body is the concatenation of its events and a batch can be cut to
 * portal_sync.max_batch_bytes without serializing twice.  The portal's
 * answer is parsed here too: only its "rejected" list matters.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <json.h>

#include "lib/stringinfo.h"
#include "utils/memutils.h"

#include "delivery.h"

const char *const event_op_names[] = {
	[EVENT_UPSERT] = "upsert",
	[EVENT_DELETE] = "delete",
	[EVENT_SNAPSHOT_BEGIN] = "snapshot_begin",
	[EVENT_SNAPSHOT_END] = "snapshot_end",
	[EVENT_PURGE] = "purge"
};

/* Most bytes of a reason kept from the portal's answer. */
#define MAX_REASON_LEN 500

/*
 * Copy a json-c string into palloc'd memory and release the object.
 */
static char *
take_json_string(json_object *object, size_t *len)
{
	size_t		length;
	const char *text = json_object_to_json_string_length(object,
														 JSON_C_TO_STRING_PLAIN |
														 JSON_C_TO_STRING_NOSLASHESCAPE,
														 &length);
	char	   *copy = palloc(length + 1);

	memcpy(copy, text, length + 1);
	json_object_put(object);
	if (len != NULL)
		*len = length;
	return copy;
}

/*
 * Serialize one event, without its data.  data_json is the row as
 * PostgreSQL's to_json() wrote it, for upserts: it is valid JSON already,
 * so it is spliced in as the value of "data" when the body is read, rather
 * than parsed and written again, which for a C-CDA document of megabytes
 * would triple the worker's memory.  kind is the source's kind (NULL for
 * markers).
 */
void
serialize_event(DeliveryEvent *event, const char *kind,
				const char *captured_at, const char *data_json)
{
	json_object *object = json_object_new_object();
	size_t		head_len;

	json_object_object_add(object, "event_id", json_object_new_string(event->event_id));
	json_object_object_add(object, "seq", json_object_new_int64(event->seq));
	json_object_object_add(object, "patient_id", json_object_new_string(event->patient_id));
	if (event->source_name != NULL)
	{
		json_object_object_add(object, "source", json_object_new_string(event->source_name));
		json_object_object_add(object, "kind", json_object_new_string(kind));
	}
	json_object_object_add(object, "op", json_object_new_string(event_op_names[event->op]));
	if (event->key != NULL)
		json_object_object_add(object, "key", json_object_new_string(event->key));
	json_object_object_add(object, "captured_at", json_object_new_string(captured_at));

	event->json = take_json_string(object, &head_len);
	event->json_len = head_len;
	event->data_json = data_json;
	event->data_len = 0;
	if (data_json != NULL)
	{
		/* {...} is sent as {...,"data":<row>} */
		event->data_len = strlen(data_json);
		event->json_len += strlen(",\"data\":") + event->data_len;
	}
}

/*
 * Prepare the body of one POST: the envelope around count events from
 * first.
 */
void
batch_body_init(BatchBody *body, const char *batch_id, const char *practice_id,
				List *events, int first, int count)
{
	json_object *id = json_object_new_string(batch_id);
	json_object *practice = json_object_new_string(practice_id);

	body->prefix = psprintf("{\"batch_id\":%s,\"practice_id\":%s,\"events\":[",
							json_object_to_json_string_ext(id, JSON_C_TO_STRING_PLAIN),
							json_object_to_json_string_ext(practice, JSON_C_TO_STRING_PLAIN));
	json_object_put(id);
	json_object_put(practice);

	body->events = events;
	body->first = first;
	body->count = count;
	body->total_len = strlen(body->prefix) + 2;
	for (int i = first; i < first + count; i++)
		body->total_len += ((DeliveryEvent *) list_nth(events, i))->json_len + (i > first ? 1 : 0);
	batch_body_rewind(body);
}

/*
 * Start reading the body again from its beginning (a retry).
 */
void
batch_body_rewind(BatchBody *body)
{
	body->part = -1;
	body->piece = 0;
	body->offset = 0;
}

/*
 * Copy from source to the buffer what fits; returns the bytes copied and
 * advances *offset, which goes back to 0 when the source is done.
 */
static size_t
copy_piece(const char *source, size_t len, size_t *offset, char *buffer, size_t size,
		   bool *done)
{
	size_t		n = Min(len - *offset, size);

	memcpy(buffer, source + *offset, n);
	*offset += n;
	*done = *offset == len;
	if (*done)
		*offset = 0;
	return n;
}

/*
 * Fill the buffer with the next bytes of the body; 0 at its end.
 */
size_t
batch_body_read(BatchBody *body, char *buffer, size_t size)
{
	size_t		written = 0;

	while (written < size && body->part <= body->count)
	{
		bool		done;

		if (body->part == -1)
		{
			written += copy_piece(body->prefix, strlen(body->prefix), &body->offset,
								  buffer + written, size - written, &done);
			if (done)
				body->part++;
		}
		else if (body->part == body->count)
		{
			written += copy_piece("]}", 2, &body->offset, buffer + written,
								  size - written, &done);
			if (done)
				body->part++;
		}
		else
		{
			DeliveryEvent *event = list_nth(body->events, body->first + body->part);
			const char *separator = body->part > 0 ? "," : "";

			switch (body->piece)
			{
				case 0:			/* separator */
					written += copy_piece(separator, strlen(separator), &body->offset,
										  buffer + written, size - written, &done);
					break;
				case 1:			/* head, without its closing brace if data follows */
					written += copy_piece(event->json,
										  strlen(event->json) - (event->data_json ? 1 : 0),
										  &body->offset, buffer + written, size - written, &done);
					break;
				case 2:
					written += copy_piece(",\"data\":", event->data_json ? 8 : 0,
										  &body->offset, buffer + written, size - written, &done);
					break;
				case 3:
					written += copy_piece(event->data_json ? event->data_json : "",
										  event->data_len, &body->offset,
										  buffer + written, size - written, &done);
					break;
				default:
					written += copy_piece("}", event->data_json ? 1 : 0, &body->offset,
										  buffer + written, size - written, &done);
					break;
			}
			if (done && ++body->piece > 4)
			{
				body->piece = 0;
				body->part++;
			}
		}
	}
	return written;
}

/*
 * White space between JSON tokens.
 */
static bool
is_json_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Read a 2xx answer: an empty body (or only white space) accepts the whole
 * batch, a JSON object accepts it but for the events of its "rejected"
 * list ({"rejected":[{"event_id":..,"reason":..}]}, returned in *rejected).
 * Anything else (HTML from a proxy, a JSON array, a cut-off object) is not
 * an answer of the portal: returns false, and the batch counts as not
 * accepted.
 */
bool
parse_answer_body(const char *body, size_t len, List **rejected_events)
{
	json_tokener *tokener;
	json_object *root;
	json_object *rejected;
	size_t		start = 0;
	bool		is_object;

	*rejected_events = NIL;
	while (start < len && is_json_space(body[start]))
		start++;
	if (start == len)
		return true;
	if (len > (size_t) INT_MAX)
		return false;

	tokener = json_tokener_new_ex(32);
	if (tokener == NULL)
		return false;
	root = json_tokener_parse_ex(tokener, body, (int) len);
	if (root != NULL && json_tokener_get_error(tokener) == json_tokener_success)
	{
		/* one value, then only white space */
		size_t		end = json_tokener_get_parse_end(tokener);

		while (end < len && is_json_space(body[end]))
			end++;
		if (end != len)
		{
			json_object_put(root);
			root = NULL;
		}
	}
	else if (root != NULL)
	{
		json_object_put(root);
		root = NULL;
	}
	json_tokener_free(tokener);
	if (root == NULL)
		return false;

	is_object = json_object_is_type(root, json_type_object);
	if (is_object &&
		json_object_object_get_ex(root, "rejected", &rejected) &&
		json_object_is_type(rejected, json_type_array))
	{
		size_t		n = json_object_array_length(rejected);

		for (size_t i = 0; i < n; i++)
		{
			json_object *item = json_object_array_get_idx(rejected, i);
			json_object *event_id;
			json_object *reason;
			RejectedEvent *entry;

			if (!json_object_is_type(item, json_type_object) ||
				!json_object_object_get_ex(item, "event_id", &event_id) ||
				!json_object_is_type(event_id, json_type_string))
				continue;
			entry = palloc0(sizeof(RejectedEvent));
			entry->event_id = pstrdup(json_object_get_string(event_id));
			if (json_object_object_get_ex(item, "reason", &reason) &&
				json_object_is_type(reason, json_type_string))
				entry->reason = pnstrdup(json_object_get_string(reason), MAX_REASON_LEN);
			*rejected_events = lappend(*rejected_events, entry);
		}
	}
	json_object_put(root);
	return is_object;
}
