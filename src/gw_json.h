/*
 * gw_json.h - JSON output for aggregate answers and templates: a compact
 * serializer of jansson values into a gw_tpl_buf_t, and number text.
 *
 * Why not json_dumps(): jansson prints every real with %.17g, so a backend's
 * 9.99 would reach clients as 9.9900000000000002. Here a real is printed as
 * the shortest of %.15g, %.16g and %.17g that reads back as the same double
 * (9.99 stays 9.99, 0.1 + 0.2 stays 0.30000000000000004), and the answer is
 * written straight into a reusable buffer.
 */
#ifndef GW_JSON_H
#define GW_JSON_H

#include "gw_core.h"
#include "gw_template.h"

#include <jansson.h>

/* Writes the shortest round-trip text of d into buf (NUL-terminated);
 * returns its length. jansson never holds NaN or infinities. */
size_t gw_json_real(double d, char buf[32]);

/* Appends v as compact JSON to out (grown as needed; out->limit is not
 * applied). Object members keep their order; strings are escaped as JSON
 * requires (", \, control characters), other UTF-8 is written as is. */
void gw_json_dump(const json_t *v, gw_tpl_buf_t *out);

/* Appends s as a JSON string (quoted and escaped) to out. */
void gw_json_dump_string(const char *s, size_t len, gw_tpl_buf_t *out);

/*
 * Whether the len bytes at s are one JSON value (RFC 8259, with optional
 * white space around it) that jansson would accept with JSON_DECODE_ANY |
 * JSON_ALLOW_NUL: valid UTF-8, surrogate escapes in pairs, integers within
 * int64, reals within double range, at most 2048 levels of nesting. It
 * allocates nothing: aggregate answers that no template reads and no
 * shaping changes are checked with it and copied as they are. *start and
 * *vlen get the value without the white space around it.
 */
bool gw_json_valid(const char *s, size_t len, size_t *start, size_t *vlen);

#endif
