/*
 * libFuzzer target: the endpoint check, endpoint_is_allowed() and
 * host_is_loopback() of src/http.c.  The first byte chooses
 * allow_insecure_http, the rest is the URL (and, alone, a host).
 * Invariants: no crash or leak; allowed exactly when no reason is given;
 * an allowed URL without allow_insecure_http is https, or http to a host
 * that host_is_loopback() accepts; a loopback host is "localhost",
 * 127.0.0.0/8 or [::1].
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <curl/curl.h>

#include "delivery.h"
#include "pg_shim.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_loopback(const char *host)
{
	struct in_addr a4;
	struct in6_addr a6;
	char		bare[INET6_ADDRSTRLEN + 2];
	size_t		len = strlen(host);

	if (!host_is_loopback(host))
		return;
	if (pg_strcasecmp(host, "localhost") == 0)
		return;
	if (inet_pton(AF_INET, host, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127)
		return;
	if (len > 2 && len < sizeof(bare) && host[0] == '[' && host[len - 1] == ']')
	{
		memcpy(bare, host + 1, len - 2);
		bare[len - 2] = '\0';
		if (inet_pton(AF_INET6, bare, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6))
			return;
	}
	abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *url;
	bool		insecure;
	bool		allowed;
	const char *reason = (const char *) 1;

	if (size < 1)
		return 0;
	insecure = data[0] & 1;
	url = malloc(size);
	memcpy(url, data + 1, size - 1);
	url[size - 1] = '\0';

	allowed = endpoint_is_allowed(url, insecure, &reason);
	if (allowed != (reason == NULL))
		abort();
	if (allowed && !insecure)
	{
		CURLU	   *u = curl_url();
		char	   *scheme = NULL;
		char	   *host = NULL;

		if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
			curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
			curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
			abort();
		if (pg_strcasecmp(scheme, "https") != 0 &&
			!(pg_strcasecmp(scheme, "http") == 0 && host_is_loopback(host)))
			abort();
		curl_free(scheme);
		curl_free(host);
		curl_url_cleanup(u);
	}
	check_loopback(url);
	free(url);
	shim_reset();
	return 0;
}
