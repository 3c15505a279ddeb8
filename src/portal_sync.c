/*-------------------------------------------------------------------------
 *
 * portal_sync.c
 *		Module entry point: settings of the extension.
 *
 * portal_sync must be loaded through shared_preload_libraries, because its
 * delivery workers are registered by the postmaster.  Loading it any other
 * way fails with a hint, so that CREATE EXTENSION cannot leave a database
 * capturing events that no worker will ever send.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "portal_sync.h"
#include "shared_state.h"
#include "utility_hook.h"

PG_MODULE_MAGIC;

char	   *portal_sync_endpoint = NULL;
char	   *portal_sync_auth_token = NULL;
char	   *portal_sync_auth_token_file = NULL;
char	   *portal_sync_ca_file = NULL;
bool		portal_sync_allow_insecure_http = false;
int			portal_sync_compression = PORTAL_SYNC_COMPRESSION_GZIP;
int			portal_sync_batch_size = 500;
int			portal_sync_max_inflight = 4;
int			portal_sync_max_batch_bytes = 4096;	/* kB */
int			portal_sync_http_timeout = 30000;	/* ms */
int			portal_sync_retry_max_delay = 300000;	/* ms */
int			portal_sync_resync_rate = 50;
int			portal_sync_log_retention = 30 * 24 * 60;	/* min */
int			portal_sync_max_workers = 8;

void		_PG_init(void);

static const struct config_enum_entry compression_options[] = {
	{"gzip", PORTAL_SYNC_COMPRESSION_GZIP, false},
	{"off", PORTAL_SYNC_COMPRESSION_OFF, false},
	{NULL, 0, false}
};

/*
 * The token is a secret: SHOW and pg_settings print a mask instead of it to
 * anybody but a superuser, including members of pg_read_all_settings, which
 * GUC_SUPERUSER_ONLY alone would let through.
 */
static const char *
show_auth_token(void)
{
	if (portal_sync_auth_token == NULL || portal_sync_auth_token[0] == '\0')
		return "";
	if (superuser())
		return portal_sync_auth_token;
	return "********";
}

/*
 * Define every setting of SPEC §2.
 */
static void
define_settings(void)
{
	/*
	 * Per database (database_settings.c): a superuser may ALTER DATABASE
	 * ... SET endpoint, auth_token_file, ca_file and compression.  The token
	 * itself stays in postgresql.conf: pg_db_role_setting is readable by
	 * every role.
	 */
	DefineCustomStringVariable("portal_sync.endpoint",
							   "URL the delivery workers POST batches to.",
							   "Empty: workers idle and events keep queueing.",
							   &portal_sync_endpoint,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("portal_sync.auth_token",
							   "Bearer token sent to the portal.",
							   NULL,
							   &portal_sync_auth_token,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   NULL, NULL, show_auth_token);

	DefineCustomStringVariable("portal_sync.auth_token_file",
							   "File holding the bearer token; wins over portal_sync.auth_token.",
							   NULL,
							   &portal_sync_auth_token_file,
							   "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("portal_sync.ca_file",
							   "CA bundle used to verify the portal's certificate.",
							   "Empty: the system's CA bundle.",
							   &portal_sync_ca_file,
							   "",
							   PGC_SUSET, 0,
							   NULL, NULL, NULL);

	DefineCustomBoolVariable("portal_sync.allow_insecure_http",
							 "Allows plain http:// endpoints that are not loopback addresses.",
							 NULL,
							 &portal_sync_allow_insecure_http,
							 false,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	/* per database, like endpoint */
	DefineCustomEnumVariable("portal_sync.compression",
							 "Compression of the bodies POSTed to the portal.",
							 "gzip: Content-Encoding: gzip; off: plain JSON.",
							 &portal_sync_compression,
							 PORTAL_SYNC_COMPRESSION_GZIP,
							 compression_options,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.max_inflight",
							"Most requests in flight at once for one database.",
							"Each request carries a disjoint set of patients.",
							&portal_sync_max_inflight,
							4, 1, MAX_INFLIGHT_LIMIT,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.batch_size",
							"Most events in one POST.",
							NULL,
							&portal_sync_batch_size,
							500, 1, 100000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.max_batch_bytes",
							"Most bytes in one POST body; a larger single event is sent alone.",
							NULL,
							&portal_sync_max_batch_bytes,
							4096, 64, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.http_timeout",
							"Whole-request timeout of a POST to the portal.",
							NULL,
							&portal_sync_http_timeout,
							30000, 100, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.retry_max_delay",
							"Longest wait between failed delivery attempts.",
							NULL,
							&portal_sync_retry_max_delay,
							300000, 100, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.resync_rate",
							"Snapshots started per second by portal_sync.resync_all().",
							NULL,
							&portal_sync_resync_rate,
							50, 1, 100000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.log_retention",
							"How long rows of portal_sync.delivery_log are kept.",
							NULL,
							&portal_sync_log_retention,
							30 * 24 * 60, 1, INT_MAX / 60,
							PGC_SIGHUP, GUC_UNIT_MIN,
							NULL, NULL, NULL);

	DefineCustomIntVariable("portal_sync.max_workers",
							"Most delivery workers in the cluster.",
							NULL,
							&portal_sync_max_workers,
							8, 1, 1024,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
}

/*
 * Module load callback.
 */
void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("portal_sync must be loaded via shared_preload_libraries"),
				 errhint("Add portal_sync to shared_preload_libraries in postgresql.conf and restart the server.")));

	if (IsBinaryUpgrade)
		return;

	define_settings();
	shared_state_install_hooks();
	utility_hook_install();
	register_launcher();

	/* a misspelt portal_sync.* setting is reported instead of ignored */
	MarkGUCPrefixReserved("portal_sync");
}
