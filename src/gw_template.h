/*
 * gw_template.h - templates of aggregate-route calls: a call's target (path
 * and query), its header values and its JSON body, filled per request from
 * the client request and from earlier calls' JSON answers.
 *
 * Compiled once at configuration load against a scope (the route's path
 * parameter names, its call names in order, whether a foreach item exists),
 * so every name is resolved and every mistake reported before a request
 * arrives; rendered per request against a context. Compiled templates are
 * immutable and shared read-only by worker threads.
 *
 * Placeholders, in "{...}" ("{{" and "}}" are literal braces):
 *   {id}                a route path parameter (already percent-decoded)
 *   {query.NAME}        the first client query parameter NAME ("%XX" and
 *                       "+" decoded; a bad escape is invalid_value). NAME
 *                       is everything after "query." and is compared byte
 *                       for byte with the decoded names: {query.a b} finds
 *                       "a%20b=1" and "a+b=1"; "flag" with no "=" is ""
 *   {header.NAME}       the first client request header NAME (any case)
 *   {CALL} {CALL.a.b} {CALL.items[0].id}
 *                       call CALL's parsed JSON answer, or a value inside it
 *                       (a gw_jpath after the first "." or "[")
 *   {item} {item.FIELD} the current element of a foreach call
 * "query", "header" and "item" are reserved: a path parameter or call with
 * one of these names, or a name that is both a path parameter and a call,
 * is a compile error rather than a silent choice.
 *
 * Values as text: a JSON string gives its content; an integer its decimal
 * digits (exact over the whole int64 range); a real the shortest of %.15g,
 * %.16g and %.17g that reads back as the same double (jansson keeps no
 * original text for reals, so 1.50 renders as 1.5 and 1e300 as 1e+300;
 * printed in the C locale, which gatherd never changes);
 * true and false their names. null or an absent value fails with
 * "missing_value" and an object or array with "invalid_value": a missing
 * value never becomes an empty string or "null".
 *
 * Encoding by kind:
 *   GW_TPL_TARGET  literal text starts with "/" and holds only URL
 *                  characters (no control characters, space, "#", non-ASCII,
 *                  "\"<>\\^`{|}"; "%" only in a valid %XX). Placeholders
 *                  before the first literal "?" are in the path, after it in
 *                  the query. In both every byte of a value except ALPHA,
 *                  DIGIT and "-._~" is percent-encoded, so a value can never
 *                  add a segment, a parameter, a fragment or a line. In the
 *                  path a value that is empty, "." or ".." fails with
 *                  invalid_value (it would change which resource is
 *                  addressed; "x{v}" with v = "" too). A NUL byte in
 *                  a value fails with invalid_value in both contexts (many
 *                  backends stop at an encoded NUL; gatherd itself refuses
 *                  %00 in requests).
 *   GW_TPL_HEADER  no encoding; a value with a control character (below
 *                  0x20, or 0x7f; CR and LF included) fails with
 *                  invalid_value. Literal text obeys the same rule.
 *   JSON body      see gw_tpl_json_compile().
 */
#ifndef GW_TEMPLATE_H
#define GW_TEMPLATE_H

#include "gw_core.h"
#include "gw_fail.h"

#include <jansson.h>

/* Dependencies are a bitmask over call indexes: a route has at most 64. */
#define GW_TPL_MAX_CALLS 64
/* Default limit of a rendered text (gw_tpl_buf_t.limit == 0). */
#define GW_TPL_MAX_LEN 16384

typedef enum { GW_TPL_TARGET, GW_TPL_HEADER } gw_tpl_kind_t;

/* What names exist, given at compile time. All borrowed for the call. */
typedef struct {
    const char *const *params; /* the route's path parameter names */
    size_t nparams;
    const char *const *calls; /* the route's call names, index = dependency bit */
    size_t ncalls;
    bool has_item; /* the call being compiled has a foreach item */
    bool any_param; /* route-independent templates (a backend's hash_key): any other name is a path
                       parameter, looked up when rendered (missing_value in a route without it) */
} gw_tpl_scope_t;

/* What values exist, given at render time. All borrowed for the call. */
typedef struct {
    const gw_req_t *req;     /* client request: query and headers (NULL: none) */
    const gw_match_t *match; /* router match: path parameters (NULL: none) */
    json_t *const *results;  /* per call index (scope order); NULL entry: no answer */
    size_t nresults;
    const json_t *item; /* the foreach element, or NULL */
} gw_tpl_ctx_t;

/* A render failure. code is GW_FAIL_MISSING_VALUE or GW_FAIL_INVALID_VALUE;
 * detail names the placeholder, never the value (it may be a secret or
 * hold control characters): "{user.id}: missing in the answer of call user". */
typedef struct {
    gw_fail_t code;
    char detail[256];
} gw_tpl_err_t;

/*
 * A growable output buffer owned by the caller, reusable across renders
 * (set len to 0). Start from { 0 } or set limit: the most bytes data may
 * hold (0: GW_TPL_MAX_LEN). data is NUL-terminated after a successful
 * render. Free with gw_tpl_buf_free().
 */
typedef struct {
    char *data;
    size_t len, cap;
    size_t limit;
} gw_tpl_buf_t;

void gw_tpl_buf_free(gw_tpl_buf_t *b);

/* Appends n bytes of s to b as they are, keeping data NUL-terminated. For
 * text assembled around renders (request heads, JSON output): b's limit
 * applies to renders only, not here. */
void gw_tpl_buf_add(gw_tpl_buf_t *b, const char *s, size_t n);

/*
 * Compiles src (NUL-terminated) as a template of kind kind against scope
 * (borrowed; names are copied). Returns a new template to free with
 * gw_tpl_free(), or NULL with a message in err, such as
 * unknown name "usr" in "{usr.id}": not a path parameter, a call, query.*, header.* or item
 */
gw_tpl_t *gw_tpl_compile(const char *src, gw_tpl_kind_t kind, const gw_tpl_scope_t *scope, char *err, size_t errlen);
void gw_tpl_free(gw_tpl_t *t);

/* Bit i is set when t refers to call i of the scope it was compiled with. */
uint64_t gw_tpl_deps(const gw_tpl_t *t);

/* The text t was compiled from (borrowed, lives as long as t). */
const char *gw_tpl_source(const gw_tpl_t *t);

/*
 * Renders t with ctx, appending to out. GW_OK, or GW_ERR with err filled in
 * and out->len as it was before the call (nothing half-rendered is left).
 * A result longer than out's limit is invalid_value.
 */
int gw_tpl_render(const gw_tpl_t *t, const gw_tpl_ctx_t *ctx, gw_tpl_buf_t *out, gw_tpl_err_t *err);

/*
 * Compiles a JSON body template from body (borrowed: nothing of it is kept).
 * Object keys are not templated. A string that is exactly one placeholder
 * ("{user.id}", "{orders}") is replaced by the value itself, keeping its
 * type: numbers stay numbers, "{CALL}" is the whole answer, and a null that
 * is present in an answer stays null (only an absent value is
 * missing_value). A path parameter, query parameter or header gives a
 * string. A string that mixes text and placeholders becomes a string,
 * rendered as text (no encoding: JSON escaping applies when it is written).
 * Other strings and values are copied.
 * Returns a new template to free with gw_tpl_json_free(), or NULL with a
 * message in err: "items[1].name: unknown name ..." (the location of the bad
 * string inside body in gw_jpath syntax, then the message; no location when
 * body itself is the bad string).
 */
gw_tpl_json_t *gw_tpl_json_compile(const json_t *body, const gw_tpl_scope_t *scope, char *err, size_t errlen);
void gw_tpl_json_free(gw_tpl_json_t *t);
uint64_t gw_tpl_json_deps(const gw_tpl_json_t *t);
/* Whether a placeholder of t reads the foreach item ({item}, {item.FIELD}). */
bool gw_tpl_json_uses_item(const gw_tpl_json_t *t);
/* Whether t has no placeholder at all (it renders the same value every time). */
bool gw_tpl_json_is_const(const gw_tpl_json_t *t);

/*
 * Renders t with ctx. Returns a NEW reference, or NULL with err filled in
 * (a string that is not valid UTF-8 after substitution is invalid_value).
 * The result owns fresh copies of the template's constant parts, but it
 * SHARES (json_incref) the values it took from ctx->results and ctx->item:
 * serialize it and drop it; never mutate it or them in place.
 */
json_t *gw_tpl_json_render(const gw_tpl_json_t *t, const gw_tpl_ctx_t *ctx, gw_tpl_err_t *err);

#endif
