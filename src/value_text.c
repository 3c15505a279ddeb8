/*-------------------------------------------------------------------------
 *
 * value_text.c
 *		The text of a patient id or a row key, the same in every session.
 *
 * Capture records which rows changed as text (the outbox's patient id and
 * keys), the worker compares that text with what it reads, and the portal
 * knows items by it.  A type's output function depends on the session's
 * settings for some types (DateStyle, IntervalStyle, TimeZone,
 * extra_float_digits, bytea_output), and values that are equal may print
 * differently (numeric 61 and 61.00, char(n) padding).  Every such text is
 * made here, by capture in the EHR's session and by the worker's
 * statements through portal_sync.value_text(), under fixed settings:
 * ISO dates, ISO 8601 intervals, UTC, shortest exact floats, hex bytea; a
 * numeric without trailing zeros, a char(n) without its padding.  Every
 * text made here reads back as the same value in any session.
 *
 * Copyright (c) 2026, portal_sync developers
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"

#include "portal_sync.h"

PG_FUNCTION_INFO_V1(portal_sync_value_text);

/*
 * Whether the output of a type depends on the session's settings.
 */
bool
type_output_depends_on_settings(Oid base_type)
{
	switch (base_type)
	{
		case DATEOID:
		case TIMEOID:
		case TIMETZOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
		case INTERVALOID:
		case FLOAT4OID:
		case FLOAT8OID:
		case BYTEAOID:
			return true;
		default:
			return false;
	}
}

/*
 * Whether value_text() makes a text other than the type's plain output:
 * the worker's statements then call portal_sync.value_text().
 */
bool
type_needs_value_text(Oid base_type)
{
	return type_output_depends_on_settings(base_type) ||
		base_type == NUMERICOID || base_type == BPCHAROID;
}

/*
 * The text of a value of the given type (a domain is looked through by
 * the caller), with the type's output function in "output".
 */
char *
value_text(Datum value, Oid base_type, FmgrInfo *output)
{
	char	   *text;

	if (base_type == NUMERICOID)
		value = DirectFunctionCall1(numeric_trim_scale, value);

	if (type_output_depends_on_settings(base_type))
	{
		int			nest_level = NewGUCNestLevel();

		(void) set_config_option("DateStyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("IntervalStyle", "iso_8601", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("TimeZone", "UTC", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("bytea_output", "hex", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		text = OutputFunctionCall(output, value);
		AtEOXact_GUC(true, nest_level);
	}
	else
		text = OutputFunctionCall(output, value);

	if (base_type == BPCHAROID)
	{
		size_t		len = strlen(text);

		while (len > 0 && text[len - 1] == ' ')
			text[--len] = '\0';
	}
	return text;
}

/*
 * portal_sync.value_text(anyelement) RETURNS text
 *
 * value_text() for the worker's statements and for the DBA, who may want
 * to know how an id or key is written in the outbox and on the wire.
 */
Datum
portal_sync_value_text(PG_FUNCTION_ARGS)
{
	Oid			type = get_fn_expr_argtype(fcinfo->flinfo, 0);
	FmgrInfo   *output = fcinfo->flinfo->fn_extra;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	if (output == NULL)
	{
		Oid			output_function;
		bool		varlena;

		output = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(FmgrInfo));
		getTypeOutputInfo(type, &output_function, &varlena);
		fmgr_info_cxt(output_function, output, fcinfo->flinfo->fn_mcxt);
		fcinfo->flinfo->fn_extra = output;
	}
	PG_RETURN_TEXT_P(cstring_to_text(value_text(PG_GETARG_DATUM(0),
												getBaseType(type), output)));
}
