/*-------------------------------------------------------------------------
 *
 * portal_sync.h
 *		Declarations shared by the parts of portal_sync.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#ifndef PORTAL_SYNC_H
#define PORTAL_SYNC_H

#include "postgres.h"

#include "access/attnum.h"
#include "executor/execExpr.h"
#include "fmgr.h"
#include "nodes/primnodes.h"
#include "storage/lockdefs.h"
#include "utils/relcache.h"

#define PORTAL_SYNC_SCHEMA "portal_sync"
#define PORTAL_SYNC_VERSION "1.1"

/* Values of portal_sync.compression */
#define PORTAL_SYNC_COMPRESSION_OFF		0
#define PORTAL_SYNC_COMPRESSION_GZIP	1

/* Settings (portal_sync.c) */
extern char *portal_sync_endpoint;
extern char *portal_sync_auth_token;
extern char *portal_sync_auth_token_file;
extern char *portal_sync_ca_file;
extern bool portal_sync_allow_insecure_http;
extern int	portal_sync_compression;
extern int	portal_sync_batch_size;
extern int	portal_sync_max_inflight;

/* Per-database settings (database_settings.c) */
extern void database_settings_check_utility(Node *statement);
extern void database_settings_inherit(void);
extern bool database_settings_apply(void);

/* The most portal_sync.max_inflight allows. */
#define MAX_INFLIGHT_LIMIT	64

extern int	portal_sync_max_batch_bytes;
extern int	portal_sync_http_timeout;
extern int	portal_sync_retry_max_delay;
extern int	portal_sync_resync_rate;
extern int	portal_sync_log_retention;
extern int	portal_sync_max_workers;

/* The kinds of source of SPEC §1. */
typedef enum SourceKind
{
	SOURCE_APPOINTMENT,
	SOURCE_CCDA,
	SOURCE_NOTE,
	SOURCE_PIN,
	SOURCE_INSURANCE,
	SOURCE_CLINICAL,
	SOURCE_PATIENT
} SourceKind;

extern bool source_kind_from_name(const char *name, SourceKind *kind);
extern bool source_kind_enrolls(SourceKind kind);

/* Outbox operations, as stored in portal_sync.outbox.op. */
#define OUTBOX_OP_INSERT	'i'
#define OUTBOX_OP_UPDATE	'u'
#define OUTBOX_OP_DELETE	'd'
#define OUTBOX_OP_TRUNCATE	't'
#define OUTBOX_OP_SNAPSHOT	's'	/* a resync: snapshot of an enrolled patient */
#define OUTBOX_OP_ENROLL	'e'	/* an enrollment: its snapshot, keys = {by} */
#define OUTBOX_OP_UNENROLL	'x'	/* unenroll(): a purge, the enrollment ends */

/*
 * What the capture triggers need to know of one attached table, loaded once
 * per backend from portal_sync.source (source_cache.c).
 */
typedef struct SourceConfig
{
	Oid			relid;			/* hash key: the table capture fires on */
	Oid			attached_relid; /* the attached table: relid, or for a
								 * partition its topmost attached ancestor */
	bool		valid;
	int32		source_id;
	SourceKind	kind;
	char	   *name;
	AttrNumber	patient_attnum; /* attribute numbers of relid's own rows */
	AttrNumber	key_attnum;
	bool		patient_byval;	/* patient column of a by-value type? */
	bool		key_byval;
	int16		key_typlen;
	Oid			patient_type;	/* base types, for value_text() */
	Oid			key_type;
	FmgrInfo	patient_output;
	FmgrInfo	key_output;
	Expr	   *enroll_when;	/* planned expression, or NULL for "true" */

	/*
	 * The columns an UPDATE must change to be sent (those sent in data, the
	 * patient, key, date and privacy columns, and those the rules read), in
	 * ascending order; every update counts when a rule reads a system
	 * column.
	 */
	int			ncompared;
	AttrNumber *compared_attnums;
	bool		every_update_counts;
	bool		compare_whole_row;	/* every column, none dropped */
} SourceConfig;

extern SourceConfig *source_config_lookup(Oid relid);
extern void record_capture_dependencies(Oid relid);
extern void repair_capture_dependencies(void);
extern bool attach_is_creating_triggers(void);
extern Oid	portal_sync_relid(const char *relname);
extern Oid	portal_sync_relid_if_exists(const char *relname);

/* Capture triggers of one table (attach.c); the caller is connected to SPI */
extern void add_capture_triggers(Oid relid);
extern void drop_capture_triggers(Oid relid);
extern List *partitions_of(Oid relid, LOCKMODE lockmode);

/* Rows that come or go with a whole table (capture.c) */
extern void capture_table_rows(Relation rel, bool removed);

/* Rule expressions: share_when and enroll_when (rule_expr.c) */
extern Node *rule_expr_compile(Relation rel, const char *text, const char *what);
extern char *rule_expr_deparse(Relation rel, Node *expr);
extern Node *rule_expr_analyze_stored(Relation rel, const char *text, const char *what);
extern Node *rule_expr_load_node_tree(const char *node_string);

/*
 * The stored settings of one attached table, resolved against the table
 * as it is now: columns by number, rules analyzed (source_cache.c).
 */
typedef struct StoredSource
{
	int32		source_id;
	SourceKind	kind;
	char	   *kind_name;
	char	   *name;
	AttrNumber	patient_attnum;
	AttrNumber	key_attnum;
	AttrNumber	date_attnum;	/* InvalidAttrNumber: none */
	AttrNumber	privacy_attnum;
	Node	   *share_when;		/* analyzed, or NULL */
	Node	   *enroll_when;
	int			ncolumns;		/* -1: every column is sent */
	AttrNumber *columns;
} StoredSource;

extern bool source_settings_by_name(void);
extern bool source_settings_read(Oid relid, StoredSource *stored);
extern bool source_is_attached(Oid relid);
extern List *source_attached_relids(void);

/* Outbox writing (outbox.c) */
typedef struct OutboxWriter OutboxWriter;

extern OutboxWriter *outbox_writer_open(void);
extern void outbox_writer_add(OutboxWriter *writer, const char *patient_id,
							  int32 source_id, char op, Datum *keys, int nkeys);
extern void outbox_writer_close(OutboxWriter *writer);
extern int64 outbox_queue_request(const char *patient_id, char op, const char *note);
extern void outbox_count_skipped(int32 source_id, int64 row_count);
extern void outbox_note_queued(void);

/* The text of ids and keys, the same in every session (value_text.c) */
extern bool type_output_depends_on_settings(Oid base_type);
extern bool type_needs_value_text(Oid base_type);
extern char *value_text(Datum value, Oid base_type, FmgrInfo *output);

/* copies.c */
extern const char *database_identity(void);
extern void outbox_note_settings_changed(void);

/* detach(..., retract => true) (retraction.c) */
extern void queue_retraction(Relation rel, int32 source_id, const char *kind, const char *name,
							 const char *patient_col, const char *key_col);

/* Enrollment (enroll.c) */
extern bool patient_is_enrolled(const char *patient_id);
extern void enroll_patient(const char *patient_id, const char *enrolled_by);
extern bool enrollment_is_uncommitted_here(const char *patient_id);
extern char *patient_id_as_captured(const char *patient_id);
extern int64 queue_resync(const char *patient_id, int64 *last_seq);

/* Running a piece of work as the extension's owner (enroll.c) */
typedef struct ExtensionOwnerContext
{
	Oid			save_userid;
	int			save_sec_context;
	int			save_nestlevel;
} ExtensionOwnerContext;

extern void become_extension_owner(ExtensionOwnerContext *context);
extern void restore_user(ExtensionOwnerContext *context);

#endif							/* PORTAL_SYNC_H */
