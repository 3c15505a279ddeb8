/*
 * libFuzzer target: the batch body of src/wire.c -- serialize_event(),
 * batch_body_init() and batch_body_read() as libcurl drives it, with read
 * sizes chosen by the input, and rewinds in the middle (a resend on a new
 * connection).  The input is split on '\n' into: read sizes (bytes),
 * batch_id, practice_id, then per event patient_id, source (empty: a
 * marker), key and the row JSON (any bytes: the worker splices it).
 * Invariants: no crash or leak; every read delivers exactly total_len
 * bytes; a rewind gives the same bytes again; with rows that are valid
 * JSON and text that is valid UTF-8 (a UTF8 database holds no other) the
 * body is valid JSON.
 */
#include "postgres.h"

#include <json.h>

#include "delivery.h"
#include "pg_shim.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Is the input valid UTF-8 (shortest forms, no surrogates)?  Text of a
 * UTF8 database always is; json-c's parser refuses anything else.
 */
static bool
valid_utf8(const uint8_t *s, size_t len)
{
	size_t		i = 0;

	while (i < len)
	{
		uint8_t		c = s[i];
		int			n;
		uint32_t	cp;

		if (c < 0x80)
		{
			i++;
			continue;
		}
		else if ((c & 0xE0) == 0xC0)
			n = 1, cp = c & 0x1F;
		else if ((c & 0xF0) == 0xE0)
			n = 2, cp = c & 0x0F;
		else if ((c & 0xF8) == 0xF0)
			n = 3, cp = c & 0x07;
		else
			return false;
		for (int k = 1; k <= n; k++)
		{
			if (i + k >= len || (s[i + k] & 0xC0) != 0x80)
				return false;
			cp = (cp << 6) | (s[i + k] & 0x3F);
		}
		if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
			cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return false;
		i += n + 1;
	}
	return true;
}

static char *
next_field(const char **p, const char *end)
{
	const char *nl = memchr(*p, '\n', end - *p);
	const char *stop = nl ? nl : end;
	char	   *field = palloc(stop - *p + 1);

	memcpy(field, *p, stop - *p);
	field[stop - *p] = '\0';
	*p = nl ? nl + 1 : end;
	return field;
}

static char *
read_all(BatchBody *body, const unsigned char *sizes, size_t nsizes, size_t *len)
{
	char	   *out = palloc(body->total_len + 1);
	size_t		got = 0;
	char		buffer[300];

	for (size_t i = 0;; i++)
	{
		size_t		want = nsizes ? (sizes[i % nsizes] % 256) + 1 : 64;
		size_t		n = batch_body_read(body, buffer, want);

		if (n > want)
			abort();
		if (n == 0)
			break;
		if (got + n > body->total_len)
			abort();			/* more than announced */
		memcpy(out + got, buffer, n);
		got += n;
	}
	out[got] = '\0';
	*len = got;
	return out;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *p = (const char *) data;
	const char *end = p + size;
	char	   *sizes;
	char	   *batch_id;
	char	   *practice_id;
	List	   *events = NIL;
	bool		rows_valid = true;
	BatchBody	body;
	char	   *first;
	char	   *second;
	size_t		len1;
	size_t		len2;

	if (memchr(data, '\0', size) != NULL)
		return 0;				/* text columns hold no NUL */
	if (!valid_utf8(data, size))
		rows_valid = false;		/* no JSON to expect; the rest still holds */
	sizes = next_field(&p, end);
	batch_id = next_field(&p, end);
	practice_id = next_field(&p, end);
	for (int i = 0; p < end && i < 20; i++)
	{
		DeliveryEvent *event = palloc0(sizeof(DeliveryEvent));
		char	   *row;

		event->event_id = psprintf("%s-%d", batch_id, i);
		event->seq = i;
		event->patient_id = next_field(&p, end);
		event->source_name = next_field(&p, end);
		if (event->source_name[0] == '\0')
		{
			event->source_name = NULL;
			event->op = EVENT_SNAPSHOT_BEGIN + i % 3;
			row = NULL;
		}
		else
		{
			event->op = (i % 2) ? EVENT_DELETE : EVENT_UPSERT;
			event->key = next_field(&p, end);
			row = next_field(&p, end);
			if (event->op == EVENT_DELETE)
				row = NULL;
			else
			{
				/*
				 * valid only if the whole text is one JSON value, by the
				 * standard: json-c's default mode also takes comments and
				 * leading zeros, which PostgreSQL's JSON output never has
				 */
				json_tokener *tok = json_tokener_new();
				json_object *o;

				json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
				o = json_tokener_parse_ex(tok, row, (int) strlen(row) + 1);

				if (o == NULL || json_tokener_get_error(tok) != json_tokener_success ||
					json_tokener_get_parse_end(tok) < strlen(row))
					rows_valid = false;
				json_object_put(o);
				json_tokener_free(tok);
			}
		}
		serialize_event(event, event->source_name ? "clinical" : NULL,
						"2026-01-01T00:00:00Z", row);
		events = lappend(events, event);
	}
	if (events == NIL)
		goto done;

	batch_body_init(&body, batch_id, practice_id, events, 0, list_length(events));
	first = read_all(&body, (unsigned char *) sizes, strlen(sizes), &len1);
	if (len1 != body.total_len)
		abort();
	batch_body_rewind(&body);
	/* a partial read, a rewind, then everything again */
	if (body.total_len > 3)
	{
		char		b[3];

		(void) batch_body_read(&body, b, sizeof(b));
		batch_body_rewind(&body);
	}
	second = read_all(&body, NULL, 0, &len2);
	if (len2 != len1 || memcmp(first, second, len1) != 0)
		abort();
	if (rows_valid)
	{
		json_tokener *tok = json_tokener_new();
		json_object *o;

		json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
		o = json_tokener_parse_ex(tok, first, (int) len1);

		if (o == NULL || json_tokener_get_error(tok) != json_tokener_success ||
			!json_object_is_type(o, json_type_object) ||
			json_object_array_length(json_object_object_get(o, "events")) !=
			(size_t) list_length(events))
			abort();
		json_object_put(o);
		json_tokener_free(tok);
	}
done:
	shim_reset();
	return 0;
}
