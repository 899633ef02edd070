/* Unit tests for src/gw_cond.c: compiling conditions (forms, limits,
 * located errors, dependencies, {item}) and evaluating them: JSON
 * equality, absent values, text templates, request values as strings. */
#include "gw_cond.h"
#include "gw_test.h"

#include <stdlib.h>
#include <string.h>

static json_t *
J(const char *text)
{
    json_error_t e;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &e);
    if (v == NULL)
        printf("    bad test JSON %s: %s\n", text, e.text);
    return v;
}

static const char *const calls[] = { "g", "h" };
static const gw_tpl_scope_t scope = { .calls = calls, .ncalls = 2, .has_item = true };

static gw_cond_t *
C(const char *text)
{
    json_t *v = J(text);
    gw_cond_err_t err;
    gw_cond_t *c = gw_cond_compile(v, &scope, &err);
    if (c == NULL)
        printf("    condition %s: %s\n", text, err.msg);
    json_decref(v);
    return c;
}

/* Whether text holds against answers g (and h absent) and item. */
static bool
holds(const char *text, const char *g, const char *item)
{
    gw_cond_t *c = C(text);
    json_t *gv = g ? J(g) : NULL, *iv = item ? J(item) : NULL;
    json_t *results[2] = { gv, NULL };
    gw_tpl_ctx_t ctx = { .results = results, .nresults = 2, .item = iv };
    bool r = c != NULL && gw_cond_eval(c, &ctx);
    gw_cond_free(c);
    json_decref(gv);
    json_decref(iv);
    return r;
}

static void
test_equality(void)
{
    static const struct {
        const char *a, *b;
        bool eq;
    } cases[] = {
        { "5", "5.0", true },        { "5", "5.5", false },        { "1", "true", false },
        { "\"5\"", "5", false },     { "null", "null", true },     { "null", "false", false },
        { "9007199254740993", "9007199254740992.0", false },        /* 2^53 + 1 is not 2^53 */
        { "9007199254740992", "9007199254740992.0", true },         { "-0.0", "0", true },
        { "9223372036854775807", "9223372036854775808.0", false },  /* beyond int64 as a double */
        { "[1, [2]]", "[1.0, [2]]", true },                          { "[1, 2]", "[2, 1]", false },
        { "{\"a\": 1, \"b\": [true]}", "{\"b\": [true], \"a\": 1.0}", true },
        { "{\"a\": 1}", "{\"a\": 1, \"b\": 2}", false },            { "{}", "[]", false },
        { "\"a\\u0000b\"", "\"a\\u0000c\"", false },                { "\"\"", "\"\"", true },
    };
    for (size_t i = 0; i < GW_NELEM(cases); i++) {
        json_error_t e;
        json_t *a = json_loads(cases[i].a, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
        json_t *b = json_loads(cases[i].b, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
        CHECK(a && b && gw_cond_json_equal(a, b) == cases[i].eq && gw_cond_json_equal(b, a) == cases[i].eq);
        if (!(a && b && gw_cond_json_equal(a, b) == cases[i].eq))
            printf("    %s vs %s\n", cases[i].a, cases[i].b);
        json_decref(a);
        json_decref(b);
    }
}

static void
test_eval(void)
{
    const char *g = "{\"tier\": \"gold\", \"age\": 42, \"none\": null, \"a\": {\"c\": \"P\"}, \"t\": [1]}";
    CHECK(holds("{\"value\": \"{g.tier}\", \"in\": [\"silver\", \"gold\"]}", g, NULL));
    CHECK(!holds("{\"value\": \"{g.tier}\", \"equals\": \"silver\"}", g, NULL));
    CHECK(holds("{\"value\": \"{g.age}\", \"equals\": 42.0}", g, NULL));
    CHECK(!holds("{\"value\": \"{g.age}\", \"equals\": \"42\"}", g, NULL));
    CHECK(holds("{\"value\": \"{g.age}-{g.tier}\", \"equals\": \"42-gold\"}", g, NULL));
    CHECK(holds("{\"value\": \"{g.a}\", \"equals\": {\"c\": \"P\"}}", g, NULL));
    CHECK(holds("{\"exists\": \"{g.a.c}\"}", g, NULL));
    CHECK(!holds("{\"exists\": \"{g.none}\"}", g, NULL));          /* null does not exist */
    CHECK(holds("{\"value\": \"{g.none}\", \"equals\": null}", g, NULL));
    CHECK(!holds("{\"value\": \"{g.nope}\", \"equals\": null}", g, NULL)); /* absent equals nothing */
    CHECK(!holds("{\"exists\": \"x{g.none}\"}", g, NULL));         /* text cannot hold null */
    CHECK(!holds("{\"exists\": \"x{g.t}\"}", g, NULL));            /* nor an array */
    CHECK(!holds("{\"exists\": \"{h}\"}", g, NULL));               /* a call with no answer */
    CHECK(holds("{\"not\": {\"exists\": \"{h.x}\"}}", g, NULL));
    CHECK(!holds("{\"exists\": \"{g}\"}", NULL, NULL));
    CHECK(holds("{\"all\": [{\"exists\": \"{g.tier}\"}, {\"not\": {\"exists\": \"{g.nope}\"}}]}", g, NULL));
    CHECK(!holds("{\"any\": [{\"exists\": \"{g.nope}\"}, {\"value\": \"{g.tier}\", \"in\": [1]}]}", g, NULL));
    CHECK(holds("{\"value\": \"{item.k}\", \"equals\": \"p\"}", NULL, "{\"k\": \"p\"}"));
    CHECK(!holds("{\"value\": \"{item.k}\", \"equals\": \"p\"}", NULL, "5"));
    CHECK(holds("{\"value\": \"{item}\", \"in\": [4, 5]}", NULL, "5.0"));
    CHECK(!holds("{\"exists\": \"{query.q}\"}", g, NULL));         /* no request at all */
}

static void
test_compile(void)
{
    gw_cond_t *c = C("{\"all\": [{\"exists\": \"{h.x}\"}, {\"not\": {\"value\": \"{item.k}\", \"equals\": 1}}]}");
    CHECK(c && gw_cond_deps(c) == 2 && gw_cond_uses_item(c));
    gw_cond_free(c);
    c = C("{\"any\": [{\"exists\": \"{g}\"}, {\"value\": \"{query.x}\", \"in\": [1]}]}");
    CHECK(c && gw_cond_deps(c) == 1 && !gw_cond_uses_item(c));
    gw_cond_free(c);
    static const struct {
        const char *text, *loc, *msg;
    } bad[] = {
        { "{\"value\": \"{g}\", \"gt\": 1}", "gt", "unknown operator \"gt\"" },
        { "{\"all\": [{\"exists\": \"{g}\"}, {\"not\": {\"x\": 1}}]}", "all[1].not.x", "unknown operator" },
        { "{\"value\": \"{g}\", \"equals\": 1, \"in\": [1]}", "in", "cannot be used together" },
        { "{\"exists\": \"{g}\", \"any\": []}", "", "one test per condition" },
        { "{\"exists\": \"text\"}", "exists", "names no value" },
        { "{\"exists\": \"{{g}}\"}", "exists", "names no value" },
        { "{\"exists\": \"{nope}\"}", "exists", "unknown name \"nope\"" },
        { "{\"value\": 1, \"equals\": 1}", "value", "must be a template" },
        { "{\"any\": [1]}", "any[0]", "must be a condition" },
        { "[]", "", "must be a condition" },
    };
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        json_t *v = J(bad[i].text);
        gw_cond_err_t err;
        CHECK(gw_cond_compile(v, &scope, &err) == NULL);
        char loc[256] = "";
        size_t w = 0;
        for (size_t k = 0; k < err.nsteps; k++)
            w += (size_t)(err.steps[k].key ? snprintf(loc + w, sizeof(loc) - w, "%s%s", w ? "." : "", err.steps[k].key)
                                           : snprintf(loc + w, sizeof(loc) - w, "[%zu]", err.steps[k].index));
        CHECK_STR(loc, bad[i].loc);
        CHECK_CONTAINS(err.msg, bad[i].msg);
        json_decref(v);
    }
}

TEST_MAIN(T(test_equality), T(test_eval), T(test_compile))
