/*
 * gw_batch.h - batched calls of aggregate routes ("batch", README
 * "Batched calls"): instead of one request per element of an array, one
 * request per chunk of unique values, as a DataLoader does.
 *
 * A batch call's configuration (gw_batch_t, compiled by gw_config) says
 * where the values are ("from": "orders.items[*].product_id"), how they are
 * sent (the query parameter "param", values joined by "separator") and how
 * an answer's elements are matched back ("match"). Per request, a plan
 * (gw_batch_plan_t) holds the values found in the source's answer, unique,
 * in first-seen order, cut into chunks of at most "max" values and
 * "max_url_bytes" of path and query; gw_agg sends one exchange per chunk,
 * appending gw_batch_query() to the rendered path, and matches each answer
 * with gw_batch_match().
 *
 * Values and matching: a value is a string (non-empty, without NUL) or a
 * number, and it is compared by its text, the text a template would write
 * (7, 7.0 and "7" are one value, sent once as "7"; 7.5 and "7.50" are
 * not). An answer's element matches the value whose text its "match" field
 * has; the first such element wins, later ones are ignored.
 *
 * The configuration is immutable once compiled and shared by worker
 * threads; a plan belongs to one request on one worker.
 */
#ifndef GW_BATCH_H
#define GW_BATCH_H

#include "gw_core.h"
#include "gw_fail.h"
#include "gw_template.h"

#include <jansson.h>

#define GW_BATCH_MAX_DEFAULT         100
#define GW_BATCH_MAX_MAX             1000
#define GW_BATCH_MAX_ITEMS_DEFAULT   1000
#define GW_BATCH_MAX_ITEMS_MAX       10000
#define GW_BATCH_CONCURRENCY_DEFAULT 8
#define GW_BATCH_CONCURRENCY_MAX     64
#define GW_BATCH_URL_DEFAULT         8192
#define GW_BATCH_URL_MIN             256
#define GW_BATCH_URL_MAX             65536
#define GW_BATCH_SEP_MAX             4

/* A call's "batch" (owned by its gw_call_t; gw_call_t.foreach_call,
 * foreach_path and into say where the array is and where results go). */
struct gw_batch_s {
    gw_jpath_t *value;              /* inside each element, after "[*]" (the root: the element itself) */
    char *param;                    /* the query parameter's name: 1-64 of A-Z a-z 0-9 - . _ ~ */
    char sep[GW_BATCH_SEP_MAX + 1]; /* between values: 1-4 of , ; : ! $ * ' ( ) @ */
    gw_jpath_t *match;              /* the field of an answer's element compared with the values ("id") */
    unsigned max;                   /* values per request, 1..GW_BATCH_MAX_MAX */
    unsigned max_items;             /* elements of the source array at most (too_many_items) */
    unsigned concurrency;           /* requests in flight at once */
    size_t max_url_bytes;           /* a request's path and query at most this long */
};

/* Frees b and what it owns (NULL is fine). */
void gw_batch_free(gw_batch_t *b);

/* Whether sep is a valid separator (see gw_batch_t.sep). */
bool gw_batch_sep_ok(const char *sep, size_t len);
/* Whether name is a valid "param". */
bool gw_batch_param_ok(const char *name, size_t len);

/*
 * A plan for one request: the values of items (the source array, borrowed
 * for the call only) found at b->value in each element. An element whose
 * value is absent or null is not sent (GW_FAIL_MISSING_VALUE), nor one
 * whose value is not a usable string or number, or which is not an object
 * when need_object (a call with "into"), or whose value alone makes a
 * request longer than max_url_bytes (GW_FAIL_INVALID_VALUE). base_len: the
 * length of the rendered path and query the values are appended to. A new
 * plan, freed with gw_batch_plan_free(); it holds no JSON reference.
 */
gw_batch_plan_t *gw_batch_plan_new(const gw_batch_t *b, const json_t *items, bool need_object, size_t base_len);
void gw_batch_plan_free(gw_batch_plan_t *p);

/* The plan's number of chunks (0 when no element is sent). */
size_t gw_batch_chunks(const gw_batch_plan_t *p);
/* The number of unique values the plan sends. */
size_t gw_batch_values(const gw_batch_plan_t *p);

/*
 * What becomes of element k: GW_FAIL_NONE and its chunk in *chunk when it
 * is sent, else why it is not (see gw_batch_plan_new()).
 */
gw_fail_t gw_batch_elem(const gw_batch_plan_t *p, size_t k, size_t *chunk);

/* Appends "?PARAM=v1,v2" (or "&..." when has_query) for chunk c to out:
 * the values percent-encoded except A-Z a-z 0-9 - . _ ~, so neither the
 * separator nor "&" or "#" can appear inside one. */
void gw_batch_query(const gw_batch_plan_t *p, const gw_batch_t *b, size_t c, bool has_query, gw_tpl_buf_t *out);

/*
 * Matches the answer of chunk c (arr, borrowed: the array after the call's
 * target) to its values. GW_FAIL_INVALID_VALUE when arr is not an array.
 * Then gw_batch_found() gives each value's element until the next match of
 * the same chunk or gw_batch_plan_free(); the references are borrowed from
 * arr.
 */
gw_fail_t gw_batch_match(gw_batch_plan_t *p, const gw_batch_t *b, size_t c, const json_t *arr);

/* The element that matched element k's value in its chunk's answer
 * (borrowed from the array gw_batch_match() was given), or NULL. */
json_t *gw_batch_found(const gw_batch_plan_t *p, size_t k);

/*
 * The text a value is sent and compared as, in *s and *len (a string's content,
 * or num for a number). False when v cannot be a value (absent, null,
 * boolean, object, array, empty string, string with a NUL).
 */
bool gw_batch_text(const json_t *v, char num[40], const char **s, size_t *len);

#endif
