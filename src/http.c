/*-------------------------------------------------------------------------
 *
 * http.c
 *		POSTing batches to the portal with libcurl.
 *
 * One easy handle is kept for the life of the worker so that the TLS
 * connection to the portal is reused between batches.  Peer and host are
 * always verified; plain http:// is accepted only to loopback addresses
 * unless portal_sync.allow_insecure_http is on.  A request in flight is
 * abandoned as soon as the worker is asked to stop.
 *
 * With portal_sync.compression = gzip the body is compressed while libcurl
 * reads it, a piece at a time, and sent with chunked transfer encoding:
 * there is never a second copy of it in memory.  Compression is
 * deterministic, so a body sent again is the same bytes.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <zlib.h>

#include "miscadmin.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "portal_sync.h"

static CURL *curl_handle = NULL;

/* Bytes of JSON handed to zlib at a time. */
#define GZIP_INPUT_BYTES	(64 * 1024)

/*
 * A request's body as libcurl reads it: the batch's JSON, compressed on
 * the way when gzip is set.  zlib allocates with malloc (its default), so
 * nothing inside libcurl's callbacks can longjmp.
 */
typedef struct BodyStream
{
	BatchBody  *body;
	bool		gzip;
	bool		input_done;		/* the JSON was read to its end */
	bool		finished;		/* the compressed stream ended */
	z_stream	zstream;
	Bytef		input[GZIP_INPUT_BYTES];
} BodyStream;

/*
 * Body collector.  Runs inside libcurl: it allocates with malloc, never
 * palloc (an out-of-memory error must not longjmp through libcurl).  An
 * answer larger than MAX_ANSWER_BYTES, or one there is no memory for, is
 * read to its end and marked incomplete: its status still counts, its body
 * does not.
 */
static size_t
collect_body(char *data, size_t size, size_t nmemb, void *userdata)
{
	HttpAnswerBody *body = &((HttpResult *) userdata)->body;
	size_t		bytes = size * nmemb;

	if (body->incomplete)
		return bytes;
	if (body->len + bytes > MAX_ANSWER_BYTES)
	{
		body->incomplete = true;
		return bytes;
	}
	if (body->len + bytes + 1 > body->allocated)
	{
		size_t		wanted = Max(body->allocated * 2, (size_t) 8192);
		char	   *grown;

		while (wanted < body->len + bytes + 1)
			wanted *= 2;
		wanted = Min(wanted, (size_t) MAX_ANSWER_BYTES + 1);
		grown = realloc(body->data, wanted);
		if (grown == NULL)
		{
			body->incomplete = true;
			return bytes;
		}
		body->data = grown;
		body->allocated = wanted;
	}
	memcpy(body->data + body->len, data, bytes);
	body->len += bytes;
	body->data[body->len] = '\0';
	return bytes;
}

/*
 * Free what http_post() allocated for a result.
 */
void
http_result_free(HttpResult *result)
{
	free(result->body.data);
	memset(&result->body, 0, sizeof(result->body));
}

/*
 * Read callback: the next bytes of the batch body, compressed when asked.
 */
static size_t
read_body(char *buffer, size_t size, size_t nitems, void *userdata)
{
	BodyStream *stream = (BodyStream *) userdata;
	z_stream   *zstream = &stream->zstream;
	size_t		room = size * nitems;

	if (!stream->gzip)
		return batch_body_read(stream->body, buffer, room);
	if (stream->finished)
		return 0;

	zstream->next_out = (Bytef *) buffer;
	zstream->avail_out = (uInt) Min(room, (size_t) UINT_MAX);
	while (zstream->avail_out > 0 && !stream->finished)
	{
		int			rc;

		if (zstream->avail_in == 0 && !stream->input_done)
		{
			size_t		n = batch_body_read(stream->body, (char *) stream->input,
											sizeof(stream->input));

			zstream->next_in = stream->input;
			zstream->avail_in = (uInt) n;
			stream->input_done = n == 0;
		}
		rc = deflate(zstream, stream->input_done ? Z_FINISH : Z_NO_FLUSH);
		if (rc == Z_STREAM_END)
			stream->finished = true;
		else if (rc != Z_OK && rc != Z_BUF_ERROR)
			return CURL_READFUNC_ABORT;
	}
	return (size_t) (zstream->next_out - (Bytef *) buffer);
}

/*
 * Seek callback: libcurl rewinds the body to send it again on a new
 * connection.
 */
static int
rewind_body(void *userdata, curl_off_t offset, int origin)
{
	BodyStream *stream = (BodyStream *) userdata;

	if (offset != 0 || origin != SEEK_SET)
		return CURL_SEEKFUNC_CANTSEEK;
	batch_body_rewind(stream->body);
	if (stream->gzip)
	{
		if (deflateReset(&stream->zstream) != Z_OK)
			return CURL_SEEKFUNC_FAIL;
		stream->zstream.avail_in = 0;
		stream->input_done = false;
		stream->finished = false;
	}
	return CURL_SEEKFUNC_OK;
}

/*
 * Prepare a body for reading from its start; for gzip, a compressor whose
 * output is the same for the same body (no name or time in its header).
 */
static void
body_stream_start(BodyStream *stream, BatchBody *body, bool gzip)
{
	stream->body = body;
	stream->gzip = gzip;
	stream->input_done = false;
	stream->finished = false;
	batch_body_rewind(body);
	if (gzip)
	{
		memset(&stream->zstream, 0, sizeof(stream->zstream));
		/* 15 + 16: a 32 kB window with a gzip header and trailer */
		if (deflateInit2(&stream->zstream, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
						 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("portal_sync: could not start gzip compression")));
	}
}

/*
 * Free what body_stream_start() set up.
 */
static void
body_stream_end(BodyStream *stream)
{
	if (stream->gzip)
		deflateEnd(&stream->zstream);
}

/*
 * Progress callback: abandon the request when the worker must stop.
 */
static int
check_for_stop(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
			   curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/*
 * Is the endpoint one the worker may send to?  On refusal, *reason says
 * why (without the URL's credentials or path).
 */
bool
endpoint_is_allowed(const char *endpoint, bool allow_insecure_http, const char **reason)
{
	CURLU	   *url = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	bool		allowed = false;

	*reason = NULL;
	if (curl_url_set(url, CURLUPART_URL, endpoint, 0) != CURLUE_OK ||
		curl_url_get(url, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
		curl_url_get(url, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		*reason = "portal_sync.endpoint is not a valid URL";
	else if (pg_strcasecmp(scheme, "https") == 0)
		allowed = true;
	else if (pg_strcasecmp(scheme, "http") != 0)
		*reason = "portal_sync.endpoint must be an https:// URL";
	else if (allow_insecure_http || host_is_loopback(host))
		allowed = true;
	else
		*reason = "plain http:// is only allowed to loopback addresses (set portal_sync.allow_insecure_http to override)";

	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(url);
	return allowed;
}

/*
 * Is a URL host a loopback address: localhost, 127.0.0.0/8 or ::1?
 */
bool
host_is_loopback(const char *host)
{
	struct in_addr addr4;
	struct in6_addr addr6;
	char		bare[INET6_ADDRSTRLEN + 2];
	size_t		len = strlen(host);

	if (pg_strcasecmp(host, "localhost") == 0)
		return true;
	if (inet_pton(AF_INET, host, &addr4) == 1)
		return (ntohl(addr4.s_addr) >> 24) == 127;
	if (len > 2 && len < sizeof(bare) && host[0] == '[' && host[len - 1] == ']')
	{
		memcpy(bare, host + 1, len - 2);
		bare[len - 2] = '\0';
		if (inet_pton(AF_INET6, bare, &addr6) == 1)
			return IN6_IS_ADDR_LOOPBACK(&addr6);
	}
	return false;
}

/*
 * Set up libcurl once per worker.
 */
void
http_init(void)
{
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
		elog(ERROR, "portal_sync: could not initialize libcurl");
	curl_handle = curl_easy_init();
	if (curl_handle == NULL)
		elog(ERROR, "portal_sync: could not create a libcurl handle");
}

/*
 * POST a body to the endpoint; fills *result.  Never raises an error for
 * a failure of the request itself: those are results to act upon.
 */
void
http_post(const HttpRequest *request, HttpResult *result)
{
	struct curl_slist *headers = NULL;
	char		header[1024];
	CURLcode	code;
	long		status = 0;
	BodyStream *stream;

	memset(&result->body, 0, sizeof(result->body));
	result->status = 0;
	result->retry_after_ms = -1;
	result->transport_error[0] = '\0';

	curl_easy_reset(curl_handle);
	curl_easy_setopt(curl_handle, CURLOPT_URL, request->endpoint);
	curl_easy_setopt(curl_handle, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(curl_handle, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(curl_handle, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl_handle, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(curl_handle, CURLOPT_SSL_VERIFYHOST, 2L);
	if (request->ca_file != NULL && request->ca_file[0] != '\0')
		curl_easy_setopt(curl_handle, CURLOPT_CAINFO, request->ca_file);
	curl_easy_setopt(curl_handle, CURLOPT_TIMEOUT_MS, (long) request->timeout_ms);
	curl_easy_setopt(curl_handle, CURLOPT_CONNECTTIMEOUT_MS, (long) request->timeout_ms);
	curl_easy_setopt(curl_handle, CURLOPT_POST, 1L);
	stream = palloc(sizeof(BodyStream));
	body_stream_start(stream, request->body, request->gzip);
	curl_easy_setopt(curl_handle, CURLOPT_READFUNCTION, read_body);
	curl_easy_setopt(curl_handle, CURLOPT_READDATA, stream);
	curl_easy_setopt(curl_handle, CURLOPT_SEEKFUNCTION, rewind_body);
	curl_easy_setopt(curl_handle, CURLOPT_SEEKDATA, stream);
	/* a compressed body's size is known only at its end: chunked */
	curl_easy_setopt(curl_handle, CURLOPT_POSTFIELDSIZE_LARGE,
					 request->gzip ? (curl_off_t) -1 : (curl_off_t) request->body->total_len);
	curl_easy_setopt(curl_handle, CURLOPT_WRITEFUNCTION, collect_body);
	curl_easy_setopt(curl_handle, CURLOPT_WRITEDATA, result);
	curl_easy_setopt(curl_handle, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl_handle, CURLOPT_XFERINFOFUNCTION, check_for_stop);
	curl_easy_setopt(curl_handle, CURLOPT_USERAGENT, "portal_sync/" PORTAL_SYNC_VERSION);

	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, "Expect:");
	if (request->gzip)
		headers = curl_slist_append(headers, "Content-Encoding: gzip");
	snprintf(header, sizeof(header), "Idempotency-Key: %s", request->batch_id);
	headers = curl_slist_append(headers, header);
	if (request->token != NULL && request->token[0] != '\0')
	{
		char	   *auth = psprintf("Authorization: Bearer %s", request->token);

		headers = curl_slist_append(headers, auth);
		explicit_bzero(auth, strlen(auth));
		pfree(auth);
	}
	curl_easy_setopt(curl_handle, CURLOPT_HTTPHEADER, headers);

	code = curl_easy_perform(curl_handle);
	curl_slist_free_all(headers);
	body_stream_end(stream);
	pfree(stream);
	/* libcurl keeps no copy of the header list once the transfer is done */

	if (code == CURLE_OK)
	{
		curl_off_t	retry_after = 0;

		curl_easy_getinfo(curl_handle, CURLINFO_RESPONSE_CODE, &status);
		result->status = (int) status;
		/* seconds, from either form of the header; 0 when there is none */
		if (curl_easy_getinfo(curl_handle, CURLINFO_RETRY_AFTER, &retry_after) == CURLE_OK &&
			retry_after > 0)
			result->retry_after_ms = (int64) Min(retry_after, (curl_off_t) 366 * 86400) * 1000;
	}
	else
		strlcpy(result->transport_error, curl_easy_strerror(code),
				sizeof(result->transport_error));
}
