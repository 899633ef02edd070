/*
 * gw_cond.h - the conditions of aggregate-route calls ("when", README
 * "Conditions"): whether a call (or one element of a foreach call) is sent
 * or skipped, decided from the client request and earlier calls' answers.
 *
 * A condition is a small tree, compiled once at configuration load against
 * the call's template scope (gw_template.h), so every name is resolved and
 * every mistake reported before a request arrives; evaluated per request
 * (or per foreach element) against a template context. Compiled conditions
 * are immutable and shared read-only by worker threads.
 *
 * Forms (a JSON object with exactly one of them):
 *   {"value": T, "equals": V}   T's value equals the JSON value V
 *   {"value": T, "in": [V...]}  T's value equals one of 1..GW_COND_MAX_IN values
 *   {"exists": T}               T has a value and it is not null
 *   {"all": [C...]}             every one of 1..GW_COND_MAX_KIDS conditions holds
 *   {"any": [C...]}             at least one holds
 *   {"not": C}                  C does not hold
 * T is a JSON-body string template (gw_tpl_json_compile) with at least one
 * placeholder: one placeholder alone gives the value with its JSON type,
 * text around placeholders gives a string. A value that cannot be made
 * (a placeholder finds nothing, or text meets null, an object or an array)
 * is absent: it equals nothing and does not exist.
 *
 * Equality is JSON's: the same type and value; numbers by value across
 * integer and real (5 equals 5.0, exactly: 2^53 + 1 is not 2^53), never a
 * number with a boolean or a string; strings byte for byte; arrays element
 * by element; objects by key set and values, in any order.
 */
#ifndef GW_COND_H
#define GW_COND_H

#include "gw_core.h"
#include "gw_template.h"

#include <jansson.h>

#define GW_COND_MAX_DEPTH 8   /* levels of nesting, the outermost condition included */
#define GW_COND_MAX_NODES 64  /* conditions in one "when", every level counted */
#define GW_COND_MAX_KIDS  16  /* conditions in one "all" or "any" */
#define GW_COND_MAX_IN    256 /* values in one "in" */

/* A compile error: where inside the condition (steps from it: a key, or an
 * index when key is NULL; keys borrowed from the compiled JSON value, valid
 * while it is) and what. nsteps 0: the condition itself. */
typedef struct {
    struct {
        const char *key;
        size_t index;
    } steps[2 * GW_COND_MAX_DEPTH + 2];
    size_t nsteps;
    char msg[512];
} gw_cond_err_t;

/*
 * Compiles v (borrowed: nothing of it is kept) against scope (borrowed).
 * Returns a new condition to free with gw_cond_free(), or NULL with err
 * filled in.
 */
gw_cond_t *gw_cond_compile(const json_t *v, const gw_tpl_scope_t *scope, gw_cond_err_t *err);
void gw_cond_free(gw_cond_t *c);

/* Bit i is set when c's templates name call i of the scope. */
uint64_t gw_cond_deps(const gw_cond_t *c);

/* Whether c reads the foreach item (it is then decided per element). */
bool gw_cond_uses_item(const gw_cond_t *c);

/* Whether c holds in ctx (borrowed). Never fails: an absent value is a
 * value of its own (see above). */
bool gw_cond_eval(const gw_cond_t *c, const gw_tpl_ctx_t *ctx);

/* JSON equality as defined above (a and b borrowed, neither NULL). */
bool gw_cond_json_equal(const json_t *a, const json_t *b);

#endif
