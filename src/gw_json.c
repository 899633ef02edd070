/*
 * gw_json.c - JSON output (see gw_json.h).
 */
#include "gw_json.h"

#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

size_t
gw_json_real(double d, char buf[32])
{
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(buf, 32, "%.*g", prec, d);
        if (strtod(buf, NULL) == d)
            break;
    }
    return (size_t)n;
}

/* Room for n more bytes and a NUL. */
static char *
reserve(gw_tpl_buf_t *b, size_t n)
{
    gw_grow((void **)&b->data, &b->cap, b->len + n + 1, 1);
    return b->data + b->len;
}

static void
put_string(gw_tpl_buf_t *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    /* worst case: every byte becomes \u00XX */
    char *p = reserve(b, len * 6 + 2);
    char *start = p;
    *p++ = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *p++ = (char)ch;
            continue;
        }
        *p++ = '\\';
        switch (ch) {
        case '"': *p++ = '"'; break;
        case '\\': *p++ = '\\'; break;
        case '\n': *p++ = 'n'; break;
        case '\r': *p++ = 'r'; break;
        case '\t': *p++ = 't'; break;
        case '\b': *p++ = 'b'; break;
        case '\f': *p++ = 'f'; break;
        default:
            *p++ = 'u';
            *p++ = '0';
            *p++ = '0';
            *p++ = hex[ch >> 4];
            *p++ = hex[ch & 15];
        }
    }
    *p++ = '"';
    b->len += (size_t)(p - start);
    b->data[b->len] = '\0';
}

void
gw_json_dump_string(const char *s, size_t len, gw_tpl_buf_t *out)
{
    put_string(out, s, len);
}

void
gw_json_dump(const json_t *v, gw_tpl_buf_t *b)
{
    char num[48];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        size_t klen;
        json_t *member;
        bool first = true;
        gw_tpl_buf_add(b, "{", 1);
        /* keys may hold a NUL (answers are parsed with JSON_ALLOW_NUL) */
        json_object_keylen_foreach((json_t *)v, key, klen, member) {
            if (!first)
                gw_tpl_buf_add(b, ",", 1);
            first = false;
            put_string(b, key, klen);
            gw_tpl_buf_add(b, ":", 1);
            gw_json_dump(member, b);
        }
        gw_tpl_buf_add(b, "}", 1);
        return;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        gw_tpl_buf_add(b, "[", 1);
        for (size_t i = 0; i < n; i++) {
            if (i)
                gw_tpl_buf_add(b, ",", 1);
            gw_json_dump(json_array_get(v, i), b);
        }
        gw_tpl_buf_add(b, "]", 1);
        return;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        return;
    case JSON_INTEGER: {
        int n = snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        gw_tpl_buf_add(b, num, (size_t)n);
        return;
    }
    case JSON_REAL: {
        size_t n = gw_json_real(json_real_value(v), num);
        /* like jansson: a real keeps a mark of being one ("1.0", not "1") */
        if (strpbrk(num, ".eEn") == NULL) {
            num[n++] = '.';
            num[n++] = '0';
        }
        gw_tpl_buf_add(b, num, n);
        return;
    }
    case JSON_TRUE:
        gw_tpl_buf_add(b, "true", 4);
        return;
    case JSON_FALSE:
        gw_tpl_buf_add(b, "false", 5);
        return;
    case JSON_NULL:
        gw_tpl_buf_add(b, "null", 4);
        return;
    }
}

/* --- validation without a tree (see gw_json_valid) ----------------------- */

#define VALID_MAX_DEPTH 2048

typedef struct {
    const unsigned char *p, *end;
} scan_t;

static void
skip_ws(scan_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int
hex4(const unsigned char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

/* One UTF-8 sequence starting at s->p (a byte >= 0x80): the shortest
 * form, no surrogates, at most U+10FFFF (what jansson's utf.c accepts). */
static bool
utf8_seq(scan_t *s)
{
    unsigned c = *s->p;
    size_t n;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return false;
    }
    if ((size_t)(s->end - s->p) < n)
        return false;
    for (size_t i = 1; i < n; i++) {
        unsigned k = s->p[i];
        if ((k & 0xC0) != 0x80)
            return false;
        cp = (cp << 6) | (k & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return false;
    s->p += n;
    return true;
}

/* key: an object key, where jansson refuses "\u0000" even with
 * JSON_ALLOW_NUL (its keys are C strings); a body gatherd forwards unparsed
 * must be one it could also parse. */
static bool
scan_string(scan_t *s, bool key)
{
    s->p++; /* the opening quote */
    while (s->p < s->end) {
        unsigned c = *s->p;
        if (c == '"') {
            s->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c >= 0x80) {
            if (!utf8_seq(s))
                return false;
            continue;
        }
        if (c != '\\') {
            s->p++;
            continue;
        }
        if (s->end - s->p < 2)
            return false;
        c = s->p[1];
        if (c != 'u') {
            if (!strchr("\"\\/bfnrt", (int)c) || c == 0)
                return false;
            s->p += 2;
            continue;
        }
        if (s->end - s->p < 6)
            return false;
        int v = hex4(s->p + 2);
        if (v < 0)
            return false;
        s->p += 6;
        if (v == 0 && key)
            return false;
        if (v >= 0xDC00 && v <= 0xDFFF)
            return false; /* a low surrogate alone */
        if (v >= 0xD800 && v <= 0xDBFF) {
            if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
                return false;
            int lo = hex4(s->p + 2);
            if (lo < 0xDC00 || lo > 0xDFFF)
                return false;
            s->p += 6;
        }
    }
    return false;
}

static bool
digit(scan_t *s)
{
    return s->p < s->end && *s->p >= '0' && *s->p <= '9';
}

static bool
scan_number(scan_t *s)
{
    const unsigned char *start = s->p;
    bool real = false;
    if (*s->p == '-')
        s->p++;
    if (!digit(s))
        return false;
    if (*s->p == '0') {
        s->p++;
        if (digit(s))
            return false; /* no leading zeros */
    } else {
        while (digit(s))
            s->p++;
    }
    if (s->p < s->end && *s->p == '.') {
        real = true;
        s->p++;
        if (!digit(s))
            return false;
        while (digit(s))
            s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        real = true;
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (!digit(s))
            return false;
        while (digit(s))
            s->p++;
    }
    /* the ranges jansson enforces: int64 integers, finite doubles */
    char small[128];
    size_t n = (size_t)(s->p - start);
    if (!real && n > 20)
        return false; /* more digits than any int64 */
    char *num = n < sizeof(small) ? small : gw_malloc(n + 1); /* a long real: rare */
    memcpy(num, start, n);
    num[n] = '\0';
    errno = 0;
    bool ok;
    if (real) {
        double d = strtod(num, NULL);
        ok = errno != ERANGE || (d != HUGE_VAL && d != -HUGE_VAL); /* underflow is fine, as in jansson */
    } else {
        (void)strtoll(num, NULL, 10);
        ok = errno != ERANGE;
    }
    if (num != small)
        free(num);
    return ok;
}

static bool
scan_literal(scan_t *s, const char *lit, size_t n)
{
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return false;
    s->p += n;
    return true;
}

static bool
scan_value(scan_t *s, int depth)
{
    if (s->p >= s->end)
        return false;
    switch (*s->p) {
    case '"':
        return scan_string(s, false);
    case 't':
        return scan_literal(s, "true", 4);
    case 'f':
        return scan_literal(s, "false", 5);
    case 'n':
        return scan_literal(s, "null", 4);
    case '{':
    case '[': {
        bool obj = *s->p == '{';
        char close = obj ? '}' : ']';
        if (depth >= VALID_MAX_DEPTH)
            return false;
        s->p++;
        skip_ws(s);
        if (s->p < s->end && *s->p == close) {
            s->p++;
            return true;
        }
        for (;;) {
            if (obj) {
                if (s->p >= s->end || *s->p != '"' || !scan_string(s, true))
                    return false;
                skip_ws(s);
                if (s->p >= s->end || *s->p != ':')
                    return false;
                s->p++;
                skip_ws(s);
            }
            if (!scan_value(s, depth + 1))
                return false;
            skip_ws(s);
            if (s->p >= s->end)
                return false;
            if (*s->p == close) {
                s->p++;
                return true;
            }
            if (*s->p != ',')
                return false;
            s->p++;
            skip_ws(s);
        }
    }
    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9'))
            return scan_number(s);
        return false;
    }
}

bool
gw_json_valid(const char *text, size_t len, size_t *start, size_t *vlen)
{
    scan_t s = { (const unsigned char *)text, (const unsigned char *)text + len };
    skip_ws(&s);
    const unsigned char *v = s.p;
    if (!scan_value(&s, 0))
        return false;
    size_t n = (size_t)(s.p - v);
    skip_ws(&s);
    if (s.p != s.end)
        return false;
    *start = (size_t)(v - (const unsigned char *)text);
    *vlen = n;
    return true;
}

/* --- metering jansson's allocations ---------------------------------------- */

/* The meter of the calling thread, if any. */
static __thread gw_json_meter_t *meter;

/* Budget steps: at least this much, and an eighth of what is held, so a
 * tree of many megabytes costs about a hundred atomic operations, not one
 * per node, and a small one holds little more than it needs. */
#define METER_STEP (4u * 1024u)

/* What an allocation of p costs: its usable size and glibc's chunk header. */
static size_t
cost(void *p)
{
    return malloc_usable_size(p) + sizeof(size_t);
}

static void *
meter_malloc(size_t n)
{
    /* out of memory aborts, as everywhere (gw_alloc.c); a NULL here is only
     * the budget's refusal or a cancel, which jansson unwinds from */
    gw_json_meter_t *m = meter;
    if (m == NULL)
        return gw_malloc(n);
    if (m->refused || m->cancelled)
        return NULL; /* jansson unwinds: nothing more is asked of the budget */
    if (m->cancel && __atomic_load_n(m->cancel, __ATOMIC_RELAXED)) {
        m->cancelled = true;
        return NULL;
    }
    void *p = gw_malloc(n);
    size_t c = cost(p);
    if (m->used + c > m->held) {
        size_t step = GW_MAX(GW_MAX(c, METER_STEP), m->held / 8);
        if (!gw_budget_take(m->budget, step)) {
            free(p);
            m->refused = true;
            return NULL;
        }
        m->held += step;
    }
    m->used += c;
    return p;
}

static void
meter_free(void *p)
{
    gw_json_meter_t *m = meter;
    if (m && p) {
        /* what was allocated before the meter began is not in used: never below 0 */
        size_t c = cost(p);
        m->used = m->used > c ? m->used - c : 0;
    }
    free(p);
}

void
gw_json_alloc_init(void)
{
    json_set_alloc_funcs(meter_malloc, meter_free);
}

void
gw_json_meter_begin(gw_json_meter_t *m, gw_budget_t *budget, const bool *cancel)
{
    memset(m, 0, sizeof(*m));
    m->budget = budget;
    m->cancel = cancel;
    meter = m;
}

void
gw_json_meter_end(gw_json_meter_t *m)
{
    meter = NULL;
    if (m->held > m->used)
        gw_budget_give(m->budget, m->held - m->used);
    m->held = m->used;
}
