/*
 * gw_batch.c - batched calls (see gw_batch.h): the per-request plan of a
 * batch call (its unique values, their chunks, what each element sends)
 * and the matching of each chunk's answer back to the values. gw_agg runs
 * the exchanges and puts the results in place; nothing here does I/O.
 */
#include "gw_batch.h"
#include "gw_jpath.h"
#include "gw_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NONE ((size_t)-1)

typedef struct {
    char *text; /* compared as */
    size_t tlen;
    char *enc; /* sent as (percent-encoded) */
    size_t elen;
    size_t chunk;  /* NONE: too long to send */
    json_t *found; /* borrowed from the chunk's answer, set by gw_batch_match() */
} bval_t;

struct gw_batch_plan_s {
    size_t nitems;
    size_t *elem_val;     /* per element: its value's index, or NONE */
    gw_fail_t *elem_code; /* per element: why it is not sent */
    bval_t *vals;
    size_t nvals;
    size_t *order; /* the values sent, chunk by chunk */
    size_t nsent;
    size_t *first; /* chunk c: order[first[c] .. first[c + 1]) */
    size_t nchunks;
    size_t *htab; /* text -> value index + 1 (0: empty), open addressing */
    size_t hcap;  /* a power of two, over twice nvals at most */
};

void
gw_batch_free(gw_batch_t *b)
{
    if (b == NULL)
        return;
    gw_jpath_free(b->value);
    gw_jpath_free(b->match);
    free(b->param);
    free(b);
}

static bool
unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

bool
gw_batch_sep_ok(const char *sep, size_t len)
{
    /* sub-delimiters a query may hold as they are, and that an encoded
     * value never holds; not "&" and "=" (they end the parameter), not "+"
     * (a space in form encoding) */
    if (len == 0 || len > GW_BATCH_SEP_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (sep[i] == '\0' || strchr(",;:!$*'()@", sep[i]) == NULL)
            return false;
    return true;
}

bool
gw_batch_param_ok(const char *name, size_t len)
{
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!unreserved((unsigned char)name[i]))
            return false;
    return true;
}

bool
gw_batch_text(const json_t *v, char num[40], const char **s, size_t *len)
{
    if (json_is_string(v)) {
        *s = json_string_value(v);
        *len = json_string_length(v);
        return *len > 0 && memchr(*s, '\0', *len) == NULL;
    }
    if (json_is_integer(v)) {
        *len = (size_t)snprintf(num, 40, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        *s = num;
        return true;
    }
    if (json_is_real(v)) {
        char buf[32];
        *len = gw_json_real(json_real_value(v), buf);
        memcpy(num, buf, *len + 1);
        *s = num;
        return true;
    }
    return false;
}

static uint64_t
hash(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

/* The slot of text s in p's table: its value's, or the empty one it would take. */
static size_t *
slot(const gw_batch_plan_t *p, const char *s, size_t n)
{
    size_t i = (size_t)hash(s, n) & (p->hcap - 1);
    for (;; i = (i + 1) & (p->hcap - 1)) {
        size_t v = p->htab[i];
        if (v == 0)
            return &p->htab[i];
        const bval_t *x = &p->vals[v - 1];
        if (x->tlen == n && memcmp(x->text, s, n) == 0)
            return &p->htab[i];
    }
}

static size_t
encoded_len(const char *s, size_t n)
{
    size_t e = n;
    for (size_t i = 0; i < n; i++)
        if (!unreserved((unsigned char)s[i]))
            e += 2;
    return e;
}

static char *
encode(const char *s, size_t n, size_t elen)
{
    static const char hex[] = "0123456789ABCDEF";
    char *out = gw_malloc(elen + 1), *w = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (unreserved(c)) {
            *w++ = (char)c;
        } else {
            *w++ = '%';
            *w++ = hex[c >> 4];
            *w++ = hex[c & 15];
        }
    }
    *w = '\0';
    return out;
}

gw_batch_plan_t *
gw_batch_plan_new(const gw_batch_t *b, const json_t *items, bool need_object, size_t base_len)
{
    gw_batch_plan_t *p = gw_calloc(1, sizeof(*p));
    size_t n = json_array_size(items);
    p->nitems = n;
    p->elem_val = gw_calloc(n + 1, sizeof(size_t));
    p->elem_code = gw_calloc(n + 1, sizeof(gw_fail_t));
    p->vals = gw_calloc(n + 1, sizeof(bval_t));
    p->order = gw_calloc(n + 1, sizeof(size_t));
    p->first = gw_calloc(n + 2, sizeof(size_t));
    p->hcap = 16;
    while (p->hcap < 2 * n + 2)
        p->hcap *= 2;
    p->htab = gw_calloc(p->hcap, sizeof(size_t));
    /* "?param=" and the path: what every request has before its values */
    size_t fixed = base_len + 2 + strlen(b->param), seplen = strlen(b->sep);
    for (size_t k = 0; k < n; k++) {
        const json_t *e = json_array_get(items, k);
        const json_t *v = gw_jpath_get(b->value, e);
        p->elem_val[k] = NONE;
        char num[40];
        const char *s;
        size_t len;
        if (need_object && !json_is_object(e)) {
            p->elem_code[k] = GW_FAIL_INVALID_VALUE; /* nowhere to put its result */
            continue;
        }
        if (v == NULL || json_is_null(v)) {
            p->elem_code[k] = GW_FAIL_MISSING_VALUE;
            continue;
        }
        if (!gw_batch_text(v, num, &s, &len) || len > b->max_url_bytes) {
            p->elem_code[k] = GW_FAIL_INVALID_VALUE;
            continue;
        }
        size_t *at = slot(p, s, len);
        if (*at == 0) {
            bval_t *x = &p->vals[p->nvals];
            x->text = gw_malloc(len + 1);
            memcpy(x->text, s, len);
            x->text[len] = '\0';
            x->tlen = len;
            x->elen = encoded_len(s, len);
            x->enc = encode(s, len, x->elen);
            x->chunk = fixed + x->elen > b->max_url_bytes ? NONE : 0;
            *at = ++p->nvals;
        }
        p->elem_val[k] = *at - 1;
        if (p->vals[*at - 1].chunk == NONE) {
            p->elem_code[k] = GW_FAIL_INVALID_VALUE; /* alone too long for max_url_bytes */
            p->elem_val[k] = NONE;
        }
    }
    /* chunks: at most max values and max_url_bytes each, in first-seen order */
    size_t in_chunk = 0, used = 0;
    for (size_t v = 0; v < p->nvals; v++) {
        bval_t *x = &p->vals[v];
        if (x->chunk == NONE)
            continue;
        if (in_chunk > 0 && (in_chunk == b->max || used + seplen + x->elen > b->max_url_bytes)) {
            p->nchunks++;
            in_chunk = 0;
        }
        if (in_chunk == 0) {
            p->first[p->nchunks] = p->nsent;
            used = fixed;
        } else {
            used += seplen;
        }
        used += x->elen;
        x->chunk = p->nchunks;
        p->order[p->nsent++] = v;
        in_chunk++;
    }
    if (in_chunk > 0)
        p->nchunks++;
    p->first[p->nchunks] = p->nsent;
    return p;
}

void
gw_batch_plan_free(gw_batch_plan_t *p)
{
    if (p == NULL)
        return;
    for (size_t v = 0; v < p->nvals; v++) {
        free(p->vals[v].text);
        free(p->vals[v].enc);
    }
    free(p->vals);
    free(p->elem_val);
    free(p->elem_code);
    free(p->order);
    free(p->first);
    free(p->htab);
    free(p);
}

size_t
gw_batch_chunks(const gw_batch_plan_t *p)
{
    return p->nchunks;
}

size_t
gw_batch_values(const gw_batch_plan_t *p)
{
    return p->nsent;
}

gw_fail_t
gw_batch_elem(const gw_batch_plan_t *p, size_t k, size_t *chunk)
{
    if (k >= p->nitems)
        return GW_FAIL_INVALID_VALUE;
    if (p->elem_val[k] == NONE)
        return p->elem_code[k];
    *chunk = p->vals[p->elem_val[k]].chunk;
    return GW_FAIL_NONE;
}

void
gw_batch_query(const gw_batch_plan_t *p, const gw_batch_t *b, size_t c, bool has_query, gw_tpl_buf_t *out)
{
    gw_tpl_buf_add(out, has_query ? "&" : "?", 1);
    gw_tpl_buf_add(out, b->param, strlen(b->param));
    gw_tpl_buf_add(out, "=", 1);
    for (size_t i = p->first[c]; i < p->first[c + 1]; i++) {
        const bval_t *x = &p->vals[p->order[i]];
        if (i > p->first[c])
            gw_tpl_buf_add(out, b->sep, strlen(b->sep));
        gw_tpl_buf_add(out, x->enc, x->elen);
    }
}

gw_fail_t
gw_batch_match(gw_batch_plan_t *p, const gw_batch_t *b, size_t c, const json_t *arr)
{
    for (size_t i = p->first[c]; i < p->first[c + 1]; i++)
        p->vals[p->order[i]].found = NULL;
    if (!json_is_array(arr))
        return GW_FAIL_INVALID_VALUE;
    for (size_t k = 0; k < json_array_size(arr); k++) {
        json_t *e = json_array_get(arr, k);
        char num[40];
        const char *s;
        size_t len;
        if (!gw_batch_text(gw_jpath_get(b->match, e), num, &s, &len))
            continue;
        size_t v = *slot(p, s, len);
        if (v == 0)
            continue; /* not asked for */
        bval_t *x = &p->vals[v - 1];
        if (x->chunk == c && x->found == NULL)
            x->found = e; /* the first one wins */
    }
    return GW_FAIL_NONE;
}

json_t *
gw_batch_found(const gw_batch_plan_t *p, size_t k)
{
    if (k >= p->nitems || p->elem_val[k] == NONE)
        return NULL;
    return p->vals[p->elem_val[k]].found;
}
