/*
 * gw_json.c - JSON output (see gw_json.h).
 */
#include "gw_json.h"

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
put(gw_tpl_buf_t *b, const char *s, size_t n)
{
    memcpy(reserve(b, n), s, n);
    b->len += n;
    b->data[b->len] = '\0';
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
        put(b, "{", 1);
        /* keys may hold a NUL (answers are parsed with JSON_ALLOW_NUL) */
        json_object_keylen_foreach((json_t *)v, key, klen, member) {
            if (!first)
                put(b, ",", 1);
            first = false;
            put_string(b, key, klen);
            put(b, ":", 1);
            gw_json_dump(member, b);
        }
        put(b, "}", 1);
        return;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        put(b, "[", 1);
        for (size_t i = 0; i < n; i++) {
            if (i)
                put(b, ",", 1);
            gw_json_dump(json_array_get(v, i), b);
        }
        put(b, "]", 1);
        return;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        return;
    case JSON_INTEGER: {
        int n = snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        put(b, num, (size_t)n);
        return;
    }
    case JSON_REAL: {
        size_t n = gw_json_real(json_real_value(v), num);
        /* like jansson: a real keeps a mark of being one ("1.0", not "1") */
        if (strpbrk(num, ".eEn") == NULL) {
            num[n++] = '.';
            num[n++] = '0';
        }
        put(b, num, n);
        return;
    }
    case JSON_TRUE:
        put(b, "true", 4);
        return;
    case JSON_FALSE:
        put(b, "false", 5);
        return;
    case JSON_NULL:
        put(b, "null", 4);
        return;
    }
}
