/* Unit tests for src/gw_jpath.c: syntax, get, set, delete, allow, deny. */
#include "gw_jpath.h"
#include "gw_test.h"

#include <stdlib.h>

static json_t *
J(const char *text)
{
    json_error_t e;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &e);
    if (v == NULL)
        printf("    bad test JSON %s: %s\n", text, e.text);
    return v;
}

/* Compact text of v ("(null)" for NULL), in a rotating static buffer. */
static const char *
D(const json_t *v)
{
    static char bufs[4][1024];
    static int k;
    char *b = bufs[k++ & 3];
    if (v == NULL)
        return "(null)";
    size_t n = json_dumpb(v, b, sizeof(bufs[0]) - 1, JSON_COMPACT | JSON_ENCODE_ANY);
    b[GW_MIN(n, sizeof(bufs[0]) - 1)] = '\0';
    return b;
}

static gw_jpath_t *
P(const char *src)
{
    char err[256];
    gw_jpath_t *p = gw_jpath_compile(src, err, sizeof(err));
    if (p == NULL)
        printf("    path %s: %s\n", src, err);
    return p;
}

static const char *
get_text(const char *path, const char *doc)
{
    json_t *root = J(doc);
    gw_jpath_t *p = P(path);
    const char *out = p ? D(gw_jpath_get(p, root)) : "(compile error)";
    gw_jpath_free(p);
    json_decref(root);
    return out;
}

static void
expect_bad(const char *src, const char *msg)
{
    char err[256] = "";
    gw_jpath_t *p = gw_jpath_compile(src, err, sizeof(err));
    if (p != NULL)
        printf("    path \"%s\" was accepted\n", src);
    CHECK(p == NULL);
    CHECK_CONTAINS(err, msg);
    gw_jpath_free(p);
}

static void
test_syntax(void)
{
    static const char *const good[] = { "", "a", "a.b.c", "items[0].id", "[2].name", "a.b[1][0]", "[0][1]",
                                        "first name", "caf\xc3\xa9", "0", "a-b_c:d", "[999999999]" };
    for (size_t i = 0; i < GW_NELEM(good); i++) {
        gw_jpath_t *p = P(good[i]);
        CHECK(p != NULL);
        if (p != NULL)
            CHECK_STR(gw_jpath_text(p), good[i]);
        gw_jpath_free(p);
    }
    gw_jpath_t *root = gw_jpath_compile(NULL, NULL, 0);
    CHECK(root != NULL && gw_jpath_is_root(root));
    gw_jpath_free(root);

    expect_bad("a..b", "path \"a..b\": empty key at offset 2");
    expect_bad(".a", "empty key at offset 0");
    expect_bad("a.", "empty key at offset 2");
    expect_bad("a.[0]", "empty key at offset 2");
    expect_bad("a[01]", "no leading zeros");
    expect_bad("a[00]", "no leading zeros");
    expect_bad("a[-1]", "decimal number");
    expect_bad("a[x]", "decimal number");
    expect_bad("a[]", "decimal number");
    expect_bad("a[1", "expected \"]\"");
    expect_bad("a[1x]", "expected \"]\"");
    expect_bad("a]", "\"]\" is not allowed in a key");
    expect_bad("a{b", "\"{\" is not allowed in a key");
    expect_bad("a}b", "\"}\" is not allowed in a key");
    expect_bad("{a}", "\"{\" is not allowed in a key");
    expect_bad("[0]x", "expected \".\" or \"[\" after \"]\"");
    expect_bad("[0]]", "expected \".\" or \"[\" after \"]\"");
    expect_bad("a[1000000000]", "index too large");
    expect_bad("a[99999999999999999999999]", "index too large");
    expect_bad("a\x01", "control character 0x01");
    expect_bad("a\nb", "control character 0x0a");
    char deep[200] = "a";
    for (size_t i = 0; i < 32; i++)
        snprintf(deep + 1 + 2 * i, sizeof(deep) - 1 - 2 * i, ".a");
    expect_bad(deep, "more than 32 steps");
    deep[strlen(deep) - 2] = '\0'; /* exactly 32 steps */
    gw_jpath_t *p = P(deep);
    CHECK(p != NULL);
    gw_jpath_free(p);
}

static void
test_get(void)
{
    const char *doc = "{\"a\":{\"b\":{\"c\":1}},\"items\":[{\"id\":7},{\"id\":8,\"tags\":[[1,2],[3]]}],"
                      "\"n\":null,\"0\":\"zero\",\"s\":\"x\"}";
    CHECK_STR(get_text("a.b.c", doc), "1");
    CHECK_STR(get_text("a.b", doc), "{\"c\":1}");
    CHECK_STR(get_text("items[0].id", doc), "7");
    CHECK_STR(get_text("items[1].tags[0][1]", doc), "2");
    CHECK_STR(get_text("items[1].tags[1][0]", doc), "3");
    CHECK_STR(get_text("", "[1,2]"), "[1,2]");
    CHECK_STR(get_text("[1]", "[1,{\"name\":\"x\"}]"), "{\"name\":\"x\"}");
    CHECK_STR(get_text("[1].name", "[1,{\"name\":\"x\"}]"), "\"x\"");
    /* a present null is the null value, not "absent" */
    CHECK_STR(get_text("n", doc), "null");
    /* "0" after a dot is a key, never an index */
    CHECK_STR(get_text("0", doc), "\"zero\"");
    CHECK_STR(get_text("items.0", doc), "(null)");
    /* absent and wrong types */
    CHECK_STR(get_text("a.x", doc), "(null)");
    CHECK_STR(get_text("a.b.c.d", doc), "(null)");
    CHECK_STR(get_text("items[2]", doc), "(null)");
    CHECK_STR(get_text("a[0]", doc), "(null)");
    CHECK_STR(get_text("s.x", doc), "(null)");
    CHECK_STR(get_text("s[0]", doc), "(null)");
    CHECK_STR(get_text("[0]", doc), "(null)");
    CHECK_STR(get_text("n.x", doc), "(null)");
    gw_jpath_t *p = P("a");
    CHECK(gw_jpath_get(p, NULL) == NULL);
    gw_jpath_free(p);
}

/* Runs gw_jpath_set(doc, path, value) and returns the document after it. */
static const char *
set_text(const char *doc, const char *path, const char *value, int expect_rc)
{
    json_t *root = J(doc);
    gw_jpath_t *p = P(path);
    int rc = gw_jpath_set(root, p, J(value));
    if (rc != expect_rc)
        printf("    set %s in %s: rc %d\n", path, doc, rc);
    CHECK(rc == expect_rc);
    const char *out = D(root);
    gw_jpath_free(p);
    json_decref(root);
    return out;
}

static void
test_set(void)
{
    CHECK_STR(set_text("{}", "a", "1", GW_OK), "{\"a\":1}");
    CHECK_STR(set_text("{\"a\":1}", "a", "2", GW_OK), "{\"a\":2}");
    CHECK_STR(set_text("{}", "a.b.c", "true", GW_OK), "{\"a\":{\"b\":{\"c\":true}}}");
    CHECK_STR(set_text("{\"a\":{\"x\":0}}", "a.b", "1", GW_OK), "{\"a\":{\"x\":0,\"b\":1}}");
    CHECK_STR(set_text("{\"l\":[1,2]}", "l[1]", "9", GW_OK), "{\"l\":[1,9]}");
    CHECK_STR(set_text("{\"l\":[1,2]}", "l[2]", "3", GW_OK), "{\"l\":[1,2,3]}");
    CHECK_STR(set_text("{}", "l[0].id", "5", GW_OK), "{\"l\":[{\"id\":5}]}");
    CHECK_STR(set_text("[]", "[0]", "\"x\"", GW_OK), "[\"x\"]");
    /* failures leave the document exactly as it was */
    CHECK_STR(set_text("{\"l\":[1,2]}", "l[3]", "3", GW_ERR), "{\"l\":[1,2]}");
    CHECK_STR(set_text("{}", "a.b[1]", "3", GW_ERR), "{}");
    CHECK_STR(set_text("{}", "a[0][2]", "3", GW_ERR), "{}");
    CHECK_STR(set_text("{\"a\":5}", "a.b", "1", GW_ERR), "{\"a\":5}");
    CHECK_STR(set_text("{\"a\":{}}", "a[0]", "1", GW_ERR), "{\"a\":{}}");
    CHECK_STR(set_text("[1]", "a", "1", GW_ERR), "[1]");
    CHECK_STR(set_text("{\"a\":1}", "", "2", GW_ERR), "{\"a\":1}");
}

static const char *
delete_text(const char *doc, const char *path, bool expect)
{
    json_t *root = J(doc);
    gw_jpath_t *p = P(path);
    bool removed = gw_jpath_delete(root, p);
    if (removed != expect)
        printf("    delete %s in %s: %d\n", path, doc, removed);
    CHECK(removed == expect);
    const char *out = D(root);
    gw_jpath_free(p);
    json_decref(root);
    return out;
}

static void
test_delete(void)
{
    CHECK_STR(delete_text("{\"a\":1,\"b\":2}", "a", true), "{\"b\":2}");
    CHECK_STR(delete_text("{\"a\":{\"b\":1,\"c\":2}}", "a.b", true), "{\"a\":{\"c\":2}}");
    CHECK_STR(delete_text("{\"l\":[1,2,3]}", "l[0]", true), "{\"l\":[2,3]}");
    CHECK_STR(delete_text("[[1,2],[3]]", "[0][1]", true), "[[1],[3]]");
    CHECK_STR(delete_text("{\"a\":1}", "b", false), "{\"a\":1}");
    CHECK_STR(delete_text("{\"a\":1}", "a.b", false), "{\"a\":1}");
    CHECK_STR(delete_text("{\"l\":[1]}", "l[1]", false), "{\"l\":[1]}");
    CHECK_STR(delete_text("{\"l\":[1]}", "l.x", false), "{\"l\":[1]}");
    CHECK_STR(delete_text("{\"a\":1}", "", false), "{\"a\":1}");
}

static gw_jpath_sel_t *
S(const char *const *srcs, size_t n)
{
    gw_jpath_t *paths[16] = { 0 };
    for (size_t i = 0; i < n; i++)
        paths[i] = P(srcs[i]);
    gw_jpath_sel_t *sel = gw_jpath_sel_new(paths, n);
    for (size_t i = 0; i < n; i++)
        gw_jpath_free(paths[i]);
    return sel;
}

#define SHAPE(fn, doc, expect, ...)                                                                                    \
    do {                                                                                                               \
        static const char *const srcs_[] = { __VA_ARGS__ };                                                            \
        gw_jpath_sel_t *sel_ = S(srcs_, GW_NELEM(srcs_));                                                              \
        json_t *in_ = J(doc);                                                                                          \
        char before_[1024];                                                                                            \
        snprintf(before_, sizeof(before_), "%s", D(in_));                                                             \
        json_t *out_ = fn(in_, sel_);                                                                                  \
        CHECK_STR(D(out_), expect);                                                                                    \
        CHECK_STR(D(in_), before_); /* the input is never modified */                                                 \
        json_decref(out_);                                                                                             \
        json_decref(in_);                                                                                              \
        gw_jpath_sel_free(sel_);                                                                                       \
    } while (0)

static void
test_allow(void)
{
    const char *doc = "{\"id\":1,\"name\":\"n\",\"a\":{\"b\":1,\"c\":2},\"d\":3,"
                      "\"items\":[{\"id\":10,\"x\":1},{\"id\":11},{\"id\":12,\"x\":3}]}";
    SHAPE(gw_jpath_allow, doc, "{\"id\":1,\"name\":\"n\"}", "id", "name");
    /* selection order, not document order */
    SHAPE(gw_jpath_allow, doc, "{\"name\":\"n\",\"id\":1}", "name", "id");
    SHAPE(gw_jpath_allow, doc, "{\"a\":{\"b\":1}}", "a.b");
    /* "a" and "a.b": the whole of "a" wins, in either order */
    SHAPE(gw_jpath_allow, doc, "{\"a\":{\"b\":1,\"c\":2}}", "a.b", "a");
    SHAPE(gw_jpath_allow, doc, "{\"a\":{\"b\":1,\"c\":2}}", "a", "a.b");
    SHAPE(gw_jpath_allow, doc, "{\"a\":{\"b\":1}}", "a.b", "a.b");
    /* array elements by index: packed, in index order */
    SHAPE(gw_jpath_allow, doc, "{\"items\":[{\"id\":12,\"x\":3}]}", "items[2]");
    SHAPE(gw_jpath_allow, doc, "{\"items\":[{\"id\":10},{\"id\":12}]}", "items[2].id", "items[0].id");
    SHAPE(gw_jpath_allow, doc, "{\"items\":[{\"x\":1},{\"x\":3}]}", "items[0].x", "items[1].x", "items[2].x");
    /* absent paths and wrong types keep nothing; empty containers go */
    SHAPE(gw_jpath_allow, doc, "{\"id\":1}", "id", "missing", "a.zz", "d.e", "items[9]", "a[0]", "items.id");
    SHAPE(gw_jpath_allow, doc, "{}", "nothing.here");
    SHAPE(gw_jpath_allow, doc, "{}");
    SHAPE(gw_jpath_allow, "[1,2,3]", "[]", "a");
    SHAPE(gw_jpath_allow, "[1,2,3]", "[1,3]", "[0]", "[2]", "[7]");
    SHAPE(gw_jpath_allow, "{\"n\":null}", "{\"n\":null}", "n");
    /* the empty path keeps everything */
    SHAPE(gw_jpath_allow, doc, doc, "", "id");
    SHAPE(gw_jpath_allow, "42", "42", "");
    /* a scalar root has nothing else to keep */
    SHAPE(gw_jpath_allow, "42", "(null)", "a");
    SHAPE(gw_jpath_allow, "\"s\"", "(null)", "[0]");

    /* kept subtrees are shared, not copied */
    json_t *in = J(doc);
    static const char *const one[] = { "a" };
    gw_jpath_sel_t *sel = S(one, 1);
    json_t *out = gw_jpath_allow(in, sel);
    CHECK(json_object_get(out, "a") == json_object_get(in, "a"));
    json_decref(out);
    json_decref(in);
    gw_jpath_sel_free(sel);
    CHECK(gw_jpath_allow(NULL, NULL) == NULL);
}

static void
test_deny(void)
{
    const char *doc = "{\"id\":1,\"secret\":\"s\",\"a\":{\"b\":1,\"c\":2},\"items\":[{\"id\":10,\"x\":1},{\"id\":11}]}";
    SHAPE(gw_jpath_deny, doc, "{\"id\":1,\"a\":{\"b\":1,\"c\":2},\"items\":[{\"id\":10,\"x\":1},{\"id\":11}]}",
          "secret");
    SHAPE(gw_jpath_deny, doc, "{\"id\":1,\"secret\":\"s\",\"a\":{\"c\":2},\"items\":[{\"id\":10},{\"id\":11}]}", "a.b",
          "items[0].x");
    /* indexes are the input's: [0] and [1] are the first two elements */
    SHAPE(gw_jpath_deny, "[0,1,2,3]", "[2,3]", "[0]", "[1]");
    SHAPE(gw_jpath_deny, "[0,1,2,3]", "[0,2]", "[3]", "[1]", "[9]");
    SHAPE(gw_jpath_deny, "{\"l\":[{\"a\":1,\"b\":2},{\"a\":3}]}", "{\"l\":[{\"b\":2}]}", "l[1]", "l[0].a");
    /* absent paths and wrong types are ignored */
    SHAPE(gw_jpath_deny, doc, doc, "nope", "a.b.c", "id.x", "a[0]", "items.x", "items[5]");
    SHAPE(gw_jpath_deny, "42", "42", "a");
    /* "a" and "a.b": "a" goes */
    SHAPE(gw_jpath_deny, "{\"a\":{\"b\":1},\"c\":1}", "{\"c\":1}", "a.b", "a");
    /* the empty path removes everything */
    SHAPE(gw_jpath_deny, doc, "(null)", "");

    /* untouched subtrees are shared; nothing denied: the same value */
    json_t *in = J(doc);
    static const char *const one[] = { "a.b" };
    gw_jpath_sel_t *sel = S(one, 1);
    json_t *out = gw_jpath_deny(in, sel);
    CHECK(out != in);
    CHECK(json_object_get(out, "items") == json_object_get(in, "items"));
    CHECK(json_object_get(out, "a") != json_object_get(in, "a"));
    json_decref(out);
    gw_jpath_sel_free(sel);
    static const char *const none[] = { "zz" };
    sel = S(none, 1);
    out = gw_jpath_deny(in, sel);
    CHECK(out == in);
    json_decref(out);
    json_decref(in);
    gw_jpath_sel_free(sel);
}

static void
test_replace(void)
{
    json_t *root = J("{\"a\": {\"items\": [{\"id\": 1}, {\"id\": 2}], \"k\": {\"x\": 1}}, \"b\": [1]}");
    json_t *shared_k = json_object_get(json_object_get(root, "a"), "k");
    gw_jpath_t *p = P("a.items");
    json_t *r = gw_jpath_replace(root, p, J("[3]"));
    CHECK_STR(D(r), "{\"a\":{\"items\":[3],\"k\":{\"x\":1}},\"b\":[1]}");
    CHECK_STR(D(root), "{\"a\":{\"items\":[{\"id\":1},{\"id\":2}],\"k\":{\"x\":1}},\"b\":[1]}"); /* unchanged */
    CHECK(json_object_get(json_object_get(r, "a"), "k") == shared_k);  /* untouched subtrees shared */
    CHECK(json_object_get(r, "b") == json_object_get(root, "b"));
    json_decref(r);
    gw_jpath_free(p);
    p = P("a.items[1].id");
    r = gw_jpath_replace(root, p, json_integer(9));
    CHECK_STR(D(json_object_get(r, "a")), "{\"items\":[{\"id\":1},{\"id\":9}],\"k\":{\"x\":1}}");
    json_decref(r);
    gw_jpath_free(p);
    /* it replaces, never creates: an absent step or the wrong type is NULL */
    const char *absent[] = { "a.nope", "a.items[2]", "b.x", "a.k[0]" };
    for (size_t i = 0; i < GW_NELEM(absent); i++) {
        p = P(absent[i]);
        CHECK(gw_jpath_replace(root, p, json_true()) == NULL);
        gw_jpath_free(p);
    }
    p = P("");
    r = gw_jpath_replace(root, p, json_integer(1));
    CHECK_STR(D(r), "1");
    json_decref(r);
    CHECK(gw_jpath_replace(NULL, p, json_integer(1)) == NULL);
    CHECK(!gw_jpath_is_key(p));
    gw_jpath_free(p);
    const char *keys[] = { "product", "a.b", "[0]", "a[0]" };
    const bool is_key[] = { true, false, false, false };
    for (size_t i = 0; i < GW_NELEM(keys); i++) {
        p = P(keys[i]);
        CHECK(gw_jpath_is_key(p) == is_key[i]);
        gw_jpath_free(p);
    }
    json_decref(root);
}

/* "[*]": only through gw_jpath_compile_wild(); collect and split. */
static void
test_wildcard(void)
{
    expect_bad("items[*].id", "\"[*]\" selects several values: not allowed here");
    char err[256] = "";
    static const char *const bad[] = { "a[*", "a[*x]", "a[**]", "a.[*]", "[*]x" };
    for (size_t i = 0; i < GW_NELEM(bad); i++) {
        gw_jpath_t *p = gw_jpath_compile_wild(bad[i], err, sizeof(err));
        if (p != NULL)
            printf("    path \"%s\" was accepted\n", bad[i]);
        CHECK(p == NULL);
        gw_jpath_free(p);
    }
    json_t *doc = J("{\"o\": [{\"items\": [{\"id\": 1}, {\"id\": 2}, {\"x\": 0}]}, 5, {\"items\": [{\"id\": 3}]}],"
                    " \"n\": {\"a\": 1}}");
    static const struct {
        const char *path, *want;
        size_t wild;
    } cases[] = {
        { "o[*].items[*].id", "[1,2,3]", 2 },
        { "o[0].items[*].id", "[1,2]", 1 },
        { "o[*]", "[{\"items\":[{\"id\":1},{\"id\":2},{\"x\":0}]},5,{\"items\":[{\"id\":3}]}]", 1 },
        { "n[*]", "[]", 1 },       /* "[*]" on an object finds nothing */
        { "nope[*].id", "[]", 1 },
        { "n.a", "[1]", 0 },       /* no "[*]": the value alone */
        { "n.b", "[]", 0 },
    };
    for (size_t i = 0; i < GW_NELEM(cases); i++) {
        gw_jpath_t *p = gw_jpath_compile_wild(cases[i].path, err, sizeof(err));
        CHECK(p != NULL);
        if (p == NULL) {
            printf("    %s: %s\n", cases[i].path, err);
            continue;
        }
        json_t *got = gw_jpath_collect(p, doc);
        if (strcmp(D(got), cases[i].want) != 0)
            printf("    collect %s: %s, want %s\n", cases[i].path, D(got), cases[i].want);
        CHECK_STR(D(got), cases[i].want);
        CHECK(gw_jpath_wildcards(p) == cases[i].wild);
        CHECK(gw_jpath_get(p, doc) == NULL || cases[i].wild == 0); /* get never goes through "[*]" */
        json_decref(got);
        gw_jpath_free(p);
    }
    gw_jpath_t *p = gw_jpath_compile_wild("o[0].items[*].id", err, sizeof(err)), *before = NULL, *after = NULL;
    CHECK(gw_jpath_split_wild(p, &before, &after) == GW_OK);
    CHECK_STR(gw_jpath_text(before), "o[0].items");
    CHECK_STR(gw_jpath_text(after), "id");
    CHECK_STR(D(gw_jpath_get(before, doc)), "[{\"id\":1},{\"id\":2},{\"x\":0}]");
    gw_jpath_free(before);
    gw_jpath_free(after);
    gw_jpath_free(p);
    p = gw_jpath_compile_wild("[*]", err, sizeof(err));
    CHECK(gw_jpath_split_wild(p, &before, &after) == GW_OK);
    CHECK(gw_jpath_is_root(before) && gw_jpath_is_root(after));
    CHECK_STR(gw_jpath_text(before), "");
    gw_jpath_free(before);
    gw_jpath_free(after);
    gw_jpath_free(p);
    p = P("a.b");
    before = after = NULL;
    CHECK(gw_jpath_split_wild(p, &before, &after) == GW_ERR && before == NULL && after == NULL);
    gw_jpath_free(p);
    json_decref(doc);
}

TEST_MAIN(T(test_syntax), T(test_get), T(test_set), T(test_delete), T(test_allow), T(test_deny), T(test_replace),
          T(test_wildcard))
