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
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <curl/curl.h>

#include "miscadmin.h"
#include "utils/timestamp.h"

#include "delivery.h"
#include "portal_sync.h"

static CURL *curl_handle = NULL;

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
 * Read callback: the next bytes of the batch body.
 */
static size_t
read_body(char *buffer, size_t size, size_t nitems, void *userdata)
{
	return batch_body_read((BatchBody *) userdata, buffer, size * nitems);
}

/*
 * Seek callback: libcurl rewinds the body to send it again on a new
 * connection.
 */
static int
rewind_body(void *userdata, curl_off_t offset, int origin)
{
	if (offset != 0 || origin != SEEK_SET)
		return CURL_SEEKFUNC_CANTSEEK;
	batch_body_rewind((BatchBody *) userdata);
	return CURL_SEEKFUNC_OK;
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
	batch_body_rewind(request->body);
	curl_easy_setopt(curl_handle, CURLOPT_READFUNCTION, read_body);
	curl_easy_setopt(curl_handle, CURLOPT_READDATA, request->body);
	curl_easy_setopt(curl_handle, CURLOPT_SEEKFUNCTION, rewind_body);
	curl_easy_setopt(curl_handle, CURLOPT_SEEKDATA, request->body);
	curl_easy_setopt(curl_handle, CURLOPT_POSTFIELDSIZE_LARGE,
					 (curl_off_t) request->body->total_len);
	curl_easy_setopt(curl_handle, CURLOPT_WRITEFUNCTION, collect_body);
	curl_easy_setopt(curl_handle, CURLOPT_WRITEDATA, result);
	curl_easy_setopt(curl_handle, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl_handle, CURLOPT_XFERINFOFUNCTION, check_for_stop);
	curl_easy_setopt(curl_handle, CURLOPT_USERAGENT, "portal_sync/" PORTAL_SYNC_VERSION);

	headers = curl_slist_append(headers, "Content-Type: application/json");
	headers = curl_slist_append(headers, "Expect:");
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
