/* Unit tests for src/gw_json.c: the serializer's output, real number text,
 * gw_json_valid() agreeing with jansson (JSON_DECODE_ANY | JSON_ALLOW_NUL)
 * on hand-written cases and on seeded random mutations, and the allocation
 * meter (budget taken and given back exactly, refusal, cancel). */
#include "gw_json.h"
#include "gw_test.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool
jansson_accepts(const char *s, size_t len)
{
    json_error_t e;
    json_t *v = json_loadb(s, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
    json_decref(v);
    return v != NULL;
}

static bool
valid(const char *s, size_t len)
{
    size_t st, vl;
    return gw_json_valid(s, len, &st, &vl);
}

static void
test_dump(void)
{
    json_t *v = json_loads("{\"a\":[1,2.5,-0.25e-3,1E3,9.99,true,null],\"s\":\"q\\\"\\\\\\n\\u0001é\",\"o\":{}}", 0, NULL);
    CHECK(v != NULL);
    gw_tpl_buf_t b = { 0 };
    gw_json_dump(v, &b);
    CHECK_STR(b.data, "{\"a\":[1,2.5,-0.00025,1000.0,9.99,true,null],\"s\":\"q\\\"\\\\\\n\\u0001é\",\"o\":{}}");
    json_decref(v);
    char num[32];
    gw_json_real(0.1 + 0.2, num);
    CHECK_STR(num, "0.30000000000000004");
    gw_json_real(1e300, num);
    CHECK_STR(num, "1e+300");
    gw_tpl_buf_free(&b);
}

static const char *const cases[] = {
    "{}", "[]", " {\"a\" : [1, 2 , {\"b\":null}]} ", "\"x\"", "0", "-0", "-1.5e+10", "1E-400", "1e400", "-1e400",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "123456789012345678901234", "01", "1.", ".5", "1e", "-", "+1", "tru", "true ", "nul", "[1,]", "{\"a\":1,}",
    "{\"a\"}", "{1:2}", "[1 2]", "\"\\u0000\"", "{\"a\\u0000b\":1}", "{\"a\":\"\\u0000\"}", "\"\\ud83d\\ude00\"", "\"\\ud83d\"", "\"\\ude00\"", "\"\\ud83dx\"",
    "\"\\x\"", "\"a\tb\"", "\"\xc3\xa9\"", "\"\xc3\"", "\"\xe0\x80\x80\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"",
    "\"\xf0\x9f\x98\x80\"", "\"\xff\"", "[[[[]]]]", "", " ", "{} {}", "[\"unterminated", "{\"a\":1", "\"\\u12G4\"",
    "[0.0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001]",
    "[100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000.5]",
};

static void
test_valid_matches_jansson(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = strlen(cases[i]);
        bool want = jansson_accepts(cases[i], len), got = valid(cases[i], len);
        if (want != got)
            printf("    case %zu %s: jansson %d, gw_json_valid %d\n", i, cases[i], want, got);
        CHECK(want == got);
    }
    /* a NUL byte outside a string, and the trimmed value */
    CHECK(!valid("[1]\0", 4) && !jansson_accepts("[1]\0", 4));
    size_t st = 0, vl = 0;
    CHECK(gw_json_valid("  [1, 2]\n", 9, &st, &vl) && st == 2 && vl == 6);
    /* nesting: 2048 levels are fine, 2049 are not (jansson's limit) */
    char deep[2 * 2049 + 1];
    for (int n = 2048; n <= 2049; n++) {
        memset(deep, '[', (size_t)n);
        memset(deep + n, ']', (size_t)n);
        CHECK(valid(deep, 2 * (size_t)n) == jansson_accepts(deep, 2 * (size_t)n));
    }
}

static void
test_valid_random_mutations(void)
{
    static const char *const seeds[] = {
        "{\"id\":42,\"name\":\"User \\u00e9\\ud83d\\ude00\",\"tags\":[\"a\",\"b\"],\"x\":-1.5e-3,\"n\":null,\"t\":true}",
        "[{\"id\":101,\"product_id\":7,\"qty\":1},{\"id\":102,\"product_id\":9,\"qty\":2}]",
        "\"caf\xc3\xa9 \xf0\x9f\x98\x80\"",
    };
    static const char alphabet[] = "{}[]\",:\\/u0123456789abcdefABCDEF.eE+- \t\n\rtrulsn\x80\xc3\xa9\xed\xf0\x00";
    unsigned seed = 12345;
    char buf[256];
    int mismatches = 0;
    for (int round = 0; round < 30000; round++) {
        const char *s = seeds[round % 3];
        size_t len = strlen(s);
        memcpy(buf, s, len);
        int edits = 1 + (int)((seed = seed * 1103515245u + 12345u) >> 16) % 3;
        for (int e = 0; e < edits; e++) {
            seed = seed * 1103515245u + 12345u;
            size_t pos = (seed >> 8) % len;
            seed = seed * 1103515245u + 12345u;
            char ch = alphabet[(seed >> 8) % (sizeof(alphabet) - 1)];
            seed = seed * 1103515245u + 12345u;
            switch ((seed >> 8) % 3) {
            case 0: buf[pos] = ch; break;                                  /* replace */
            case 1: memmove(buf + pos, buf + pos + 1, len - pos - 1); len--; break; /* delete */
            default:
                if (len + 1 < sizeof(buf)) {                               /* insert */
                    memmove(buf + pos + 1, buf + pos, len - pos);
                    buf[pos] = ch;
                    len++;
                }
            }
            if (len == 0)
                break;
        }
        if (memchr(buf, '\0', len)) {
            /* jansson skips a NUL byte right after a number or literal ("1\0"
             * loads): its stream uses NUL as "nothing buffered". A raw NUL is
             * never valid JSON; gw_json_valid() refuses it, the safe side. */
            CHECK(!valid(buf, len));
            continue;
        }
        if (valid(buf, len) != jansson_accepts(buf, len) && mismatches++ < 5) {
            printf("    mismatch (jansson %d) on", jansson_accepts(buf, len));
            for (size_t k = 0; k < len; k++)
                printf(buf[k] >= 0x20 && buf[k] < 0x7f ? "%c" : "\\x%02x", (unsigned char)buf[k]);
            printf("\n");
        }
    }
    CHECK(mismatches == 0);
}

/* One allocation policy: after gw_alloc_init(), jansson and OpenSSL
 * allocate through gw_malloc & co, which abort on out-of-memory (libevent
 * has no getter; gw_main calls the same function for it). */
static void
test_alloc_policy(void)
{
    gw_alloc_init();
    json_malloc_t m = NULL;
    json_free_t f = NULL;
    json_get_alloc_funcs(&m, &f);
    CHECK(m == gw_malloc);
    CHECK(f == free);
    json_t *o = json_object();
    CHECK(o != NULL && json_object_set_new(o, "k", json_string("v")) == 0);
    json_decref(o);
    CRYPTO_malloc_fn sm = NULL;
    CRYPTO_realloc_fn sr = NULL;
    CRYPTO_free_fn sf = NULL;
    CRYPTO_get_mem_functions(&sm, &sr, &sf);
    void *p = sm(16, __FILE__, __LINE__);
    CHECK(p != NULL);
    p = sr(p, 64, __FILE__, __LINE__);
    CHECK(p != NULL);
    sf(p, __FILE__, __LINE__);
    CHECK(sm != CRYPTO_malloc && sm != NULL);
}

/* "[0,1,...,n-1]" or "[{},{},...]" (n elements), malloc'd. */
static char *
array_text(size_t n, bool empties, size_t *len)
{
    char *t = malloc(n * 12 + 3);
    size_t k = 0;
    t[k++] = '[';
    for (size_t i = 0; i < n; i++)
        k += (size_t)sprintf(t + k, empties ? "%s{}" : "%s%zu", i ? "," : "", i);
    t[k++] = ']';
    t[k] = '\0';
    *len = k;
    return t;
}

static void
test_meter_counts_and_gives_back(void)
{
    gw_json_alloc_init();
    gw_budget_t b = { 0, (size_t)1 << 30, 0 };
    size_t len;
    char *t = array_text(1000, false, &len);
    gw_json_meter_t m;
    gw_json_meter_begin(&m, &b, NULL);
    json_t *v = json_loadb(t, len, 0, NULL);
    gw_json_meter_end(&m);
    CHECK(v != NULL && json_array_size(v) == 1000);
    CHECK(m.held == m.used);
    CHECK(gw_budget_used(&b) == m.used);
    /* an oracle: each integer is a json_t and an int64 at least, plus the array's slots */
    CHECK(m.used >= 1000 * (sizeof(json_t) + sizeof(json_int_t) + sizeof(json_t *)));
    json_t *outside = json_array(); /* no meter: not counted */
    json_array_append_new(outside, json_integer(1));
    CHECK(gw_budget_used(&b) == m.used);
    json_decref(outside);
    json_decref(v);
    gw_budget_give(&b, m.used);
    CHECK(gw_budget_used(&b) == 0);
    CHECK(gw_budget_refused(&b) == 0);
    free(t);
}

static void
test_meter_refuses_past_the_budget(void)
{
    gw_json_alloc_init();
    gw_budget_t b = { 0, 64 * 1024, 0 };
    size_t len;
    char *t = array_text(3000, true, &len); /* 9 KB of text, far more as a tree */
    gw_json_meter_t m;
    gw_json_meter_begin(&m, &b, NULL);
    json_error_t e;
    json_t *v = json_loadb(t, len, 0, &e);
    gw_json_meter_end(&m);
    CHECK(v == NULL);
    CHECK(m.refused && !m.cancelled);
    CHECK(gw_budget_refused(&b) == 1); /* one refusal: the rest fail without asking */
    CHECK(m.used == 0);                /* jansson freed what it had built */
    CHECK(gw_budget_used(&b) == 0);
    /* with room, the same text loads */
    gw_budget_set_limit(&b, (size_t)1 << 30);
    gw_json_meter_begin(&m, &b, NULL);
    v = json_loadb(t, len, 0, &e);
    gw_json_meter_end(&m);
    CHECK(v != NULL);
    CHECK(m.used > 64 * 1024);
    json_decref(v);
    gw_budget_give(&b, m.used);
    CHECK(gw_budget_used(&b) == 0);
    free(t);
}

static void
test_meter_cancel(void)
{
    gw_json_alloc_init();
    gw_budget_t b = { 0, (size_t)1 << 30, 0 };
    bool cancel = true;
    gw_json_meter_t m;
    gw_json_meter_begin(&m, &b, &cancel);
    json_t *v = json_loads("[1,2,3]", 0, NULL);
    gw_json_meter_end(&m);
    CHECK(v == NULL);
    CHECK(m.cancelled && !m.refused);
    CHECK(gw_budget_used(&b) == 0);
}

TEST_MAIN(T(test_alloc_policy), T(test_dump), T(test_valid_matches_jansson), T(test_valid_random_mutations), T(test_meter_counts_and_gives_back),
          T(test_meter_refuses_past_the_budget), T(test_meter_cancel))
