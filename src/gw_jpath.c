/*
 * gw_jpath.c - dotted JSON paths (see gw_jpath.h): a compiled path is an
 * array of steps, each a key or an index; a selection (for allow/deny) is a
 * tree of such steps, so shaping visits an answer once whatever the number
 * of listed paths. Only the aggregator's per-call shaping and templates use
 * these, on parsed backend answers.
 */
#include "gw_jpath.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *key; /* NUL-terminated; NULL for an index step */
    size_t index; /* WILD: "[*]", every element */
} step_t;

#define WILD ((size_t)-1)

struct gw_jpath_s {
    char *src;
    size_t nsteps;
    step_t steps[];
};

/* --- compiling ------------------------------------------------------------ */

static bool
key_byte(unsigned char ch)
{
    return ch >= 0x20 && ch != 0x7f && ch != '.' && ch != '[' && ch != ']' && ch != '{' && ch != '}';
}

static gw_jpath_t *__attribute__((format(printf, 6, 7)))
compile_error(gw_jpath_t *p, size_t n, char *err, size_t errlen, size_t off, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        char what[128];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        snprintf(err, errlen, "path \"%s\": %s at offset %zu", p->src, what, off);
    }
    for (size_t i = 0; i < n; i++)
        free(p->steps[i].key);
    free(p->src);
    free(p);
    return NULL;
}

/* Why the byte at src[i] cannot continue a path. */
static gw_jpath_t *
bad_byte(gw_jpath_t *p, size_t n, char *err, size_t errlen, size_t i, bool after_index)
{
    unsigned char ch = (unsigned char)p->src[i];
    if (ch < 0x20 || ch == 0x7f)
        return compile_error(p, n, err, errlen, i, "control character 0x%02x", ch);
    if (after_index)
        return compile_error(p, n, err, errlen, i, "expected \".\" or \"[\" after \"]\", not \"%c\"", ch);
    return compile_error(p, n, err, errlen, i, "\"%c\" is not allowed in a key", ch);
}

static gw_jpath_t *
compile(const char *src, bool wild, char *err, size_t errlen)
{
    if (src == NULL)
        src = "";
    size_t len = strlen(src);
    gw_jpath_t *p = gw_calloc(1, sizeof(*p) + GW_JPATH_MAX_DEPTH * sizeof(step_t));
    p->src = gw_strndup(src, len);
    size_t i = 0, n = 0;
    bool need_key = false; /* right after a ".": "[" would leave the key empty */
    while (i < len || need_key) {
        if (n == GW_JPATH_MAX_DEPTH)
            return compile_error(p, n, err, errlen, i, "more than %d steps", GW_JPATH_MAX_DEPTH);
        bool is_index = !need_key && src[i] == '[';
        if (is_index && i + 2 < len && src[i + 1] == '*' && src[i + 2] == ']') {
            if (!wild)
                return compile_error(p, n, err, errlen, i, "\"[*]\" selects several values: not allowed here");
            i += 3;
            p->steps[n].key = NULL;
            p->steps[n].index = WILD;
        } else if (is_index) {
            size_t start = ++i;
            size_t v = 0;
            while (i < len && src[i] >= '0' && src[i] <= '9' && i - start < 10)
                v = v * 10 + (size_t)(src[i++] - '0');
            if (i == start)
                return compile_error(p, n, err, errlen, start, "an index must be a decimal number");
            if (i - start > 9 || v > GW_JPATH_MAX_INDEX)
                return compile_error(p, n, err, errlen, start, "index too large (at most 9 digits)");
            if (src[start] == '0' && i - start > 1)
                return compile_error(p, n, err, errlen, start, "an index has no leading zeros");
            if (i >= len || src[i] != ']')
                return compile_error(p, n, err, errlen, i, "expected \"]\"");
            i++;
            p->steps[n].key = NULL;
            p->steps[n].index = v;
        } else {
            size_t start = i;
            while (i < len && key_byte((unsigned char)src[i]))
                i++;
            if (i == start) {
                if (i < len && src[i] != '.' && src[i] != '[')
                    return bad_byte(p, n, err, errlen, i, false);
                return compile_error(p, n, err, errlen, i, "empty key");
            }
            p->steps[n].key = gw_strndup(src + start, i - start);
        }
        n++;
        need_key = false;
        if (i == len)
            break;
        if (src[i] == '.') {
            i++;
            need_key = true;
        } else if (src[i] != '[') {
            return bad_byte(p, n, err, errlen, i, is_index);
        }
    }
    p->nsteps = n;
    return p;
}

gw_jpath_t *
gw_jpath_compile(const char *src, char *err, size_t errlen)
{
    return compile(src, false, err, errlen);
}

gw_jpath_t *
gw_jpath_compile_wild(const char *src, char *err, size_t errlen)
{
    return compile(src, true, err, errlen);
}

void
gw_jpath_free(gw_jpath_t *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->nsteps; i++)
        free(p->steps[i].key);
    free(p->src);
    free(p);
}

const char *
gw_jpath_text(const gw_jpath_t *p)
{
    return p->src;
}

bool
gw_jpath_is_root(const gw_jpath_t *p)
{
    return p->nsteps == 0;
}

/* --- get, set, delete ----------------------------------------------------- */

static json_t *
step_get(const json_t *v, const step_t *s)
{
    if (s->key != NULL)
        return json_is_object(v) ? json_object_get(v, s->key) : NULL;
    return json_is_array(v) ? json_array_get(v, s->index) : NULL;
}

/* The value after the first n steps of p, or NULL. */
static json_t *
walk(const gw_jpath_t *p, size_t n, const json_t *root)
{
    json_t *v = (json_t *)root;
    for (size_t i = 0; i < n && v != NULL; i++)
        v = step_get(v, &p->steps[i]);
    return v;
}

json_t *
gw_jpath_get(const gw_jpath_t *p, const json_t *root)
{
    return walk(p, p->nsteps, root);
}

/* Whether container v can take step s as a new or replaced member. */
static bool
can_put(const json_t *v, const step_t *s)
{
    if (s->key != NULL)
        return json_is_object(v);
    return json_is_array(v) && s->index <= json_array_size(v);
}

static int
put(json_t *v, const step_t *s, json_t *value)
{
    if (s->key != NULL)
        return json_object_set_new(v, s->key, value) == 0 ? GW_OK : GW_ERR;
    if (s->index == json_array_size(v))
        return json_array_append_new(v, value) == 0 ? GW_OK : GW_ERR;
    return json_array_set_new(v, s->index, value) == 0 ? GW_OK : GW_ERR;
}

/* replace_at() below: a copy of node (shallow) whose value at steps d.. of
 * p is value (stolen), or NULL (value dropped) when a step finds nothing. */
static json_t *
replace_at(const json_t *node, const gw_jpath_t *p, size_t d, json_t *value)
{
    if (d == p->nsteps)
        return value;
    const step_t *s = &p->steps[d];
    json_t *child = step_get(node, s);
    if (child == NULL) {
        json_decref(value);
        return NULL;
    }
    json_t *nc = replace_at(child, p, d + 1, value);
    if (nc == NULL)
        return NULL;
    json_t *copy = json_copy((json_t *)node);
    if (copy == NULL || put(copy, s, nc) != GW_OK) {
        json_decref(copy);
        return NULL;
    }
    return copy;
}

json_t *
gw_jpath_replace(const json_t *root, const gw_jpath_t *p, json_t *value)
{
    if (root == NULL) {
        json_decref(value);
        return NULL;
    }
    return replace_at(root, p, 0, value);
}

bool
gw_jpath_is_key(const gw_jpath_t *p)
{
    return p->nsteps == 1 && p->steps[0].key != NULL;
}

int
gw_jpath_set(json_t *root, const gw_jpath_t *p, json_t *value)
{
    if (p->nsteps == 0 || root == NULL) {
        json_decref(value);
        return GW_ERR;
    }
    /* Check first, then change: a failure leaves root untouched. */
    json_t *v = root;
    size_t k = 0; /* steps that exist, up to the parent of the last one */
    while (k + 1 < p->nsteps) {
        json_t *next = step_get(v, &p->steps[k]);
        if (next == NULL)
            break;
        v = next;
        k++;
    }
    if (!can_put(v, &p->steps[k])) {
        json_decref(value);
        return GW_ERR;
    }
    /* Steps k+1.. are created: each new array is empty, so only index 0. */
    for (size_t i = k + 1; i < p->nsteps; i++) {
        if (p->steps[i].key == NULL && p->steps[i].index != 0) {
            json_decref(value);
            return GW_ERR;
        }
    }
    for (size_t i = k; i + 1 < p->nsteps; i++) {
        json_t *child = p->steps[i + 1].key != NULL ? json_object() : json_array();
        if (child == NULL || put(v, &p->steps[i], child) != GW_OK) {
            json_decref(value);
            return GW_ERR; /* only on out-of-memory inside jansson */
        }
        v = child;
    }
    return put(v, &p->steps[p->nsteps - 1], value);
}

bool
gw_jpath_delete(json_t *root, const gw_jpath_t *p)
{
    if (p->nsteps == 0)
        return false;
    json_t *parent = walk(p, p->nsteps - 1, root);
    const step_t *s = &p->steps[p->nsteps - 1];
    if (parent == NULL)
        return false;
    if (s->key != NULL)
        return json_is_object(parent) && json_object_del(parent, s->key) == 0;
    return json_is_array(parent) && json_array_remove(parent, s->index) == 0;
}

/* --- "[*]": every element ----------------------------------------------- */

size_t
gw_jpath_wildcards(const gw_jpath_t *p)
{
    size_t n = 0;
    for (size_t i = 0; i < p->nsteps; i++)
        n += p->steps[i].key == NULL && p->steps[i].index == WILD;
    return n;
}

/* A new path of steps [from, to) of p, with its text rebuilt. */
static gw_jpath_t *
sub_path(const gw_jpath_t *p, size_t from, size_t to)
{
    gw_jpath_t *q = gw_calloc(1, sizeof(*q) + (to - from) * sizeof(step_t));
    size_t cap = 1;
    for (size_t i = from; i < to; i++)
        cap += p->steps[i].key ? strlen(p->steps[i].key) + 1 : 12;
    q->src = gw_malloc(cap);
    size_t w = 0;
    for (size_t i = from; i < to; i++) {
        const step_t *s = &p->steps[i];
        q->steps[q->nsteps].key = s->key ? gw_strdup(s->key) : NULL;
        q->steps[q->nsteps].index = s->index;
        q->nsteps++;
        if (s->key)
            w += (size_t)snprintf(q->src + w, cap - w, "%s%s", w ? "." : "", s->key);
        else if (s->index == WILD)
            w += (size_t)snprintf(q->src + w, cap - w, "[*]");
        else
            w += (size_t)snprintf(q->src + w, cap - w, "[%zu]", s->index);
    }
    q->src[w] = '\0';
    return q;
}

int
gw_jpath_split_wild(const gw_jpath_t *p, gw_jpath_t **before, gw_jpath_t **after)
{
    size_t k = 0;
    while (k < p->nsteps && !(p->steps[k].key == NULL && p->steps[k].index == WILD))
        k++;
    if (k == p->nsteps)
        return GW_ERR;
    *before = sub_path(p, 0, k);
    *after = sub_path(p, k + 1, p->nsteps);
    return GW_OK;
}

static void
collect(const gw_jpath_t *p, size_t d, const json_t *v, json_t *out)
{
    for (; d < p->nsteps && v != NULL; d++) {
        const step_t *s = &p->steps[d];
        if (s->key == NULL && s->index == WILD) {
            for (size_t k = 0; json_is_array(v) && k < json_array_size(v); k++)
                collect(p, d + 1, json_array_get(v, k), out);
            return;
        }
        v = step_get(v, s);
    }
    if (v != NULL)
        json_array_append((json_t *)out, (json_t *)v);
}

json_t *
gw_jpath_collect(const gw_jpath_t *p, const json_t *root)
{
    json_t *out = json_array();
    collect(p, 0, root, out);
    return out;
}

/* --- selections: allow and deny ------------------------------------------- */

typedef struct sel_node_s sel_node_t;
typedef struct sel_kid_s sel_kid_t;

struct sel_node_s {
    bool whole;      /* a listed path ends here: the whole value is selected */
    sel_kid_t *kids; /* keys in first-listed order, then indexes ascending */
    size_t nkids, cap;
};

struct sel_kid_s {
    step_t step;
    sel_node_t node;
};

struct gw_jpath_sel_s {
    sel_node_t root;
};

static bool
same_step(const step_t *a, const step_t *b)
{
    if (a->key == NULL || b->key == NULL)
        return a->key == NULL && b->key == NULL && a->index == b->index;
    return strcmp(a->key, b->key) == 0;
}

static void
sel_add(sel_node_t *n, const gw_jpath_t *p)
{
    for (size_t d = 0; d < p->nsteps && !n->whole; d++) {
        const step_t *s = &p->steps[d];
        size_t i = 0;
        while (i < n->nkids && !same_step(&n->kids[i].step, s))
            i++;
        if (i == n->nkids) {
            gw_grow((void **)&n->kids, &n->cap, n->nkids + 1, sizeof(sel_kid_t));
            memset(&n->kids[i], 0, sizeof(sel_kid_t));
            n->kids[i].step.key = s->key != NULL ? gw_strdup(s->key) : NULL;
            n->kids[i].step.index = s->index;
            n->nkids++;
        }
        n = &n->kids[i].node;
    }
    /* Listing "a" after "a.b" makes the kids under "a" moot: whole wins. */
    n->whole = true;
}

static int
index_order(const void *a, const void *b)
{
    const sel_kid_t *x = a, *y = b;
    return x->step.index < y->step.index ? -1 : x->step.index > y->step.index;
}

/* Keys keep their listed order (qsort is not stable, so they are moved
 * first by hand); indexes are sorted so arrays are walked in order. */
static void
sel_sort(sel_node_t *n)
{
    if (n->nkids == 0)
        return;
    size_t nkeys = 0;
    for (size_t i = 0; i < n->nkids; i++) {
        if (n->kids[i].step.key != NULL) {
            sel_kid_t k = n->kids[i];
            memmove(&n->kids[nkeys + 1], &n->kids[nkeys], (i - nkeys) * sizeof(sel_kid_t));
            n->kids[nkeys++] = k;
        }
    }
    qsort(n->kids + nkeys, n->nkids - nkeys, sizeof(sel_kid_t), index_order);
    for (size_t i = 0; i < n->nkids; i++)
        sel_sort(&n->kids[i].node);
}

gw_jpath_sel_t *
gw_jpath_sel_new(gw_jpath_t *const *paths, size_t n)
{
    gw_jpath_sel_t *sel = gw_calloc(1, sizeof(*sel));
    for (size_t i = 0; i < n; i++)
        sel_add(&sel->root, paths[i]);
    sel_sort(&sel->root);
    return sel;
}

static void
sel_node_free(sel_node_t *n)
{
    for (size_t i = 0; i < n->nkids; i++) {
        free(n->kids[i].step.key);
        sel_node_free(&n->kids[i].node);
    }
    free(n->kids);
}

void
gw_jpath_sel_free(gw_jpath_sel_t *sel)
{
    if (sel == NULL)
        return;
    sel_node_free(&sel->root);
    free(sel);
}

/* New reference to what n keeps of v, or NULL when it keeps nothing. */
static json_t *
sel_allow(const json_t *v, const sel_node_t *n)
{
    if (n->whole)
        return json_incref((json_t *)v);
    json_t *out = NULL;
    if (json_is_object(v)) {
        for (size_t i = 0; i < n->nkids; i++) {
            const sel_kid_t *k = &n->kids[i];
            json_t *c = k->step.key != NULL ? json_object_get(v, k->step.key) : NULL;
            json_t *r = c != NULL ? sel_allow(c, &k->node) : NULL;
            if (r == NULL)
                continue;
            if (out == NULL)
                out = json_object();
            json_object_set_new(out, k->step.key, r);
        }
    } else if (json_is_array(v)) {
        for (size_t i = 0; i < n->nkids; i++) {
            const sel_kid_t *k = &n->kids[i];
            json_t *c = k->step.key == NULL ? json_array_get(v, k->step.index) : NULL;
            json_t *r = c != NULL ? sel_allow(c, &k->node) : NULL;
            if (r == NULL)
                continue;
            if (out == NULL)
                out = json_array();
            json_array_append_new(out, r);
        }
    }
    return out;
}

json_t *
gw_jpath_allow(const json_t *root, const gw_jpath_sel_t *sel)
{
    if (root == NULL)
        return NULL;
    json_t *out = sel_allow(root, &sel->root);
    if (out == NULL && json_is_object(root))
        out = json_object();
    else if (out == NULL && json_is_array(root))
        out = json_array();
    return out;
}

/* New reference to v without what n selects; NULL when v itself goes.
 * Returns v itself (incref'd) when nothing under it is removed, so
 * untouched subtrees are never copied. */
static json_t *
sel_deny(json_t *v, const sel_node_t *n)
{
    if (n->whole)
        return NULL;
    json_t *out = NULL;
    if (json_is_object(v)) {
        for (size_t i = 0; i < n->nkids; i++) {
            const sel_kid_t *k = &n->kids[i];
            json_t *c = k->step.key != NULL ? json_object_get(v, k->step.key) : NULL;
            if (c == NULL)
                continue;
            json_t *r = sel_deny(c, &k->node);
            if (r == c) {
                json_decref(r);
                continue;
            }
            if (out == NULL)
                out = json_copy(v); /* shallow */
            if (r == NULL)
                json_object_del(out, k->step.key);
            else
                json_object_set_new(out, k->step.key, r);
        }
    } else if (json_is_array(v)) {
        /* From the highest index down, so a removal never shifts an
         * element still to be visited: indexes keep meaning v's. */
        for (size_t i = n->nkids; i-- > 0;) {
            const sel_kid_t *k = &n->kids[i];
            json_t *c = k->step.key == NULL ? json_array_get(v, k->step.index) : NULL;
            if (c == NULL)
                continue;
            json_t *r = sel_deny(c, &k->node);
            if (r == c) {
                json_decref(r);
                continue;
            }
            if (out == NULL)
                out = json_copy(v);
            if (r == NULL)
                json_array_remove(out, k->step.index);
            else
                json_array_set_new(out, k->step.index, r);
        }
    }
    return out != NULL ? out : json_incref(v);
}

json_t *
gw_jpath_deny(const json_t *root, const gw_jpath_sel_t *sel)
{
    if (root == NULL)
        return NULL;
    return sel_deny((json_t *)root, &sel->root);
}
