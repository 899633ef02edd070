/*
 * gw_cond.c - call conditions of aggregate routes ("when"; see gw_cond.h).
 * A condition is a tree: leaves compare or test one value made by a JSON
 * template (gw_template.h), inner nodes combine their children. Compiling
 * checks every key, limit and name; evaluating renders each leaf's value
 * (a borrowed or small new reference) and compares it, so it allocates
 * little and cannot fail.
 */
#include "gw_cond.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { COND_EQUALS, COND_IN, COND_EXISTS, COND_ALL, COND_ANY, COND_NOT } cond_kind_t;

struct gw_cond_s {
    cond_kind_t kind;
    gw_tpl_json_t *value; /* EQUALS, IN, EXISTS */
    json_t *operand;      /* EQUALS: the value; IN: the array of values (owned copies) */
    gw_cond_t **kids;     /* ALL, ANY, NOT (one) */
    size_t nkids;
    uint64_t deps; /* this node and below */
    bool item;
};

void
gw_cond_free(gw_cond_t *c)
{
    if (c == NULL)
        return;
    gw_tpl_json_free(c->value);
    json_decref(c->operand);
    for (size_t i = 0; i < c->nkids; i++)
        gw_cond_free(c->kids[i]);
    free(c->kids);
    free(c);
}

uint64_t
gw_cond_deps(const gw_cond_t *c)
{
    return c->deps;
}

bool
gw_cond_uses_item(const gw_cond_t *c)
{
    return c->item;
}

/* --- compiling ----------------------------------------------------------- */

typedef struct {
    const gw_tpl_scope_t *scope;
    gw_cond_err_t *err;
    size_t nodes;
} comp_t;

static void
step_key(comp_t *k, const char *key)
{
    if (k->err->nsteps < GW_NELEM(k->err->steps)) {
        k->err->steps[k->err->nsteps].key = key;
        k->err->steps[k->err->nsteps].index = 0;
    }
    k->err->nsteps++;
}

static void
step_index(comp_t *k, size_t i)
{
    if (k->err->nsteps < GW_NELEM(k->err->steps)) {
        k->err->steps[k->err->nsteps].key = NULL;
        k->err->steps[k->err->nsteps].index = i;
    }
    k->err->nsteps++;
}

/* The error's location is the steps pushed so far (plus key when not NULL). */
static int __attribute__((format(printf, 3, 4))) comp_fail(comp_t *k, const char *key, const char *fmt, ...)
{
    if (key != NULL)
        step_key(k, key);
    if (k->err->nsteps > GW_NELEM(k->err->steps))
        k->err->nsteps = GW_NELEM(k->err->steps);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(k->err->msg, sizeof(k->err->msg), fmt, ap);
    va_end(ap);
    return GW_ERR;
}

#define FORMS                                                                                                          \
    "a condition is {\"value\": T, \"equals\": V}, {\"value\": T, \"in\": [V, ...]}, {\"exists\": T}, "                \
    "{\"all\": [...]}, {\"any\": [...]} or {\"not\": {...}}"

/* The template of "value" or "exists" (at key in v). */
static int
comp_tpl(comp_t *k, gw_cond_t *c, const json_t *v, const char *key)
{
    const json_t *t = json_object_get(v, key);
    if (!json_is_string(t))
        return comp_fail(k, key, "must be a template naming a value, like \"{customer.tier}\"");
    char terr[512];
    c->value = gw_tpl_json_compile(t, k->scope, terr, sizeof(terr));
    if (c->value == NULL)
        return comp_fail(k, key, "%s", terr);
    if (gw_tpl_json_is_const(c->value))
        return comp_fail(k, key, "\"%s\" names no value (no placeholder), so the condition would never change",
                         json_string_value(t));
    c->deps |= gw_tpl_json_deps(c->value);
    c->item = c->item || gw_tpl_json_uses_item(c->value);
    return GW_OK;
}

static int comp_node(comp_t *k, gw_cond_t *c, const json_t *v, size_t depth);

/* A new child of c compiled from v (the caller has pushed its location). */
static int
comp_kid(comp_t *k, gw_cond_t *c, const json_t *v, size_t depth)
{
    gw_cond_t *kid = gw_calloc(1, sizeof(*kid));
    c->kids[c->nkids++] = kid;
    if (comp_node(k, kid, v, depth) != GW_OK)
        return GW_ERR;
    c->deps |= kid->deps;
    c->item = c->item || kid->item;
    return GW_OK;
}

static int
comp_node(comp_t *k, gw_cond_t *c, const json_t *v, size_t depth)
{
    if (depth > GW_COND_MAX_DEPTH)
        return comp_fail(k, NULL, "conditions nest at most %d deep", GW_COND_MAX_DEPTH);
    if (++k->nodes > GW_COND_MAX_NODES)
        return comp_fail(k, NULL, "at most %d conditions in one \"when\"", GW_COND_MAX_NODES);
    if (!json_is_object(v) || json_object_size(v) == 0)
        return comp_fail(k, NULL, "must be a condition: " FORMS);
    static const char *const keys[] = {"value", "equals", "in", "exists", "all", "any", "not"};
    const char *key;
    json_t *x;
    json_object_foreach((json_t *)v, key, x)
    {
        bool known = false;
        for (size_t i = 0; i < GW_NELEM(keys); i++)
            known = known || strcmp(key, keys[i]) == 0;
        if (!known)
            return comp_fail(k, key, "unknown operator \"%s\": " FORMS, key);
    }
    bool has_value = json_object_get(v, "value") != NULL, has_eq = json_object_get(v, "equals") != NULL,
         has_in = json_object_get(v, "in") != NULL;
    if (has_eq && has_in)
        return comp_fail(k, "in", "\"equals\" and \"in\" cannot be used together: keep one");
    int forms = (has_value || has_eq || has_in) + (json_object_get(v, "exists") != NULL) +
                (json_object_get(v, "all") != NULL) + (json_object_get(v, "any") != NULL) +
                (json_object_get(v, "not") != NULL);
    if (forms > 1)
        return comp_fail(k, NULL,
                         "one test per condition (value, exists, all, any or not): combine them with "
                         "\"all\" or \"any\"");
    if (has_value || has_eq || has_in) {
        if (!has_value)
            return comp_fail(k, has_eq ? "equals" : "in",
                             "needs \"value\": the template to compare, like \"{customer.tier}\"");
        if (!has_eq && !has_in)
            return comp_fail(k, "value", "needs \"equals\" or \"in\": what to compare it with");
        if (comp_tpl(k, c, v, "value") != GW_OK)
            return GW_ERR;
        if (has_eq) {
            c->kind = COND_EQUALS;
            c->operand = json_deep_copy(json_object_get(v, "equals"));
            return GW_OK;
        }
        const json_t *in = json_object_get(v, "in");
        if (!json_is_array(in) || json_array_size(in) == 0 || json_array_size(in) > GW_COND_MAX_IN)
            return comp_fail(k, "in", "must be an array of 1 to %d values, like [\"gold\", \"platinum\"]",
                             GW_COND_MAX_IN);
        c->kind = COND_IN;
        c->operand = json_deep_copy(in);
        return GW_OK;
    }
    if (json_object_get(v, "exists") != NULL) {
        c->kind = COND_EXISTS;
        return comp_tpl(k, c, v, "exists");
    }
    if (json_object_get(v, "not") != NULL) {
        c->kind = COND_NOT;
        c->kids = gw_calloc(1, sizeof(gw_cond_t *));
        step_key(k, "not");
        if (comp_kid(k, c, json_object_get(v, "not"), depth + 1) != GW_OK)
            return GW_ERR;
        k->err->nsteps--;
        return GW_OK;
    }
    const char *op = json_object_get(v, "all") != NULL ? "all" : "any";
    const json_t *list = json_object_get(v, op);
    c->kind = op[1] == 'l' ? COND_ALL : COND_ANY;
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > GW_COND_MAX_KIDS)
        return comp_fail(k, op, "must be an array of 1 to %d conditions", GW_COND_MAX_KIDS);
    c->kids = gw_calloc(json_array_size(list), sizeof(gw_cond_t *));
    step_key(k, op);
    for (size_t i = 0; i < json_array_size(list); i++) {
        step_index(k, i);
        if (comp_kid(k, c, json_array_get(list, i), depth + 1) != GW_OK)
            return GW_ERR;
        k->err->nsteps--;
    }
    k->err->nsteps--;
    return GW_OK;
}

gw_cond_t *
gw_cond_compile(const json_t *v, const gw_tpl_scope_t *scope, gw_cond_err_t *err)
{
    comp_t k = {.scope = scope, .err = err, .nodes = 0};
    err->nsteps = 0;
    err->msg[0] = '\0';
    gw_cond_t *c = gw_calloc(1, sizeof(*c));
    if (comp_node(&k, c, v, 1) != GW_OK) {
        gw_cond_free(c);
        return NULL;
    }
    return c;
}

/* --- evaluating ---------------------------------------------------------- */

/* An integer and a real are equal when the real is exactly that integer. */
static bool
int_real_equal(json_int_t i, double r)
{
    /* the int64 range as doubles: [-2^63, 2^63) */
    if (!(r >= -9223372036854775808.0 && r < 9223372036854775808.0))
        return false;
    json_int_t t = (json_int_t)r; /* truncates: r is integral when it reads back the same */
    return (double)t == r && t == i;
}

bool
gw_cond_json_equal(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b)) {
        if (json_is_integer(a) && json_is_integer(b))
            return json_integer_value(a) == json_integer_value(b);
        if (json_is_real(a) && json_is_real(b))
            return json_real_value(a) == json_real_value(b);
        if (json_is_integer(a))
            return int_real_equal(json_integer_value(a), json_real_value(b));
        return int_real_equal(json_integer_value(b), json_real_value(a));
    }
    if (json_typeof(a) != json_typeof(b))
        return false;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b), json_string_length(a)) == 0;
    case JSON_ARRAY:
        if (json_array_size(a) != json_array_size(b))
            return false;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!gw_cond_json_equal(json_array_get(a, i), json_array_get(b, i)))
                return false;
        return true;
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b))
            return false;
        const char *key;
        size_t klen;
        json_t *av;
        json_object_keylen_foreach((json_t *)a, key, klen, av)
        {
            const json_t *bv = json_object_getn(b, key, klen);
            if (bv == NULL || !gw_cond_json_equal(av, bv))
                return false;
        }
        return true;
    }
    default: /* true, false, null */ return true;
    }
}

bool
gw_cond_eval(const gw_cond_t *c, const gw_tpl_ctx_t *ctx)
{
    switch (c->kind) {
    case COND_ALL:
        for (size_t i = 0; i < c->nkids; i++)
            if (!gw_cond_eval(c->kids[i], ctx))
                return false;
        return true;
    case COND_ANY:
        for (size_t i = 0; i < c->nkids; i++)
            if (gw_cond_eval(c->kids[i], ctx))
                return true;
        return false;
    case COND_NOT: return !gw_cond_eval(c->kids[0], ctx);
    default: break;
    }
    gw_tpl_err_t e;
    json_t *v = gw_tpl_json_render(c->value, ctx, &e); /* NULL: absent */
    bool holds = false;
    if (v != NULL) {
        if (c->kind == COND_EXISTS) {
            holds = !json_is_null(v);
        } else if (c->kind == COND_EQUALS) {
            holds = gw_cond_json_equal(v, c->operand);
        } else {
            for (size_t i = 0; i < json_array_size(c->operand) && !holds; i++)
                holds = gw_cond_json_equal(v, json_array_get(c->operand, i));
        }
    }
    json_decref(v);
    return holds;
}
