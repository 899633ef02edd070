/*
 * gw_template.c - call templates of aggregate routes (see gw_template.h).
 * A text template is a list of parts, each a literal or a placeholder whose
 * source (path parameter, query parameter, header, call answer, foreach
 * item) was resolved at compile time; rendering looks each value up,
 * converts it to text and encodes it for the part's context. A JSON body
 * template is a tree of constant subtrees, text templates and whole-value
 * placeholders.
 */
#include "gw_template.h"
#include "gw_json.h"
#include "gw_http.h"
#include "gw_jpath.h"
#include "gw_router.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Text rendered inside a JSON body string may be longer than a target or a
 * header, but still has a bound. */
#define JSON_TEXT_LIMIT (1024 * 1024)

typedef enum { MODE_TARGET, MODE_HEADER, MODE_TEXT } tpl_mode_t;

typedef enum { SRC_PARAM, SRC_QUERY, SRC_HEADER, SRC_CALL, SRC_ITEM } src_t;

typedef struct {
    src_t src;
    char *name; /* parameter, query, header or call name (NUL-terminated) */
    size_t namelen;
    size_t call;      /* SRC_CALL: index in the scope */
    gw_jpath_t *path; /* SRC_CALL, SRC_ITEM: NULL for the whole value */
    char *text;       /* "{user.id}" as written, for messages */
    bool in_query;    /* MODE_TARGET: after the first literal "?" */
} ph_t;

typedef struct {
    char *lit; /* literal text with "{{" and "}}" unescaped; NULL for a placeholder */
    size_t litlen;
    ph_t *ph;
} part_t;

struct gw_tpl_s {
    tpl_mode_t mode;
    char *src;
    part_t *parts;
    size_t nparts, cap;
    uint64_t deps;
    bool item; /* a placeholder reads the foreach item */
};

/* --- small helpers ---------------------------------------------------------- */

static bool
unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~';
}

static bool
is_ctl(unsigned char c)
{
    return c < 0x20 || c == 0x7f;
}

static bool
tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Decodes one byte of a form-encoded query component at raw[*i] ("+" is a
 * space, "%XX" a byte). -1 for a bad escape. */
static int
query_byte(const char *raw, size_t len, size_t *i)
{
    char c = raw[*i];
    if (c == '+') {
        (*i)++;
        return ' ';
    }
    if (c != '%') {
        (*i)++;
        return (unsigned char)c;
    }
    int hi = *i + 2 < len ? gw_router_hexval(raw[*i + 1]) : -1;
    int lo = hi >= 0 ? gw_router_hexval(raw[*i + 2]) : -1;
    if (lo < 0)
        return -1;
    *i += 3;
    return hi * 16 + lo;
}

/* Same bytes as jansson accepts: no overlong forms, no surrogates, nothing
 * above U+10FFFF. */
static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i], cp;
        size_t k;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (n - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

static void __attribute__((format(printf, 3, 4))) set_err(gw_tpl_err_t *e, gw_fail_t code, const char *fmt, ...)
{
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->detail, sizeof(e->detail), fmt, ap);
    va_end(ap);
}

static void __attribute__((format(printf, 3, 4))) compile_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* --- the output buffer ------------------------------------------------------ */

void
gw_tpl_buf_free(gw_tpl_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void
gw_tpl_buf_add(gw_tpl_buf_t *b, const char *s, size_t n)
{
    gw_grow((void **)&b->data, &b->cap, b->len + n + 1, 1);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

/* Makes room for n more bytes (and a NUL); false when over the limit. */
static bool
buf_room(gw_tpl_buf_t *b, size_t n)
{
    size_t limit = b->limit ? b->limit : GW_TPL_MAX_LEN;
    if (n > limit || b->len > limit - n)
        return false;
    gw_grow((void **)&b->data, &b->cap, b->len + n + 1, 1);
    return true;
}

/* --- compiling text templates ------------------------------------------- */

static void
ph_free(ph_t *ph)
{
    if (ph == NULL)
        return;
    free(ph->name);
    free(ph->text);
    gw_jpath_free(ph->path);
    free(ph);
}

void
gw_tpl_free(gw_tpl_t *t)
{
    if (t == NULL)
        return;
    for (size_t i = 0; i < t->nparts; i++) {
        free(t->parts[i].lit);
        ph_free(t->parts[i].ph);
    }
    free(t->parts);
    free(t->src);
    free(t);
}

static void
add_part(gw_tpl_t *t, char *lit, size_t litlen, ph_t *ph)
{
    gw_grow((void **)&t->parts, &t->cap, t->nparts + 1, sizeof(part_t));
    t->parts[t->nparts].lit = lit;
    t->parts[t->nparts].litlen = litlen;
    t->parts[t->nparts].ph = ph;
    t->nparts++;
}

/* Index of name[0..len) in names, or -1. */
static long
find_name(const char *const *names, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; names != NULL && i < n; i++)
        if (strlen(names[i]) == len && memcmp(names[i], name, len) == 0)
            return (long)i;
    return -1;
}

/* The jpath after a call name or "item": "" (whole value), ".a.b" or "[0].id". */
static int
compile_rest(ph_t *ph, const char *rest, size_t restlen, char *err, size_t errlen)
{
    if (restlen == 0)
        return GW_OK;
    if (rest[0] == '.') {
        rest++;
        restlen--;
        if (restlen == 0 || rest[0] == '.' || rest[0] == '[') {
            compile_err(err, errlen, "\"%s\": empty key after \".\"", ph->text);
            return GW_ERR;
        }
    }
    char *src = gw_strndup(rest, restlen);
    char jerr[192];
    ph->path = gw_jpath_compile(src, jerr, sizeof(jerr));
    free(src);
    if (ph->path == NULL) {
        compile_err(err, errlen, "\"%s\": %s", ph->text, jerr);
        return GW_ERR;
    }
    return GW_OK;
}

/* Parses the placeholder text[0..len) ("{...}") against scope. */
static ph_t *
compile_ph(const char *text, size_t len, const gw_tpl_scope_t *scope, uint64_t *deps, char *err, size_t errlen)
{
    ph_t *ph = gw_calloc(1, sizeof(*ph));
    ph->text = gw_strndup(text, len);
    const char *in = text + 1;
    size_t inlen = len - 2;
    size_t nlen = 0;
    while (nlen < inlen && in[nlen] != '.' && in[nlen] != '[')
        nlen++;
    const char *rest = in + nlen;
    size_t restlen = inlen - nlen;
    if (inlen == 0) {
        compile_err(err, errlen, "empty placeholder \"{}\" (write \"{{}}\" for literal braces)");
        goto fail;
    }
    if (nlen == 0) {
        compile_err(err, errlen, "\"%s\": a placeholder starts with a name", ph->text);
        goto fail;
    }
    enum { NOT_RESERVED, QUERY, HEADER, ITEM } reserved = NOT_RESERVED;
    static const char *const reserved_names[] = {"", "query", "header", "item"};
    if (nlen == 5 && memcmp(in, "query", 5) == 0)
        reserved = QUERY;
    else if (nlen == 6 && memcmp(in, "header", 6) == 0)
        reserved = HEADER;
    else if (nlen == 4 && memcmp(in, "item", 4) == 0)
        reserved = ITEM;
    long param = find_name(scope->params, scope->nparams, in, nlen);
    long call = find_name(scope->calls, scope->ncalls, in, nlen);
    if (scope->any_param && reserved == NOT_RESERVED && call < 0)
        param = 0; /* resolved by name when rendered */
    if (reserved != NOT_RESERVED && (param >= 0 || call >= 0)) {
        const char *what = param >= 0 ? "path parameter" : "call";
        compile_err(err, errlen, "\"%s\": \"%s\" is reserved and is also the name of a %s: rename the %s", ph->text,
                    reserved_names[reserved], what, what);
        goto fail;
    }
    if (param >= 0 && call >= 0) {
        compile_err(err, errlen, "\"%s\" is ambiguous: \"%.*s\" is both a path parameter and a call: rename one",
                    ph->text, (int)nlen, in);
        goto fail;
    }
    if (reserved == NOT_RESERVED && param < 0 && call < 0) {
        compile_err(err, errlen,
                    "unknown name \"%.*s\" in \"%s\": not a path parameter, a call, query.*, header.* or item",
                    (int)nlen, in, ph->text);
        goto fail;
    }
    if (reserved == QUERY || reserved == HEADER) {
        const char *rname = reserved_names[reserved];
        if (restlen < 2 || rest[0] != '.') {
            compile_err(err, errlen, "\"%s\": %s needs a name, as in {%s.NAME}", ph->text, rname, rname);
            goto fail;
        }
        ph->src = reserved == HEADER ? SRC_HEADER : SRC_QUERY;
        ph->name = gw_strndup(rest + 1, restlen - 1);
        ph->namelen = restlen - 1;
        for (size_t i = 0; reserved == HEADER && i < ph->namelen; i++) {
            if (!tchar((unsigned char)ph->name[i])) {
                compile_err(err, errlen, "\"%s\": \"%s\" is not a valid header name", ph->text, ph->name);
                goto fail;
            }
        }
        return ph;
    }
    if (reserved == ITEM) {
        if (!scope->has_item) {
            compile_err(err, errlen, "\"%s\": item exists only in a call with \"foreach\"", ph->text);
            goto fail;
        }
        ph->src = SRC_ITEM;
        if (compile_rest(ph, rest, restlen, err, errlen) != GW_OK)
            goto fail;
        return ph;
    }
    ph->name = gw_strndup(in, nlen);
    ph->namelen = nlen;
    if (param >= 0) {
        if (restlen > 0) {
            compile_err(err, errlen, "\"%s\": path parameter %s is text and has no fields", ph->text, ph->name);
            goto fail;
        }
        ph->src = SRC_PARAM;
        return ph;
    }
    if (call >= GW_TPL_MAX_CALLS) {
        compile_err(err, errlen, "\"%s\": call %s is call number %ld; templates can refer to the first %d calls only",
                    ph->text, ph->name, call + 1, GW_TPL_MAX_CALLS);
        goto fail;
    }
    ph->src = SRC_CALL;
    ph->call = (size_t)call;
    if (compile_rest(ph, rest, restlen, err, errlen) != GW_OK)
        goto fail;
    *deps |= 1ULL << call;
    return ph;
fail:
    ph_free(ph);
    return NULL;
}

/* Why byte c (at src[i]) may not be literal target text; NULL when fine. */
static const char *
target_byte_problem(const char *src, size_t len, size_t i, unsigned char c)
{
    if (is_ctl(c))
        return "a control character";
    if (c >= 0x80)
        return "a non-ASCII byte";
    if (c == ' ')
        return "a space";
    if (c == '#')
        return "\"#\" (a target has no fragment)";
    if (c != 0 && strchr("\"<>\\^`{|}", c) != NULL)
        return "a character that URLs do not allow";
    if (c == '%' && (i + 2 >= len || gw_router_hexval(src[i + 1]) < 0 || gw_router_hexval(src[i + 2]) < 0))
        return "a \"%\" that does not start a %XX escape";
    return NULL;
}

static gw_tpl_t *
tpl_compile(const char *src, tpl_mode_t mode, const gw_tpl_scope_t *scope, char *err, size_t errlen)
{
    size_t len = strlen(src);
    gw_tpl_t *t = gw_calloc(1, sizeof(*t));
    t->mode = mode;
    t->src = gw_strndup(src, len);
    char *lit = gw_malloc(len + 1);
    size_t litlen = 0;
    bool in_query = false;
    if (mode == MODE_TARGET && src[0] != '/') {
        compile_err(err, errlen, "a target must start with \"/\"");
        goto fail;
    }
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)src[i];
        size_t step = 1;
        if (c == '{' && src[i + 1] != '{') {
            size_t j = i + 1;
            while (j < len && src[j] != '}' && src[j] != '{')
                j++;
            if (j == len) {
                compile_err(err, errlen, "unclosed \"{\" at offset %zu (write \"{{\" for a literal brace)", i);
                goto fail;
            }
            if (src[j] == '{') {
                compile_err(err, errlen, "\"{\" inside a placeholder at offset %zu", j);
                goto fail;
            }
            ph_t *ph = compile_ph(src + i, j - i + 1, scope, &t->deps, err, errlen);
            if (ph == NULL)
                goto fail;
            ph->in_query = in_query;
            t->item = t->item || ph->src == SRC_ITEM;
            if (litlen > 0) {
                add_part(t, gw_strndup(lit, litlen), litlen, NULL);
                litlen = 0;
            }
            add_part(t, NULL, 0, ph);
            i = j + 1;
            continue;
        }
        if (c == '}' && src[i + 1] != '}') {
            compile_err(err, errlen, "\"}\" without \"{\" at offset %zu (write \"}}\" for a literal brace)", i);
            goto fail;
        }
        if (c == '{' || c == '}')
            step = 2; /* an escaped brace */
        if (mode == MODE_TARGET) {
            const char *why = target_byte_problem(src, len, i, c);
            if (why != NULL) {
                compile_err(err, errlen, "%s is not allowed in a target (offset %zu; percent-encode it as %%%02X)", why,
                            i, c);
                goto fail;
            }
            if (c == '?')
                in_query = true;
        } else if (mode == MODE_HEADER && is_ctl(c)) {
            compile_err(err, errlen, "a control character is not allowed in a header value (offset %zu)", i);
            goto fail;
        }
        lit[litlen++] = (char)c;
        i += step;
    }
    if (litlen > 0)
        add_part(t, gw_strndup(lit, litlen), litlen, NULL);
    free(lit);
    return t;
fail:
    free(lit);
    gw_tpl_free(t);
    return NULL;
}

gw_tpl_t *
gw_tpl_compile(const char *src, gw_tpl_kind_t kind, const gw_tpl_scope_t *scope, char *err, size_t errlen)
{
    return tpl_compile(src, kind == GW_TPL_TARGET ? MODE_TARGET : MODE_HEADER, scope, err, errlen);
}

uint64_t
gw_tpl_deps(const gw_tpl_t *t)
{
    return t->deps;
}

const char *
gw_tpl_source(const gw_tpl_t *t)
{
    return t->src;
}

/* --- looking values up ------------------------------------------------------ */

/* A value found for a placeholder: text (s, len), or a JSON value. */
typedef struct {
    const char *s;
    size_t len;
    const json_t *json; /* SRC_CALL, SRC_ITEM: the value, possibly JSON null */
    char *owned;        /* a decoded query value, freed with the val_t */
    char num[40];
} val_t;

/* Whether the form-encoded key raw[0..len) decodes to name[0..nlen). */
static bool
query_key_is(const char *raw, size_t len, const char *name, size_t nlen)
{
    size_t i = 0, k = 0;
    while (i < len) {
        int b = query_byte(raw, len, &i);
        if (b < 0 || k == nlen || (unsigned char)name[k] != b)
            return false;
        k++;
    }
    return k == nlen;
}

static int
lookup_query(const ph_t *ph, const gw_req_t *r, val_t *v, gw_tpl_err_t *e)
{
    const char *q = r != NULL ? r->hbuf + r->query_off : NULL;
    size_t qlen = r != NULL ? r->query_len : 0;
    for (size_t i = 0; i < qlen;) {
        size_t end = i;
        while (end < qlen && q[end] != '&')
            end++;
        size_t eq = i;
        while (eq < end && q[eq] != '=')
            eq++;
        if (query_key_is(q + i, eq - i, ph->name, ph->namelen)) {
            size_t vstart = eq < end ? eq + 1 : end;
            v->owned = gw_malloc(end - vstart + 1);
            size_t w = 0;
            for (size_t k = vstart; k < end;) {
                int b = query_byte(q, end, &k);
                if (b < 0) {
                    set_err(e, GW_FAIL_INVALID_VALUE, "%s: bad percent-escape in the query parameter", ph->text);
                    return GW_ERR;
                }
                v->owned[w++] = (char)b;
            }
            v->owned[w] = '\0';
            v->s = v->owned;
            v->len = w;
            return GW_OK;
        }
        i = end + 1;
    }
    set_err(e, GW_FAIL_MISSING_VALUE, "%s: no query parameter \"%s\" in the request", ph->text, ph->name);
    return GW_ERR;
}

/* Finds the value of ph in ctx. For a call or the item, v->json is set
 * (JSON null included); otherwise v->s/v->len. */
static int
lookup(const ph_t *ph, const gw_tpl_ctx_t *ctx, val_t *v, gw_tpl_err_t *e)
{
    switch (ph->src) {
    case SRC_PARAM:
        for (size_t i = 0; ctx->match != NULL && i < ctx->match->nparams; i++) {
            if (strcmp(ctx->match->params[i].name, ph->name) == 0) {
                v->s = ctx->match->params[i].value;
                v->len = ctx->match->params[i].len;
                return GW_OK;
            }
        }
        set_err(e, GW_FAIL_MISSING_VALUE, "%s: no path parameter \"%s\" in this match", ph->text, ph->name);
        return GW_ERR;
    case SRC_QUERY: return lookup_query(ph, ctx->req, v, e);
    case SRC_HEADER:
        v->s = ctx->req != NULL ? gw_req_header(ctx->req, ph->name, &v->len) : NULL;
        if (v->s == NULL) {
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: no header \"%s\" in the request", ph->text, ph->name);
            return GW_ERR;
        }
        return GW_OK;
    case SRC_CALL: {
        const json_t *root = ph->call < ctx->nresults && ctx->results != NULL ? ctx->results[ph->call] : NULL;
        if (root == NULL) {
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: call %s has no answer", ph->text, ph->name);
            return GW_ERR;
        }
        v->json = ph->path != NULL ? gw_jpath_get(ph->path, root) : root;
        if (v->json == NULL) {
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: missing in the answer of call %s", ph->text, ph->name);
            return GW_ERR;
        }
        return GW_OK;
    }
    case SRC_ITEM:
        if (ctx->item == NULL) {
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: no foreach item", ph->text);
            return GW_ERR;
        }
        v->json = ph->path != NULL ? gw_jpath_get(ph->path, ctx->item) : ctx->item;
        if (v->json == NULL) {
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: missing in the foreach item", ph->text);
            return GW_ERR;
        }
        return GW_OK;
    }
    return GW_ERR;
}

/* Turns a JSON value found by lookup() into text (v->s, v->len). */
static int
json_text(const ph_t *ph, val_t *v, gw_tpl_err_t *e)
{
    const json_t *j = v->json;
    switch (json_typeof(j)) {
    case JSON_STRING:
        v->s = json_string_value(j);
        v->len = json_string_length(j);
        return GW_OK;
    case JSON_INTEGER:
        v->len = (size_t)snprintf(v->num, sizeof(v->num), "%" JSON_INTEGER_FORMAT, json_integer_value(j));
        v->s = v->num;
        return GW_OK;
    case JSON_REAL: {
        /* Shortest text that reads back as the same double. */
        v->len = gw_json_real(json_real_value(j), v->num);
        v->s = v->num;
        return GW_OK;
    }
    case JSON_TRUE:
        v->s = "true";
        v->len = 4;
        return GW_OK;
    case JSON_FALSE:
        v->s = "false";
        v->len = 5;
        return GW_OK;
    case JSON_NULL:
        if (ph->src == SRC_CALL)
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: null in the answer of call %s", ph->text, ph->name);
        else
            set_err(e, GW_FAIL_MISSING_VALUE, "%s: null in the foreach item", ph->text);
        return GW_ERR;
    case JSON_OBJECT:
    case JSON_ARRAY:
        set_err(e, GW_FAIL_INVALID_VALUE, "%s: an %s cannot be used as text", ph->text,
                json_is_object(j) ? "object" : "array");
        return GW_ERR;
    }
    return GW_ERR;
}

static int
value_text(const ph_t *ph, const gw_tpl_ctx_t *ctx, val_t *v, gw_tpl_err_t *e)
{
    if (lookup(ph, ctx, v, e) != GW_OK)
        return GW_ERR;
    return v->json != NULL ? json_text(ph, v, e) : GW_OK;
}

/* --- rendering text ----------------------------------------------------- */

static int
too_long(const ph_t *ph, const gw_tpl_buf_t *out, gw_tpl_err_t *e)
{
    set_err(e, GW_FAIL_INVALID_VALUE, "%s: the result would be longer than %zu bytes",
            ph != NULL ? ph->text : "template", out->limit ? out->limit : (size_t)GW_TPL_MAX_LEN);
    return GW_ERR;
}

/* Appends v percent-encoded. In the path, a value that is empty, "." or
 * ".." is refused: it would address another resource than the template
 * names. (A segment made of such a value and literal dots cannot become
 * "." or ".." without the value itself being one of these, so checking the
 * value is enough.) */
static int
target_value(gw_tpl_buf_t *out, const ph_t *ph, const val_t *v, gw_tpl_err_t *e)
{
    static const char hex[] = "0123456789ABCDEF";
    if (v->len > 0 && memchr(v->s, '\0', v->len) != NULL) {
        set_err(e, GW_FAIL_INVALID_VALUE, "%s: the value holds a NUL byte", ph->text);
        return GW_ERR;
    }
    if (!ph->in_query) {
        if (v->len == 0) {
            set_err(e, GW_FAIL_INVALID_VALUE, "%s: empty value in the path", ph->text);
            return GW_ERR;
        }
        if (v->s[0] == '.' && (v->len == 1 || (v->len == 2 && v->s[1] == '.'))) {
            set_err(e, GW_FAIL_INVALID_VALUE, "%s: the value \"%.*s\" would change the path", ph->text, (int)v->len,
                    v->s);
            return GW_ERR;
        }
    }
    size_t n = v->len;
    for (size_t i = 0; i < v->len; i++)
        if (!unreserved((unsigned char)v->s[i]))
            n += 2;
    if (!buf_room(out, n))
        return too_long(ph, out, e);
    char *w = out->data + out->len;
    for (size_t i = 0; i < v->len; i++) {
        unsigned char c = (unsigned char)v->s[i];
        if (unreserved(c)) {
            *w++ = (char)c;
        } else {
            *w++ = '%';
            *w++ = hex[c >> 4];
            *w++ = hex[c & 15];
        }
    }
    out->len += n;
    return GW_OK;
}

/* Appends v as it is: a header value without control characters, or text
 * for a JSON string that must be valid UTF-8. */
static int
plain_value(gw_tpl_buf_t *out, tpl_mode_t mode, const ph_t *ph, const val_t *v, gw_tpl_err_t *e)
{
    if (mode == MODE_HEADER) {
        for (size_t k = 0; k < v->len; k++) {
            if (is_ctl((unsigned char)v->s[k])) {
                set_err(e, GW_FAIL_INVALID_VALUE, "%s: control character in a header value", ph->text);
                return GW_ERR;
            }
        }
    } else if (!utf8_valid((const unsigned char *)v->s, v->len)) {
        set_err(e, GW_FAIL_INVALID_VALUE, "%s: the value is not valid UTF-8", ph->text);
        return GW_ERR;
    }
    if (!buf_room(out, v->len))
        return too_long(ph, out, e);
    if (v->len > 0)
        memcpy(out->data + out->len, v->s, v->len);
    out->len += v->len;
    return GW_OK;
}

static int
render_parts(const gw_tpl_t *t, const gw_tpl_ctx_t *ctx, gw_tpl_buf_t *out, gw_tpl_err_t *e)
{
    for (size_t i = 0; i < t->nparts; i++) {
        const part_t *p = &t->parts[i];
        if (p->ph == NULL) {
            if (!buf_room(out, p->litlen))
                return too_long(NULL, out, e);
            memcpy(out->data + out->len, p->lit, p->litlen);
            out->len += p->litlen;
            continue;
        }
        val_t v = {0};
        int rc = value_text(p->ph, ctx, &v, e);
        if (rc == GW_OK)
            rc = t->mode == MODE_TARGET ? target_value(out, p->ph, &v, e) : plain_value(out, t->mode, p->ph, &v, e);
        free(v.owned);
        if (rc != GW_OK)
            return GW_ERR;
    }
    return GW_OK;
}

int
gw_tpl_render(const gw_tpl_t *t, const gw_tpl_ctx_t *ctx, gw_tpl_buf_t *out, gw_tpl_err_t *err)
{
    size_t start = out->len;
    if (render_parts(t, ctx, out, err) != GW_OK) {
        out->len = start;
        if (out->data != NULL)
            out->data[start] = '\0';
        return GW_ERR;
    }
    if (!buf_room(out, 0)) {
        out->len = start;
        return too_long(NULL, out, err);
    }
    out->data[out->len] = '\0';
    return GW_OK;
}

/* --- JSON body templates ------------------------------------------------------ */

typedef enum { JN_CONST, JN_OBJECT, JN_ARRAY, JN_WHOLE, JN_TEXT } jkind_t;

typedef struct jnode_s jnode_t;
struct jnode_s {
    jkind_t kind;
    json_t *constant; /* JN_CONST: copied again for each render */
    gw_tpl_t *tpl;    /* JN_WHOLE (its one part) and JN_TEXT */
    char **keys;      /* JN_OBJECT */
    jnode_t *kids;    /* JN_OBJECT, JN_ARRAY */
    size_t nkids;
};

struct gw_tpl_json_s {
    jnode_t root;
    uint64_t deps;
    bool item; /* a placeholder reads the foreach item */
};

static void
jnode_clear(jnode_t *n)
{
    json_decref(n->constant);
    gw_tpl_free(n->tpl);
    for (size_t i = 0; i < n->nkids; i++) {
        if (n->keys != NULL)
            free(n->keys[i]);
        jnode_clear(&n->kids[i]);
    }
    free(n->keys);
    free(n->kids);
    memset(n, 0, sizeof(*n));
}

void
gw_tpl_json_free(gw_tpl_json_t *t)
{
    if (t == NULL)
        return;
    jnode_clear(&t->root);
    free(t);
}

uint64_t
gw_tpl_json_deps(const gw_tpl_json_t *t)
{
    return t->deps;
}

bool
gw_tpl_json_uses_item(const gw_tpl_json_t *t)
{
    return t->item;
}

bool
gw_tpl_json_is_const(const gw_tpl_json_t *t)
{
    return t->root.kind == JN_CONST;
}

/* Location of the value being compiled, in gw_jpath syntax, for errors. */
typedef struct {
    char buf[256];
    size_t len;
} loc_t;

static size_t
loc_push(loc_t *l, const char *key, size_t index)
{
    size_t was = l->len;
    int n;
    if (key != NULL)
        n = snprintf(l->buf + l->len, sizeof(l->buf) - l->len, "%s%s", l->len ? "." : "", key);
    else
        n = snprintf(l->buf + l->len, sizeof(l->buf) - l->len, "[%zu]", index);
    if (n > 0)
        l->len = GW_MIN(l->len + (size_t)n, sizeof(l->buf) - 1);
    return was;
}

static int
jnode_compile(jnode_t *n, const json_t *v, const gw_tpl_scope_t *scope, uint64_t *deps, bool *item, loc_t *loc,
              char *err, size_t errlen)
{
    if (json_is_string(v)) {
        char msg[512];
        gw_tpl_t *t = tpl_compile(json_string_value(v), MODE_TEXT, scope, msg, sizeof(msg));
        if (t == NULL) {
            compile_err(err, errlen, "%s%s%s", loc->buf, loc->len ? ": " : "", msg);
            return GW_ERR;
        }
        *deps |= t->deps;
        *item = *item || t->item;
        if (t->nparts == 1 && t->parts[0].ph != NULL) {
            n->kind = JN_WHOLE;
            n->tpl = t;
        } else if (t->nparts == 0 || (t->nparts == 1 && t->parts[0].ph == NULL)) {
            /* The literal, with "{{" and "}}" unescaped. */
            n->kind = JN_CONST;
            n->constant = t->nparts ? json_stringn(t->parts[0].lit, t->parts[0].litlen) : json_string("");
            gw_tpl_free(t);
        } else {
            n->kind = JN_TEXT;
            n->tpl = t;
        }
        return GW_OK;
    }
    if (!json_is_object(v) && !json_is_array(v)) {
        n->kind = JN_CONST;
        n->constant = json_deep_copy(v);
        return GW_OK;
    }
    bool obj = json_is_object(v);
    size_t count = obj ? json_object_size(v) : json_array_size(v);
    n->kind = obj ? JN_OBJECT : JN_ARRAY;
    n->kids = gw_calloc(count, sizeof(jnode_t));
    if (obj)
        n->keys = gw_calloc(count, sizeof(char *));
    bool all_const = true;
    size_t i = 0;
    if (obj) {
        const char *key;
        json_t *kv;
        json_object_foreach((json_t *)v, key, kv)
        {
            n->keys[i] = gw_strdup(key);
            size_t was = loc_push(loc, key, 0);
            n->nkids = i + 1;
            int rc = jnode_compile(&n->kids[i], kv, scope, deps, item, loc, err, errlen);
            loc->len = was;
            loc->buf[was] = '\0';
            if (rc != GW_OK)
                return GW_ERR;
            all_const = all_const && n->kids[i].kind == JN_CONST;
            i++;
        }
    } else {
        for (; i < count; i++) {
            size_t was = loc_push(loc, NULL, i);
            n->nkids = i + 1;
            int rc = jnode_compile(&n->kids[i], json_array_get(v, i), scope, deps, item, loc, err, errlen);
            loc->len = was;
            loc->buf[was] = '\0';
            if (rc != GW_OK)
                return GW_ERR;
            all_const = all_const && n->kids[i].kind == JN_CONST;
        }
    }
    if (all_const) {
        /* No placeholder below: one constant, with braces unescaped. */
        json_t *c = obj ? json_object() : json_array();
        for (size_t k = 0; k < n->nkids; k++) {
            if (obj)
                json_object_set(c, n->keys[k], n->kids[k].constant);
            else
                json_array_append(c, n->kids[k].constant);
        }
        jnode_clear(n);
        n->kind = JN_CONST;
        n->constant = c;
    }
    return GW_OK;
}

gw_tpl_json_t *
gw_tpl_json_compile(const json_t *body, const gw_tpl_scope_t *scope, char *err, size_t errlen)
{
    if (body == NULL) {
        compile_err(err, errlen, "no body to compile");
        return NULL;
    }
    gw_tpl_json_t *t = gw_calloc(1, sizeof(*t));
    loc_t loc = {.len = 0};
    loc.buf[0] = '\0';
    if (jnode_compile(&t->root, body, scope, &t->deps, &t->item, &loc, err, errlen) != GW_OK) {
        gw_tpl_json_free(t);
        return NULL;
    }
    return t;
}

static json_t *
whole_value(const ph_t *ph, const gw_tpl_ctx_t *ctx, gw_tpl_err_t *e)
{
    val_t v = {0};
    if (lookup(ph, ctx, &v, e) != GW_OK) {
        free(v.owned);
        return NULL;
    }
    if (v.json != NULL)
        return json_incref((json_t *)v.json);
    json_t *s = utf8_valid((const unsigned char *)v.s, v.len) ? json_stringn(v.s, v.len) : NULL;
    free(v.owned);
    if (s == NULL)
        set_err(e, GW_FAIL_INVALID_VALUE, "%s: the value is not valid UTF-8", ph->text);
    return s;
}

static json_t *
jnode_render(const jnode_t *n, const gw_tpl_ctx_t *ctx, gw_tpl_err_t *e)
{
    switch (n->kind) {
    case JN_CONST:
        /* A copy, so that no value is ever shared between worker threads. */
        return json_deep_copy(n->constant);
    case JN_WHOLE: return whole_value(n->tpl->parts[0].ph, ctx, e);
    case JN_TEXT: {
        gw_tpl_buf_t b = {.limit = JSON_TEXT_LIMIT};
        json_t *s = NULL;
        if (gw_tpl_render(n->tpl, ctx, &b, e) == GW_OK) {
            s = json_stringn(b.data, b.len);
            if (s == NULL)
                set_err(e, GW_FAIL_INVALID_VALUE, "\"%s\": the result is not valid UTF-8", n->tpl->src);
        }
        gw_tpl_buf_free(&b);
        return s;
    }
    case JN_OBJECT:
    case JN_ARRAY: {
        json_t *c = n->kind == JN_OBJECT ? json_object() : json_array();
        for (size_t i = 0; c != NULL && i < n->nkids; i++) {
            json_t *r = jnode_render(&n->kids[i], ctx, e);
            if (r == NULL) {
                json_decref(c);
                return NULL;
            }
            if (n->kind == JN_OBJECT)
                json_object_set_new(c, n->keys[i], r);
            else
                json_array_append_new(c, r);
        }
        return c;
    }
    }
    return NULL;
}

json_t *
gw_tpl_json_render(const gw_tpl_json_t *t, const gw_tpl_ctx_t *ctx, gw_tpl_err_t *err)
{
    err->code = GW_FAIL_NONE;
    json_t *out = jnode_render(&t->root, ctx, err);
    if (out == NULL && err->code == GW_FAIL_NONE) /* jansson's own allocation failed */
        set_err(err, GW_FAIL_INVALID_VALUE, "out of memory while building the body");
    return out;
}
