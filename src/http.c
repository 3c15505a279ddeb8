/*-------------------------------------------------------------------------
 *
 * http.c
 *		POSTing batches to the portal with libcurl.
 *
 * Up to portal_sync.max_inflight requests go out at once through
 * libcurl's multi interface; the multi handle keeps its connections (TLS
 * included) for the life of the worker, so they are reused between
 * batches, and each easy handle is kept too.  Peer and host are always
 * verified; plain http:// is accepted only to loopback addresses unless
 * portal_sync.allow_insecure_http is on.  Requests in flight are
 * abandoned as soon as the worker is asked to stop, or the postmaster
 * dies.
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
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "portal_sync.h"

/* Most requests in flight at once. */
#define MAX_TRANSFERS		MAX_INFLIGHT_LIMIT

/* How long to wait for network activity before looking at interrupts. */
#define POLL_INTERVAL_MS	100

static CURLM *multi_handle = NULL;
static CURL *easy_handles[MAX_TRANSFERS];

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
	multi_handle = curl_multi_init();
	if (multi_handle == NULL)
		elog(ERROR, "portal_sync: could not create a libcurl multi handle");
}

/*
 * The easy handle of transfer i, created on first use and kept: libcurl
 * keeps what it learnt about the portal (DNS, TLS session) in it.
 */
static CURL *
easy_handle(int i)
{
	if (easy_handles[i] == NULL)
	{
		easy_handles[i] = curl_easy_init();
		if (easy_handles[i] == NULL)
			elog(ERROR, "portal_sync: could not create a libcurl handle");
	}
	else
	{
		/* left in the multi handle by an error in a previous round */
		curl_multi_remove_handle(multi_handle, easy_handles[i]);
		curl_easy_reset(easy_handles[i]);
	}
	return easy_handles[i];
}

/*
 * The header list of one request.  The token is copied into libcurl's
 * list only; the copy made here is wiped.
 */
static struct curl_slist *
request_headers(const HttpRequest *request)
{
	struct curl_slist *headers = NULL;
	char		header[1024];

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
	return headers;
}

/*
 * Set up the easy handle of one request: where, how, and its body.
 */
static void
prepare_transfer(CURL *curl, const HttpRequest *request, BodyStream *stream,
				 struct curl_slist *headers, HttpResult *result)
{
	curl_easy_setopt(curl, CURLOPT_URL, request->endpoint);
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
	if (request->ca_file != NULL && request->ca_file[0] != '\0')
		curl_easy_setopt(curl, CURLOPT_CAINFO, request->ca_file);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long) request->timeout_ms);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, (long) request->timeout_ms);
	curl_easy_setopt(curl, CURLOPT_POST, 1L);
	curl_easy_setopt(curl, CURLOPT_READFUNCTION, read_body);
	curl_easy_setopt(curl, CURLOPT_READDATA, stream);
	curl_easy_setopt(curl, CURLOPT_SEEKFUNCTION, rewind_body);
	curl_easy_setopt(curl, CURLOPT_SEEKDATA, stream);
	/* a compressed body's size is known only at its end: chunked */
	curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
					 request->gzip ? (curl_off_t) -1 : (curl_off_t) request->body->total_len);
	curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, collect_body);
	curl_easy_setopt(curl, CURLOPT_WRITEDATA, result);
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, check_for_stop);
	curl_easy_setopt(curl, CURLOPT_USERAGENT, "portal_sync/" PORTAL_SYNC_VERSION);
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(curl, CURLOPT_PRIVATE, result);
}

/*
 * What a finished transfer says: its status and Retry-After, or why it
 * failed.
 */
static void
finish_transfer(CURL *curl, CURLcode code, HttpResult *result)
{
	if (code == CURLE_OK)
	{
		long		status = 0;
		curl_off_t	retry_after = 0;

		curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
		result->status = (int) status;
		result->transport_error[0] = '\0';
		/* seconds, from either form of the header; 0 when there is none */
		if (curl_easy_getinfo(curl, CURLINFO_RETRY_AFTER, &retry_after) == CURLE_OK &&
			retry_after > 0)
			result->retry_after_ms = (int64) Min(retry_after, (curl_off_t) 366 * 86400) * 1000;
	}
	else
	{
		long		request_size = 0;

		strlcpy(result->transport_error, curl_easy_strerror(code),
				sizeof(result->transport_error));
		/* refused, unresolved, no TLS: nothing of it reached the portal */
		if (curl_easy_getinfo(curl, CURLINFO_REQUEST_SIZE, &request_size) != CURLE_OK ||
			request_size > 0)
			result->request_sent = true;
	}
}

/*
 * POST n bodies at once and wait until every one is answered (or has
 * failed); fills results[i] for requests[i].  Never raises an error for
 * a failure of a request itself: those are results to act upon.  When
 * the worker is asked to stop, the requests are abandoned and the caller
 * finds out at its next CHECK_FOR_INTERRUPTS().
 */
void
http_post_all(const HttpRequest *requests, HttpResult *results, int n)
{
	struct curl_slist *headers[MAX_TRANSFERS];
	BodyStream *streams[MAX_TRANSFERS];
	int			running = 0;
	int			left;
	CURLMsg    *message;

	Assert(n > 0 && n <= MAX_TRANSFERS);
	for (int i = 0; i < n; i++)
	{
		CURL	   *curl = easy_handle(i);
		HttpResult *result = &results[i];

		memset(&result->body, 0, sizeof(result->body));
		result->status = 0;
		result->retry_after_ms = -1;
		result->request_sent = false;
		strlcpy(result->transport_error, "libcurl did not complete the request",
				sizeof(result->transport_error));
		streams[i] = palloc(sizeof(BodyStream));
		body_stream_start(streams[i], requests[i].body, requests[i].gzip);
		headers[i] = request_headers(&requests[i]);
		prepare_transfer(curl, &requests[i], streams[i], headers[i], result);
		if (curl_multi_add_handle(multi_handle, curl) != CURLM_OK)
			strlcpy(result->transport_error, "libcurl could not start the request",
					sizeof(result->transport_error));
	}

	do
	{
		CURLMcode	code = curl_multi_perform(multi_handle, &running);

		if (code == CURLM_OK && running > 0)
			code = curl_multi_poll(multi_handle, NULL, 0, POLL_INTERVAL_MS, NULL);
		if (code != CURLM_OK)
			break;
		if (ProcDiePending || QueryCancelPending || !PostmasterIsAlive())
		{
			for (int i = 0; i < n; i++)
				strlcpy(results[i].transport_error, "abandoned: the worker is stopping",
						sizeof(results[i].transport_error));
			break;
		}
	} while (running > 0);

	while ((message = curl_multi_info_read(multi_handle, &left)) != NULL)
	{
		HttpResult *result = NULL;

		if (message->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(message->easy_handle, CURLINFO_PRIVATE, (char **) &result);
		if (result != NULL)
			finish_transfer(message->easy_handle, message->data.result, result);
	}

	/* done or abandoned: libcurl keeps no copy of the header lists */
	for (int i = 0; i < n; i++)
	{
		curl_multi_remove_handle(multi_handle, easy_handles[i]);
		curl_slist_free_all(headers[i]);
		body_stream_end(streams[i]);
		pfree(streams[i]);
	}
	if (!PostmasterIsAlive())
		proc_exit(1);
}
